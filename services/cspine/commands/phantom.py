"""``cspine phantom``: write SYNTHETIC cervical spine studies as DICOM with their ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

from cspine.config import Settings


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
        matrix=getattr(args, "matrix", "phantom"),
        site=getattr(args, "site", "default"),
    )


def cmd_phantom(args: argparse.Namespace) -> int:
    from cspine.phantom.generate import generate_cohort

    options = _phantom_options(args)
    truths = generate_cohort(
        Path(args.out),
        args.cases,
        args.seed,
        options,
        workers=args.workers,
        progress=not args.quiet,
    )
    if args.labels == "dicom":
        from cspine.cohort.phantom import write_cohort_labels

        write_cohort_labels(Path(args.out), truths, workers=args.workers)
    counts: dict[str, int] = {}
    for t in truths:
        key = t["tumor"]["class"] if t["tumor"] else "none"
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    site = "" if options.site == "default" else f" of site {options.site}"
    labels = ", labels as DICOM SEG and boxes.json, manifest.csv" if args.labels == "dicom" else ""
    print(f"wrote {len(truths)} SYNTHETIC case(s){site} to {args.out} ({summary}{labels})")
    return 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    from cspine.phantom.generate import OPLL_PROBABILITY, tumor_choices
    from cspine.phantom.scanner import MATRICES
    from cspine.phantom.sites import SITES

    p = subparsers.add_parser(
        "phantom",
        help="generate SYNTHETIC cervical spine studies as DICOM with ground truth",
        description=(
            "Write DIR/<case>/{ct,mr,xr}/*.dcm, DIR/<case>/truth.json, DIR/<case>/labels.npz and DIR/cohort.json. "
            "With --tumor random, 25% of cases (at the default site) have no tumor; the others get a subtype drawn "
            "with relative frequencies hemangioma 14, osteoid_osteoma 8, schwannoma 10, osteochondroma 6, "
            "giant_cell_tumor 10, aneurysmal_bone_cyst 8, osteoblastoma 7, metastasis 18, myeloma 10, chordoma 9; "
            "--site changes them (docs/phantom.md)."
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
    p.add_argument(
        "--matrix",
        default="phantom",
        choices=list(MATRICES),
        help="image matrices: phantom (256² CT and MR, ~0.55 mm radiograph; fast) or real (512² CT with 0.5 mm "
        "slices, 512² MR, 3072 × 2614 radiograph at ~0.1 mm: for benchmarks, ~1 min and 200 MB per case)",
    )
    p.add_argument(
        "--site",
        default="default",
        metavar="NAME",
        help=f"SYNTHETIC site profile: scanner, protocol and population ({', '.join(SITES)}; docs/phantom.md); "
        "default: the phantom as the shipped models were trained on it",
    )
    p.add_argument(
        "--labels",
        default="npz",
        choices=("npz", "dicom"),
        help="npz: the ground truth as labels.npz and truth.json (default); dicom: also as a labelled cohort "
        "(DIR/<case>/labels/<series role>.dcm DICOM SEG, DIR/<case>/boxes.json, DIR/manifest.csv with every fourth "
        "case held out as test; docs/cohort.md), what cspine cohort check reads",
    )
    p.add_argument("--workers", type=int, default=1, help="processes generating cases in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantom)
