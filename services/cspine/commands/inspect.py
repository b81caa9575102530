"""``cspine inspect``: what ingest makes of DICOM files or folders, under the limits ``cspine serve`` enforces."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

from cspine.config import IngestLimits, Settings


def cmd_inspect(args: argparse.Namespace, limits: IngestLimits) -> int:
    from cspine.dicom.inspect import format_inspect, inspect_paths

    report = inspect_paths([Path(p) for p in args.paths], limits=limits)
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    refused = report["refused"] or any(study["error"] for study in report["studies"])
    return 1 if refused else 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "inspect",
        help="show what ingest makes of DICOM files or folders",
        description="Exit status 1 when ingest would refuse a file or a study, 0 otherwise.",
    )
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="machine-readable output with stable keys")
    p.set_defaults(func=partial(cmd_inspect, limits=settings.serve.analysis.limits))
