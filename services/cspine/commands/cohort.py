"""``cspine cohort check``: is a site's labelled cohort (docs/cohort.md) fit to train and evaluate on?"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from cspine.config import IngestLimits, Settings


def cmd_cohort_check(args: argparse.Namespace, limits: IngestLimits) -> int:
    from cspine.cohort.check import check_cohort, format_report

    folder = Path(args.folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such cohort folder")
    report = check_cohort(folder, limits=limits, progress=not args.quiet and not args.json)
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 1 if report.count("error") else 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "cohort",
        help="check a site's labelled cohort (DICOM studies, SEG labels, tumor boxes, manifest.csv)",
        description="A labelled cohort is a folder of study folders with DICOM SEG structure labels, tumor boxes "
        "and a manifest.csv of pathology and split (docs/cohort.md); cspine phantom --labels dicom writes one.",
    )
    sub = p.add_subparsers(dest="cohort_command", required=True)
    check = sub.add_parser(
        "check",
        help="ingest every study as the service would and match every label to its series",
        description="Ingests every study's images under the limits cspine serve enforces, chooses its series as "
        "the service does, reads every DICOM SEG and tumor box against the series it labels (frame of reference, "
        "spacing, orientation, slice positions), maps segment codes (SNOMED CT, or the cohort's codes.csv) to "
        "cspine's structures, and matches the study folders with manifest.csv. Reports unmapped codes, missing "
        "labels, empty masks, boxes outside their images and class counts per split, per study. Exit status 1 "
        "when there is an error (training stops on one), 0 otherwise; warnings do not change it.",
    )
    check.add_argument("folder", help="the cohort folder (its manifest.csv and one folder per study)")
    check.add_argument("--json", action="store_true", help="print one JSON object: studies, class counts, problems")
    check.add_argument("--quiet", action="store_true", help="no progress bar")
    check.set_defaults(func=partial(cmd_cohort_check, limits=settings.serve.analysis.limits))
