"""The fault-injection report as the markdown table of docs/reliability.md: ``python tests/faults/report.py``
prints it from the last run's rows (tests/faults/.last-report.json, or $CSPINE_FAULTS_REPORT);
``--write docs/reliability.md`` puts it between that file's table markers (``make faults`` does both)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPORT_ENV = "CSPINE_FAULTS_REPORT"  # here, not in harness.py: rendering needs neither grpc nor cspine
DEFAULT_REPORT = Path(__file__).parent / ".last-report.json"
START = "<!-- fault-injection table: python tests/faults/report.py --write docs/reliability.md -->"
END = "<!-- end of the fault-injection table -->"
COLUMNS = ("scenario", "fault", "load", "answered", "refused (by code)", "lost", "time to recover")


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def render(rows: list[dict]) -> str:
    """The table, one line per scenario, and the line saying where and when it was measured."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        summary = row["summary"]
        refused = "; ".join(f"{rpc}: {_counts(codes)}" for rpc, codes in sorted(summary["refused"].items()))
        lost = str(summary["lost_total"])
        if summary["lost_total"]:
            lost += " (" + "; ".join(f"{rpc}: {_counts(why)}" for rpc, why in sorted(summary["lost"].items())) + ")"
        recovered = "not recovered" if row["recovery_s"] is None else f"{row['recovery_s']:.1f} s"
        cells = (
            row["scenario"],
            row["fault"],
            f"{row['load']}, {summary['duration_s']:g} s",
            _counts(summary["answered"]),
            refused or "none",
            lost,
            f"{recovered} ({row['recovery']})",
        )
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    measured = sorted({row["measured"] for row in rows})
    lines += ["", f"Measured {' and '.join(measured)}."]
    return "\n".join(lines) + "\n"


def write_into(document: Path, table: str) -> None:
    """Replaces what lies between the table markers of ``document``."""
    text = document.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{document} lacks the table markers:\n{START}\n{END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    document.write_text(f"{head}{START}\n{table}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = os.environ.get(REPORT_ENV) or str(DEFAULT_REPORT)
    parser.add_argument("--report", default=default, help=f"the rows (${REPORT_ENV}, default {DEFAULT_REPORT.name})")
    parser.add_argument("--write", metavar="MARKDOWN", help="put the table into this file (docs/reliability.md)")
    args = parser.parse_args(argv)
    path = Path(args.report)
    if not path.is_file():
        print(f"no fault-injection report at {path}: run .venv/bin/python -m pytest tests/faults", file=sys.stderr)
        return 1
    table = render(json.loads(path.read_text()))
    if args.write:
        write_into(Path(args.write), table)
    else:
        sys.stdout.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
