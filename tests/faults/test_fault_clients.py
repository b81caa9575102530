"""Slow and idle clients, through ``cspine serve`` (gateway, SQLite store, the session's local Triton) with two
study slots, two queue places and short upload timeouts, on SYNTHETIC phantom studies: idle uploads (nothing
sent) and trickling ones (a small chunk every 0.5 s, never the last) take every slot and queue place, then fast
clients send a radiograph study in a loop. The slow uploads are answered DEADLINE_EXCEEDED at the idle timeout
and the upload deadline, which frees their slot; the fast studies are answered OK, or refused
RESOURCE_EXHAUSTED while the queue is full, and none is lost."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2
from harness import (
    CHANNEL_OPTIONS,
    Call,
    Load,
    Row,
    analyze_call,
    health_status,
    metric,
    study_files,
    time_until,
    write_row,
)

from cspine.client import bearer_metadata
from cspine.gateway.tokens import Role, find_client_token
from cspine.ops.embedded import EmbeddedServer
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc

IN_FLIGHT, QUEUED = 2, 2
IDLE_S, DEADLINE_S = 2.0, 6.0
HELD_S = 25.0  # how long the slow clients and the fast ones run together
RECOVERY_BOUND_S = 30.0
SLACK_S = 3.0  # a busy shared machine answers a timeout this much late, at most
# A slow upload queued behind others starts its timeout once it has a slot: at most one upload deadline (and a
# fast study's analysis) later.
QUEUE_WAIT_BOUND_S = DEADLINE_S + 5.0
SERVING = health_pb2.HealthCheckResponse.SERVING
IDLE, TRICKLING, FAST = "idle AnalyzeStudy", "trickling AnalyzeStudy", "AnalyzeStudy"


class Silent:
    """An upload that sends nothing; it ends once its call has ended (``ended``), so no thread waits on."""

    def __init__(self) -> None:
        self.ended = threading.Event()

    def __iter__(self):
        self.ended.wait(120)
        return
        yield


class Trickle:
    """An upload that sends ``size`` bytes of one instance every ``gap_s``, never its last chunk."""

    def __init__(self, data: bytes, gap_s: float = 0.5, size: int = 512) -> None:
        self.data, self.gap_s, self.size = data, gap_s, size
        self.ended = threading.Event()

    def __iter__(self):
        offset = 0
        while not self.ended.wait(self.gap_s) and offset + self.size < len(self.data):
            chunk = pb.DicomChunk(instance_index=0, offset=offset, data=self.data[offset : offset + self.size])
            yield pb.StudyUpload(chunk=chunk)
            offset += self.size


def slow_call(stream: Callable[[], Silent | Trickle]) -> Call:
    """AnalyzeStudy of a new ``stream()`` each time."""

    def call(channel, sequence, metadata, deadline_s):
        upload = stream()
        try:
            return pb_grpc.SpineAnalysisStub(channel).AnalyzeStudy(iter(upload), metadata=metadata, timeout=deadline_s)
        finally:
            upload.ended.set()

    return call


def test_idle_and_trickling_uploads_holding_every_slot_are_cut_off_in_time_and_fast_studies_get_through(
    triton, phantom_cases, tmp_path
):
    limits = ["--max-studies-in-flight", str(IN_FLIGHT), "--max-queued-studies", str(QUEUED)]
    limits += ["--idle-timeout", f"{IDLE_S:g}", "--upload-deadline", f"{DEADLINE_S:g}"]
    data = tmp_path / "data"
    xr = study_files(phantom_cases["benign"], "xr")
    with EmbeddedServer(data, tmp_path / "serve.log", ["--triton-url", triton.grpc_url, *limits]) as server:
        token = find_client_token(data, Role.ANALYST)
        with grpc.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
            start = time.monotonic()
            analyze_call(xr)(channel, 0, bearer_metadata(token), 60)  # warm: the gateway's first study
            analysis_s = time.monotonic() - start

        def places_held() -> bool:
            held = [metric(server.metrics_port, f"cspine_studies_{g}") for g in ("in_flight", "queued")]
            return held == [IN_FLIGHT, QUEUED]

        load = Load(server.address, token)
        load.add(IDLE, slow_call(Silent), clients=2)
        load.add(TRICKLING, slow_call(lambda: Trickle(xr[0].read_bytes())), clients=2)
        load.add(FAST, analyze_call(xr), clients=2, after="fault")  # arrive once the slow ones hold every place
        with load:
            held = time_until(places_held, 30, interval_s=0.05)
            assert held is not None, "the idle and trickling uploads must take every slot and queue place"
            load.mark("fault")
            recovered = load.wait_ok(FAST, "fault", RECOVERY_BOUND_S)
            time.sleep(max(0.0, load.marks["fault"] + HELD_S - time.monotonic()))
        port = server.metrics_port
        samples = {
            k: metric(port, "cspine_upload_timeouts_total", rpc="AnalyzeStudy", limit=k) for k in ("idle", "deadline")
        }
        for code in ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"):
            samples[code] = metric(port, "cspine_requests_total", rpc="AnalyzeStudy", code=code)
        emptied = time_until(lambda: metric(port, "cspine_studies_in_flight") == 0, 10)
        serving = health_status(server.address)
    summary = load.summary()
    write_row(
        Row(
            "Slow and idle clients",
            f"idle uploads (nothing sent) and trickling ones (512 bytes every 0.5 s, never the last) hold all "
            f"{IN_FLIGHT} study slots and {QUEUED} queue places; idle timeout {IDLE_S:g} s, upload deadline "
            f"{DEADLINE_S:g} s",
            load.describe(),
            summary,
            recovered,
            "every slot and queue place held → first ok AnalyzeStudy of a fast client",
        )
    )

    def timed_out(group: str) -> list:
        return [o for o in load.outcomes if o.rpc == group and o.code == "DEADLINE_EXCEEDED"]

    idle, trickling = timed_out(IDLE), timed_out(TRICKLING)
    seconds = {g: sorted(round(o.ended - o.started, 1) for o in timed_out(g)) for g in (IDLE, TRICKLING)}
    print(
        f"\nanalysis alone {analysis_s:.2f} s; places held after {held:.2f} s; first fast ok {recovered} s after; "
        f"timed out after (s): {seconds}; server counters {samples}; {summary}"
    )
    assert summary.lost_total == 0, summary.lost
    assert not summary.answered.get(IDLE) and not summary.answered.get(TRICKLING), summary.answered
    for group in (IDLE, TRICKLING):
        assert "DEADLINE_EXCEEDED" in summary.refused_codes(group), summary.refused
        assert summary.refused_codes(group) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, summary.refused
    assert summary.refused_codes(FAST) <= {"RESOURCE_EXHAUSTED"}, summary.refused
    assert summary.answered.get(FAST, 0) >= 2, summary.answered
    full = [o.detail for o in load.outcomes if o.code == "RESOURCE_EXHAUSTED"]
    assert all(d.startswith("the service is analysing ") for d in full), full[:3]
    assert all(f"sent nothing for {IDLE_S:g} s before its first message (the idle timeout" in o.detail for o in idle)
    assert all(f"not complete within the upload deadline of {DEADLINE_S:g} s" in o.detail for o in trickling)
    # Never before the configured time; at it (plus a busy machine's lag) when the upload had a slot at once,
    # and at most a queue wait later when it had to wait for one.
    for group, limit in ((IDLE, IDLE_S), (TRICKLING, DEADLINE_S)):
        assert limit - 0.1 <= seconds[group][0] <= limit + SLACK_S, seconds
        assert seconds[group][-1] <= limit + QUEUE_WAIT_BOUND_S + SLACK_S, seconds
        assert statistics.median(seconds[group]) <= limit + QUEUE_WAIT_BOUND_S, seconds
    # The server counted what the clients saw: every timeout, every refusal, every answer (and the warm-up).
    assert (samples["idle"], samples["deadline"]) == (len(idle), len(trickling)), samples
    assert samples["DEADLINE_EXCEEDED"] == len(idle) + len(trickling), samples
    assert samples["RESOURCE_EXHAUSTED"] == len(full) and samples["OK"] == summary.answered[FAST] + 1, samples
    assert emptied is not None and serving == SERVING, "slots freed and the server SERVING afterwards"
    assert recovered is not None and recovered < RECOVERY_BOUND_S
