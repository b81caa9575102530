"""Faults of a PostgreSQL support store under load, through ``cspine serve`` (gateway, store, the session's
local Triton) on SYNTHETIC phantom studies: the database stopped and restarted, and a store that answers
slowly and then not at all. AddCase may be refused UNAVAILABLE while the store is away; analyses go on; no
acknowledged case is ever missing afterwards."""

from __future__ import annotations

import time

import pytest
from harness import Load, Row, add_case_call, analyze_call, list_cases_call, listed_case_ids, study_files, write_row
from injectors import LatencyProxy, serve

from cspine.fewshot.store import STORE_TIMEOUT_S
from support.postgres import PostgresCluster

RECOVERY_BOUND_S = 30.0
WARM_UP_BOUND_S = 60.0  # the first answers before the fault (a busy machine makes them slow)


@pytest.fixture(scope="module")
def cluster():
    with PostgresCluster() as pg:
        yield pg


def test_postgresql_stopped_and_restarted_under_add_case_load_refuses_unavailable_and_loses_no_case(
    cluster, triton, phantom_cases, tmp_path
):
    url = cluster.new_database()
    with serve(tmp_path / "data", tmp_path / "serve.log", triton.grpc_url, "--store-url", url) as server:
        load = Load(server.address, server.token())
        # Radiographs only for AddCase: a tenth of a second each, so many cases are in flight when the store goes.
        xr = study_files(phantom_cases["malignant"], "xr")
        load.add("AddCase", add_case_call(xr, "malignant"), clients=2, pause_s=0.1)
        load.add("AnalyzeStudy", analyze_call(study_files(phantom_cases["benign"])), clients=1)
        with load:
            assert load.wait_ok("AddCase", "start", WARM_UP_BOUND_S) is not None
            time.sleep(2)
            load.mark("fault")
            cluster.stop("fast")
            time.sleep(5)
            load.mark("removed")
            cluster.start()
            recovered = load.wait_ok("AddCase", "removed", RECOVERY_BOUND_S)
            time.sleep(2)
        missing = load.check_cases(listed_case_ids(server.address, server.token()))
    summary = load.summary()
    write_row(
        Row(
            "PostgreSQL stopped and restarted",
            "`pg_ctl stop -m fast` under load, started again 5 s later",
            load.describe(),
            summary,
            recovered,
            "restart → first ok AddCase",
        )
    )
    assert summary.lost_total == 0 and not missing, summary.lost
    assert summary.refused_codes("AddCase") == {"UNAVAILABLE"}, summary.refused  # the outage was seen
    before = [o for o in load.outcomes if o.rpc == "AddCase" and o.ended < load.marks["fault"]]
    assert before and all(o.result == "ok" for o in before), before
    assert not summary.refused.get("AnalyzeStudy"), summary.refused
    outage = load.during("AnalyzeStudy", "fault", "removed")
    assert outage and all(o.result == "ok" for o in outage)  # analyses need no store
    refusals = [o.detail for o in load.outcomes if o.result == "refused"]
    assert all(d.startswith("the support store is unavailable: ") for d in refusals), refusals[:3]
    assert recovered is not None and recovered < RECOVERY_BOUND_S


def test_a_slow_then_stalled_store_answers_within_the_deadline_or_refuses_unavailable_and_loses_no_case(
    cluster, triton, phantom_cases, tmp_path
):
    with LatencyProxy(cluster.port) as proxy:
        url = cluster.new_database(proxy.port)
        with serve(tmp_path / "data", tmp_path / "serve.log", triton.grpc_url, "--store-url", url) as server:
            load = Load(server.address, server.token())
            load.add("AddCase", add_case_call(study_files(phantom_cases["malignant"], "xr"), "malignant"), pause_s=0.1)
            load.add("ListCases", list_cases_call(), pause_s=0.1)
            load.add("AnalyzeStudy", analyze_call(study_files(phantom_cases["benign"])))
            with load:
                assert None not in [load.wait_ok(rpc, "start", WARM_UP_BOUND_S) for rpc in ("AddCase", "ListCases")]
                load.mark("slow")
                proxy.delay_s = 0.2  # each way: an AddCase's ~40 round trips take ~16 s
                time.sleep(20)
                load.mark("stall")
                proxy.stall()
                time.sleep(STORE_TIMEOUT_S + 4)  # every call waiting on the store is given up
                load.mark("removed")
                proxy.delay_s = 0.0
                proxy.resume()
                recovered = [load.wait_ok(rpc, "removed", RECOVERY_BOUND_S) for rpc in ("AddCase", "ListCases")]
                time.sleep(1)
            missing = load.check_cases(listed_case_ids(server.address, server.token()))
    summary = load.summary()
    recovery = None if None in recovered else max(recovered)
    write_row(
        Row(
            "A store that answers slowly, then not at all",
            "TCP proxy before PostgreSQL: +200 ms per packet each way for 20 s, "
            f"then stalled {STORE_TIMEOUT_S + 4:g} s",
            load.describe(),
            summary,
            recovery,
            "stall lifted → first ok AddCase and ListCases",
        )
    )
    assert summary.lost_total == 0 and not missing, summary.lost
    for rpc in ("AddCase", "ListCases"):
        slow = [o for o in load.outcomes if o.rpc == rpc and load.marks["slow"] <= o.ended < load.marks["stall"]]
        assert slow and all(o.result == "ok" for o in slow), slow  # slow, but answered
        assert summary.refused_codes(rpc) == {"UNAVAILABLE"}, summary.refused  # the stall, given up
    stalled = [o for o in load.outcomes if o.result == "refused"]
    # Given up STORE_TIMEOUT_S after the stall began or the call started (5 s for a new connection), plus the
    # call's analysis of its radiograph.
    assert all(o.ended - max(o.started, load.marks["stall"]) < STORE_TIMEOUT_S + 8 for o in stalled), stalled
    assert all(o.detail.startswith("the support store is unavailable: ") for o in stalled), stalled
    assert not summary.refused.get("AnalyzeStudy"), summary.refused
    analyses = load.during("AnalyzeStudy", "slow", "removed")
    assert analyses and all(o.result == "ok" for o in analyses)  # analyses need no store
    assert recovery is not None and recovery < RECOVERY_BOUND_S
