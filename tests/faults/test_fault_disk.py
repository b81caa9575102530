"""A full disk under the data directory, through ``cspine serve`` (gateway, SQLite store, the session's local
Triton) on SYNTHETIC phantom studies: the data directory is a small tmpfs that a filler file fills under
AddCase load. AddCase is refused RESOURCE_EXHAUSTED naming the store; analyses go on; no acknowledged case is
lost, the SQLite file passes its integrity check, and AddCase works again once the filler is gone."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing

import pytest
from harness import Load, Row, add_case_call, analyze_call, listed_case_ids, study_files, write_row
from injectors import Tmpfs, serve

RECOVERY_BOUND_S = 30.0
WARM_UP_BOUND_S = 60.0  # the first answers before the fault (a busy machine makes them slow)
DISK_BYTES = 16 << 20  # the seeded store (~250 KB) and its WAL, with room for the cases added before the fill


@pytest.fixture
def small_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting the small tmpfs that is filled needs root")
    with Tmpfs(tmp_path / "disk", DISK_BYTES) as disk:  # unmounted on the way out, whatever happened
        yield disk


def test_a_full_data_dir_refuses_add_case_resource_exhausted_keeps_every_case_and_recovers(
    small_disk, triton, phantom_cases, tmp_path
):
    data = small_disk.path / "data"
    with serve(data, tmp_path / "serve.log", triton.grpc_url) as server:  # the log lives off the small disk
        load = Load(server.address, server.token())
        xr = study_files(phantom_cases["malignant"], "xr")
        load.add("AddCase", add_case_call(xr, "malignant"), clients=2, pause_s=0.1)
        load.add("AnalyzeStudy", analyze_call(study_files(phantom_cases["benign"])), clients=1)
        with load:
            assert load.wait_ok("AddCase", "start", WARM_UP_BOUND_S) is not None
            time.sleep(2)
            load.mark("fault")
            filled = small_disk.fill()
            assert small_disk.free_bytes() == 0 and filled > 0
            time.sleep(5)
            load.mark("removed")
            small_disk.free()
            recovered = load.wait_ok("AddCase", "removed", RECOVERY_BOUND_S)
            time.sleep(2)
        missing = load.check_cases(listed_case_ids(server.address, server.token()))
    summary = load.summary()
    write_row(
        Row(
            "Full disk under the data directory",
            f"a filler file takes the last byte of a {DISK_BYTES >> 20} MiB tmpfs holding the SQLite store, "
            "removed 5 s later",
            load.describe(),
            summary,
            recovered,
            "filler removed → first ok AddCase",
        )
    )
    assert summary.lost_total == 0 and not missing, summary.lost
    assert summary.refused_codes("AddCase") == {"RESOURCE_EXHAUSTED"}, summary.refused  # the full disk was seen
    refusals = [o.detail for o in load.outcomes if o.result == "refused"]
    assert all(d.startswith("the support store is full: ") for d in refusals), refusals[:3]
    assert not summary.refused.get("AnalyzeStudy"), summary.refused
    full = load.during("AnalyzeStudy", "fault", "removed")
    assert full and all(o.result == "ok" for o in full)  # analyses write nothing to the data directory
    with closing(sqlite3.connect(data / "support.db")) as db:  # the server has stopped
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        stored = db.execute("SELECT count(*) FROM cases WHERE NOT synthetic").fetchone()[0]
    assert stored >= len(load.acknowledged())  # refused after the commit is possible, acknowledged and absent not
    assert recovered is not None and recovered < RECOVERY_BOUND_S
