"""Triton killed and restarted under load, through ``cspine serve`` with its own supervised local Triton (on CPU)
on SYNTHETIC phantom studies: tritonserver is killed with SIGKILL while AnalyzeStudy clients keep calling, and
once more after it is back. Studies in flight and studies sent while it is down are refused UNAVAILABLE, never
INTERNAL and never lost; the dead server is reaped (no zombie), started again after the 1 s, then 2 s backoff,
and health is SERVING and studies are answered again without a restart of cspine."""

from __future__ import annotations

import os
import signal
import time
import urllib.request
from pathlib import Path

from grpc_health.v1 import health_pb2
from harness import Load, Row, analyze_call, health_status, metric, study_files, time_until, write_row

from cspine.gateway.tokens import Role, find_client_token
from cspine.ops.embedded import EmbeddedServer

RECOVERY_BOUND_S = 60.0  # kill → first answer of a study sent after it (measured 4–6 s on an idle machine)
WARM_UP_BOUND_S = 90.0  # the first answers before the fault (a busy machine makes them slow)
SERVING = health_pb2.HealthCheckResponse.SERVING
CLIENTS = 3  # with the default 2 in flight and 2 queued: nobody is refused for want of a place


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), None when there is no such process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def tritonserver_of(parent: int) -> int | None:
    """The pid of the running tritonserver child of ``parent`` (by its command line), None when there is none."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        try:
            program = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if stat and int(stat[1]) == parent and stat[0] not in ("Z", "X") and program.endswith("tritonserver"):
            return int(entry.name)
    return None


def group_members(pgid: int) -> list[int]:
    """Processes of process group ``pgid`` that have not exited: the server and its Python backend stubs."""
    found = []
    for entry in Path("/proc").iterdir():
        stat = _stat(int(entry.name)) if entry.name.isdigit() else None
        if stat and int(stat[2]) == pgid and stat[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def zombies_of(parent: int) -> list[int]:
    return [
        int(e.name)
        for e in Path("/proc").iterdir()
        if e.name.isdigit() and (s := _stat(int(e.name))) and int(s[1]) == parent and s[0] == "Z"
    ]


def _ready(server: EmbeddedServer) -> bool:
    try:
        url = f"http://127.0.0.1:{server.triton_ports.http}/v2/health/ready"
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def kill_triton(server: EmbeddedServer, load: Load, fault: str) -> tuple[int, float | None, float | None]:
    """SIGKILL the tritonserver of ``server`` (marking ``fault``); (its pid, seconds until it was reaped with its
    stubs, seconds until a new tritonserver is ready and health SERVING)."""
    victim = tritonserver_of(server.process.pid)
    assert victim is not None and len(group_members(victim)) > 1, "tritonserver and its stubs must run"
    load.mark(fault)
    os.kill(victim, signal.SIGKILL)
    reaped = time_until(lambda: _stat(victim) is None and not group_members(victim), 10, interval_s=0.05)

    def serving_again() -> bool:  # a new server on the same ports, ready, and the gateway SERVING
        new = tritonserver_of(server.process.pid)
        return new not in (None, victim) and _ready(server) and health_status(server.address) == SERVING

    return victim, reaped, time_until(serving_again, RECOVERY_BOUND_S, interval_s=0.2)


def test_tritonserver_killed_twice_under_analysis_load_is_restarted_with_backoff_and_no_study_is_lost(
    phantom_cases, tmp_path
):
    data = tmp_path / "data"
    with EmbeddedServer(data, tmp_path / "serve.log") as server:  # no --triton-url: its own supervised Triton
        load = Load(server.address, find_client_token(data, Role.ANALYST))
        load.add("AnalyzeStudy", analyze_call(study_files(phantom_cases["benign"])), clients=CLIENTS)
        with load:
            assert load.wait_ok("AnalyzeStudy", "start", WARM_UP_BOUND_S) is not None
            time.sleep(2)
            first, reaped, serving = kill_triton(server, load, "fault")
            recovered = load.wait_ok("AnalyzeStudy", "fault", RECOVERY_BOUND_S)
            time.sleep(2)
            restarts_after_one = metric(server.metrics_port, "cspine_triton_restarts_total")
            second, reaped_again, serving_again = kill_triton(server, load, "again")
            recovered_again = load.wait_ok("AnalyzeStudy", "again", RECOVERY_BOUND_S)
            time.sleep(2)
        restarts = metric(server.metrics_port, "cspine_triton_restarts_total")
        zombies = zombies_of(server.process.pid)
        log = server.log_path.read_text()
    summary = load.summary()
    again = "not recovered" if recovered_again is None else f"{recovered_again:.1f} s"
    write_row(
        Row(
            "Triton killed and restarted",
            "`kill -9` of the local tritonserver under load; again once it was back",
            load.describe(),
            summary,
            recovered,
            f"kill → first ok AnalyzeStudy sent after it; after the second kill (2 s backoff) {again}",
        )
    )
    print(
        f"\nkill 1: reaped {reaped} s, SERVING {serving} s, answered {recovered} s; "
        f"kill 2: reaped {reaped_again} s, SERVING {serving_again} s, answered {recovered_again} s; {summary}"
    )
    assert summary.lost_total == 0, summary.lost
    assert summary.refused_codes("AnalyzeStudy") == {"UNAVAILABLE"}, summary.refused  # the outages were seen
    refusals = [o.detail for o in load.outcomes if o.result == "refused"]
    assert all("Triton" in d for d in refusals), refusals[:3]  # naming Triton, never a partial analysis
    before = [o for o in load.outcomes if o.ended < load.marks["fault"]]
    assert before and all(o.result == "ok" for o in before), before
    for fault in ("fault", "again"):
        in_flight = load.during("AnalyzeStudy", fault, fault)
        assert in_flight and all(o.result == "ok" or o.code == "UNAVAILABLE" for o in in_flight), in_flight
    assert reaped is not None and reaped_again is not None, "a killed tritonserver is reaped with its stubs"
    assert zombies == [], f"zombie children of cspine serve: {zombies}"
    assert first != second
    assert restarts_after_one == 1 and restarts == 2, (restarts_after_one, restarts)
    assert "restarting tritonserver in 1 s (restart 1)" in log and "restarting tritonserver in 2 s (restart 2)" in log
    assert serving is not None and serving_again is not None, "health must be SERVING again"
    assert recovered is not None and recovered < RECOVERY_BOUND_S
    assert recovered_again is not None and recovered_again < RECOVERY_BOUND_S
