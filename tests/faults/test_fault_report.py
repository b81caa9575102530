"""The fault-injection report: rows kept one per scenario, rendered as the markdown table of
docs/reliability.md and written between its markers without touching the rest of the file."""

from __future__ import annotations

import json

import pytest
from harness import Row, Summary, write_row
from report import END, START, render, write_into


def row(scenario: str, lost: dict | None = None, recovery_s: float | None = 1.23) -> Row:
    summary = Summary(
        calls=12,
        duration_s=9.5,
        answered={"AddCase": 7, "AnalyzeStudy": 2},
        refused={"AddCase": {"UNAVAILABLE": 3}},
        lost=lost or {},
    )
    return Row(scenario, "pg_ctl stop | start", "2 × AddCase", summary, recovery_s, "restart → first ok AddCase")


def test_a_scenario_run_again_replaces_its_row_in_place(tmp_path):
    path = tmp_path / "report.json"
    for r in (row("first"), row("second"), row("first", recovery_s=4.0)):
        write_row(r, path)
    rows = json.loads(path.read_text())
    assert [(r["scenario"], r["recovery_s"]) for r in rows] == [("first", 4.0), ("second", 1.23)]
    assert rows[0]["summary"]["lost_total"] == 0


def test_the_table_shows_counts_by_code_losses_with_their_reason_and_recovery(tmp_path):
    path = tmp_path / "report.json"
    write_row(row("restart"), path)
    write_row(row("stall", lost={"AddCase": {"no answer within the deadline": 1}}, recovery_s=None), path)
    lines = render(json.loads(path.read_text())).splitlines()
    assert lines[0].startswith("| scenario | fault | load | answered | refused (by code) | lost |")
    assert lines[2] == (
        "| restart | pg_ctl stop \\| start | 2 × AddCase, 9.5 s | AddCase 7, AnalyzeStudy 2 | AddCase: UNAVAILABLE 3 "
        "| 0 | 1.2 s (restart → first ok AddCase) |"
    )
    assert "| 1 (AddCase: no answer within the deadline 1) | not recovered (" in lines[3]
    assert lines[-1].startswith("Measured ") and "CPU cores" in lines[-1]


def test_writing_the_table_replaces_only_what_lies_between_the_markers(tmp_path):
    document = tmp_path / "reliability.md"
    around = "# Reliability\n\n## Fault injection\n\n{}\n\n## Fuzzing ingest\n\nkept\n"
    document.write_text(around.format(f"{START}\nold table\n{END}"))
    write_into(document, "| new table |\n")
    assert document.read_text() == around.format(f"{START}\n| new table |\n{END}")
    document.write_text("# Reliability\n")
    with pytest.raises(SystemExit, match="lacks the table markers"):
        write_into(document, "| new table |\n")
