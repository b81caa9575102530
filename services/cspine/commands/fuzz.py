"""``cspine fuzz ingest``: coverage-guided fuzzing of DICOM ingest (atheris, from the dev extra)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cspine.config import Settings


def cmd_fuzz_ingest(args: argparse.Namespace) -> int:
    from cspine.dicom.fuzz import FuzzOptions, format_report, fuzz_ingest

    options = FuzzOptions(
        budget_s=args.budget_s,
        corpus=Path(args.corpus),
        work=Path(args.work),
        seed=args.seed,
        seeds=tuple(Path(s) for s in args.seeds),
        per_input_timeout_s=args.per_input_timeout_s,
    )
    report = fuzz_ingest(options, progress=lambda message: print(message, flush=True))
    print(format_report(report))
    return 1 if report.crashes else 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser("fuzz", help="fuzzing runs (atheris, from the dev extra)")
    fuzz = p.add_subparsers(dest="fuzz", required=True)
    f = fuzz.add_parser(
        "ingest",
        help="coverage-guided fuzzing of DICOM ingest for a CPU budget; exit status 1 when anything crashed",
    )
    f.add_argument("--budget-s", type=float, required=True, help="CPU seconds of fuzzing")
    f.add_argument("--corpus", default="tests/data/fuzz_corpus", help="kept corpus: read, then minimized in place")
    f.add_argument("--work", default="out/fuzz", help="seeds, new inputs, crashes/ and logs of the run")
    f.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    f.add_argument("--seeds", action="append", default=[], help="another folder of seed inputs (repeatable)")
    f.add_argument("--per-input-timeout-s", type=int, default=10, help="longer counts as a hang (default 10)")
    f.set_defaults(func=cmd_fuzz_ingest)
