"""The `cspine` command: phantom, inspect, bench, demo.

Configuration is read here, once, from flags and ``CSPINE_`` environment variables; the library modules
never read the environment themselves.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from cspine.config import IngestLimits
from cspine.errors import CspineError

logger = logging.getLogger(__name__)

DEMO_SEED = 2026


def _phantom_options(args: argparse.Namespace):
    from cspine.phantom.generate import PhantomOptions, parse_difficulty
    from cspine.phantom.scanner import Shift

    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    return PhantomOptions(
        modalities=modalities,
        tumor=args.tumor,
        difficulty=parse_difficulty(args.difficulty),
        shift=Shift.parse(args.shift),
        opll=args.opll,
    )


def cmd_phantom(args: argparse.Namespace) -> int:
    from cspine.phantom.generate import generate_cohort

    options = _phantom_options(args)
    truths = generate_cohort(
        Path(args.out), args.cases, args.seed, options, workers=args.workers, progress=not args.quiet
    )
    counts: dict[str, int] = {}
    for t in truths:
        key = t["tumor"]["class"] if t["tumor"] else "none"
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"wrote {len(truths)} SYNTHETIC case(s) to {args.out} ({summary})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from cspine.dicom.inspect import format_inspect, inspect_paths

    report = inspect_paths([Path(p) for p in args.paths], limits=IngestLimits.from_env())
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    refused = report["refused"] or any(study["error"] for study in report["studies"])
    return 1 if refused else 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from cspine.dicom.bench import bench_ingest, format_bench
    from cspine.phantom.generate import PhantomOptions, generate_case
    from cspine.phantom.scanner import Shift

    with tempfile.TemporaryDirectory(prefix="cspine-bench-") as tmp:
        # A 512 × 512 SYNTHETIC CT (half the usual pixel spacing), stored uncompressed.
        options = PhantomOptions(
            modalities=("ct",), tumor="none", shift=Shift(resolution=0.5, thickness=args.thickness)
        )
        truth = generate_case(Path(tmp) / "case", "bench", args.seed, 0, options)
        ct = truth["series"]["ct"]
        files = [Path(tmp) / "case" / f for f in ct["files"]]
        slices, rows, columns = ct["shape"]
        print(f"SYNTHETIC CT, {slices} slices of {rows}×{columns}, uncompressed ({ct['storage']})")
        print(format_bench(bench_ingest(files, repeats=args.repeats)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cspine.dicom.inspect import format_inspect, inspect_paths
    from cspine.phantom.generate import PhantomOptions, generate_case

    out = Path(args.out)
    cases = ["benign", "borderline", "malignant", "none"]
    print(f"cspine demo: {len(cases)} SYNTHETIC studies (one per tumor class, one tumor-free) in {out}\n")
    for index, tumor in enumerate(cases):
        case_id = f"demo-{tumor}"
        truth = generate_case(out / case_id, case_id, DEMO_SEED, index, PhantomOptions(tumor=tumor))
        lesion = truth["tumor"]
        if lesion:
            what = (
                f"{lesion['class']} ({lesion['subtype']}) at {', '.join(lesion['levels'])}, "
                f"{lesion['max_diameter_mm']:.1f} mm, {lesion['volume_ml']:.2f} mL"
            )
        else:
            what = "no tumor"
        print(f"== {case_id}: truth: {what}; C2–C7 Cobb {truth['cobb_angle_c2_c7_deg']:.1f}°")
        # the DICOM folders only: truth.json and labels.npz beside them are not part of the study
        report = inspect_paths(
            [out / case_id / folder for folder in ("ct", "mr", "xr")], limits=IngestLimits.from_env()
        )
        print(format_inspect(report))
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    from cspine.phantom.generate import OPLL_PROBABILITY, tumor_choices

    parser = argparse.ArgumentParser(
        prog="cspine",
        description="Few-shot, multi-modal cervical spine tumor assistant. Phantom data is SYNTHETIC.",
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "phantom",
        help="generate SYNTHETIC cervical spine studies as DICOM with ground truth",
        description=(
            "Write DIR/<case>/{ct,mr,xr}/*.dcm, DIR/<case>/truth.json, DIR/<case>/labels.npz and DIR/cohort.json. "
            "With --tumor random, 25%% of cases have no tumor; the others get a subtype drawn with relative "
            "frequencies hemangioma 14, osteoid_osteoma 8, schwannoma 10, osteochondroma 6, giant_cell_tumor 10, "
            "aneurysmal_bone_cyst 8, osteoblastoma 7, metastasis 18, myeloma 10, chordoma 9."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed; case i is the same for the same seed")
    p.add_argument("--modalities", default="ct,mr,xr", help="comma-separated subset of ct,mr,xr (default all)")
    p.add_argument(
        "--tumor",
        default="random",
        choices=tumor_choices(),
        metavar="SUBTYPE|CLASS|none|random",
        help="tumor to draw: a subtype, a class (benign, borderline, malignant), none or random",
    )
    p.add_argument(
        "--difficulty",
        default="normal",
        help="easy, normal, hard or 0..1: higher blurs the subtypes' distinctive traits, adds noise",
    )
    p.add_argument(
        "--shift", default="", help="domain shift, e.g. noise=2,resolution=1.5,contrast=0.8,thickness=3 (mm)"
    )
    p.add_argument(
        "--opll",
        default="random",
        choices=list(OPLL_PROBABILITY),
        help="ossification of the posterior longitudinal ligament: random (12%%), yes, no",
    )
    p.add_argument("--workers", type=int, default=1, help="processes generating cases in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser(
        "inspect",
        help="show what ingest makes of DICOM files or folders",
        description="Exit status 1 when ingest would refuse a file or a study, 0 otherwise.",
    )
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="machine-readable output with stable keys")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("ingest", help="ingest slices/s beside bare pydicom on the same uncompressed CT")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--thickness", type=float, default=1.5, help="CT slice thickness in mm (default 1.5)")
    b.add_argument("--seed", type=int, default=7)
    b.set_defaults(func=cmd_bench_ingest)

    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--out", default="out/demo", help="folder for the demo's SYNTHETIC studies")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (CspineError, ValueError) as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        return 130
