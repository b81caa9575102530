"""``cspine demo``: start ``cspine serve``, upload a SYNTHETIC study with ``cspine analyze``, print the report,
write SEG, SR and an overlay PNG, stop."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cspine.config import Settings

DEMO_SEED = 2026


def cmd_demo(args: argparse.Namespace) -> int:
    import subprocess

    from cspine.ops.embedded import EmbeddedServer
    from cspine.phantom.generate import PhantomOptions, generate_case

    out = Path(args.out)
    study = out / "study"
    print(f"cspine demo: a SYNTHETIC study with a tumor in {study}", flush=True)
    truth = generate_case(study, "demo", DEMO_SEED, 0, PhantomOptions(tumor="malignant"))
    lesion = truth["tumor"]
    print("starting cspine serve (local Triton on CPU, then the gateway) …", flush=True)
    with EmbeddedServer(out / "data", out / "serve.log") as server:
        print(
            f"\ntruth: {lesion['class']} ({lesion['subtype']}) at {lesion['primary_level']}, "
            f"{lesion['max_diameter_mm']:.1f} mm; C2–C7 Cobb {truth['cobb_angle_c2_c7_deg']:.1f}°\n",
            flush=True,
        )
        analyze = [sys.executable, "-m", "cspine", "analyze", str(study), "--server", server.address]
        analyze += ["--data-dir", str(out / "data")]  # where serve keeps the tokens it generated
        analyze += ["--seg", str(out / "seg.dcm"), "--sr", str(out / "sr.dcm"), "--overlay", str(out / "overlay.png")]
        code = subprocess.call(analyze)
    print(f"cspine serve stopped (its log: {out / 'serve.log'})")
    return code


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "demo",
        help="start cspine serve, upload a SYNTHETIC study with `cspine analyze`, print the report, write "
        "SEG, SR and an overlay PNG, stop",
    )
    p.add_argument("--out", default="out/demo", help="folder for the demo's SYNTHETIC studies")
    p.set_defaults(func=cmd_demo)
