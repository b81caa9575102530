"""Slow clients cannot hold the service: an upload that stalls (idle timeout) or trickles (upload deadline)
is answered DEADLINE_EXCEEDED and frees its slot, so a fast client queued behind idle and trickling streams
that hold every slot still gets its analysis. read_upload alone, then a real gateway on a real Triton."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from cspine.config import GatewayConfig, IngestLimits
from cspine.fewshot.prototypes import SupportSet
from cspine.fewshot.store import SupportStore
from cspine.gateway.upload import UploadTimeoutError, UploadTimeouts, read_upload
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc
from support.server import SERVING, GatewayThread, Held, channel_to, files_of, upload, wait_for
from support.tokens import CURATOR_TOKEN

# ------------------------------------------------------------------------------------------------------
# read_upload alone


async def _stream(messages, gap_s: float, then_stall: bool):
    for message in messages:
        await asyncio.sleep(gap_s)
        yield message
    if then_stall:
        await asyncio.sleep(3600)


def _read(stream, timeouts: UploadTimeouts):
    async def go():
        start = time.monotonic()
        try:
            return await read_upload(stream, IngestLimits(), "options", timeouts), time.monotonic() - start
        except UploadTimeoutError as error:
            return error, time.monotonic() - start

    return asyncio.run(go())


def _instances(n: int) -> list[pb.StudyUpload]:
    return [pb.StudyUpload(dicom_instance=b"x" * 100) for _ in range(n)]


def test_read_upload_stops_a_stream_silent_for_the_idle_timeout_naming_the_last_message():
    error, seconds = _read(_stream(_instances(2), 0.01, then_stall=True), UploadTimeouts(deadline_s=10, idle_s=0.3))
    assert isinstance(error, UploadTimeoutError) and error.limit == "idle"
    assert str(error) == (
        "the upload sent nothing for 0.3 s after message 2 (the idle timeout; 2 messages, 200 bytes of DICOM received)"
    )
    assert 0.3 <= seconds < 1.5


def test_read_upload_stops_a_stream_that_never_sends_its_first_message():
    error, seconds = _read(_stream([], 0, then_stall=True), UploadTimeouts(deadline_s=10, idle_s=0.2))
    assert error.limit == "idle" and "nothing for 0.2 s before its first message" in str(error)
    assert 0.2 <= seconds < 1.5


def test_read_upload_stops_a_trickling_stream_at_the_upload_deadline():
    # a message every 0.1 s never trips the 0.3 s idle timeout; the 0.8 s deadline ends it
    error, seconds = _read(_stream(_instances(100), 0.1, then_stall=False), UploadTimeouts(deadline_s=0.8, idle_s=0.3))
    assert isinstance(error, UploadTimeoutError) and error.limit == "deadline"
    assert str(error).startswith("the upload was not complete within the upload deadline of 0.8 s (")
    assert 0.8 <= seconds < 2.0


def test_read_upload_reads_a_stream_that_keeps_within_both_timeouts():
    upload, seconds = _read(_stream(_instances(5), 0.1, then_stall=False), UploadTimeouts(deadline_s=3, idle_s=0.3))
    assert [name for name, _ in upload.instances] == ["#1", "#2", "#3", "#4", "#5"]
    assert upload.received_bytes == 500 and seconds < 3


@pytest.mark.parametrize(("deadline_s", "idle_s"), [(10, 0), (10, -1), (5, 10)])
def test_timeouts_must_be_positive_and_the_idle_one_within_the_deadline(deadline_s, idle_s):
    with pytest.raises(ValueError, match=f"got idle {float(idle_s)} s and deadline {float(deadline_s)} s"):
        UploadTimeouts(deadline_s=float(deadline_s), idle_s=float(idle_s))
    with pytest.raises(ValueError, match="idle_timeout_s must be > 0 and at most upload_deadline_s"):
        GatewayConfig(upload_deadline_s=deadline_s, idle_timeout_s=idle_s)


# ------------------------------------------------------------------------------------------------------
# Over the wire: idle and trickling clients hold every slot, a fast one still gets through

IDLE_S = 1.5
DEADLINE_S = 6.0


class Silent:
    """An upload that sends nothing until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __iter__(self):
        self.release.wait(60)
        return
        yield


class Trickle:
    """An upload that sends a small chunk of one instance every ``gap_s``, never the last, until released."""

    def __init__(self, data: bytes, gap_s: float = 0.5, size: int = 512) -> None:
        self.data, self.gap_s, self.size = data, gap_s, size
        self.release = threading.Event()

    def __iter__(self):
        offset = 0
        while not self.release.wait(self.gap_s) and offset + self.size < len(self.data):
            chunk = pb.DicomChunk(instance_index=0, offset=offset, data=self.data[offset : offset + self.size])
            yield pb.StudyUpload(chunk=chunk)
            offset += self.size


@pytest.fixture(scope="module")
def timed(triton, tmp_path_factory):
    store = SupportStore(f"sqlite:///{tmp_path_factory.mktemp('store') / 'support.db'}")
    store.migrate()
    store.seed_defaults(SupportSet.load())
    server = GatewayThread(
        triton.grpc_url, in_flight=3, queued=1, store=store, upload_deadline_s=DEADLINE_S, idle_timeout_s=IDLE_S
    )
    yield server
    server.close()
    store.close()


def _ended(future, ends: dict, name: str) -> None:
    future.add_done_callback(lambda _: ends.setdefault(name, time.monotonic()))


def _code(future):
    error = future.exception()
    return (grpc.StatusCode.OK, "") if error is None else (error.code(), error.details())


def test_idle_and_trickling_uploads_are_cut_off_and_a_fast_study_queued_behind_them_is_analysed(
    timed, phantom_cases, capsys
):
    xr = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
    value = timed.metrics.registry.get_sample_value
    start = time.monotonic()
    assert timed.stub.AnalyzeStudy(upload(xr), timeout=60).modalities  # warm: models loaded, its time known
    analysis_s = time.monotonic() - start

    silent, held, trickle = Silent(), Held(xr[0].read_bytes()), Trickle(xr[0].read_bytes())
    ends: dict[str, float] = {}
    try:
        start = time.monotonic()
        slow = {
            name: timed.stub.AnalyzeStudy.future(iter(stream), timeout=60)
            for name, stream in (("silent", silent), ("held", held), ("trickle", trickle))
        }
        for name, future in slow.items():
            _ended(future, ends, name)
        assert wait_for(lambda: timed.service.in_flight == 3, timeout=5), "the slow clients must hold every slot"
        arrived = time.monotonic()
        fast = timed.stub.AnalyzeStudy.future(upload(xr), timeout=60)
        _ended(fast, ends, "fast")
        assert wait_for(lambda: timed.service.queued == 1 or fast.done(), timeout=5)
        result = fast.result()
        for future in slow.values():
            future.exception()  # wait for every answer
    finally:
        for stream in (silent, held, trickle):
            stream.release.set()

    assert [m.modality for m in result.modalities] == [pb.XR]
    silent_code, silent_details = _code(slow["silent"])
    held_code, held_details = _code(slow["held"])
    trickle_code, trickle_details = _code(slow["trickle"])
    assert silent_code == held_code == trickle_code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"the upload sent nothing for {IDLE_S:g} s before its first message (the idle timeout" in silent_details
    assert f"the upload sent nothing for {IDLE_S:g} s after message 1 (the idle timeout" in held_details
    assert f"not complete within the upload deadline of {DEADLINE_S:g} s" in trickle_details
    assert "request " in trickle_details  # the request id, nothing of the study
    seconds = {name: round(end - (arrived if name == "fast" else start), 2) for name, end in ends.items()}
    with capsys.disabled():
        print(f"\nslow-client timings (s, analysis alone {analysis_s:.2f}): {seconds}")
    # generous bounds: a shared 2-core machine
    assert IDLE_S - 0.1 <= seconds["silent"] < IDLE_S + 3 and IDLE_S - 0.1 <= seconds["held"] < IDLE_S + 3
    assert DEADLINE_S - 0.1 <= seconds["trickle"] < DEADLINE_S + 3
    assert seconds["fast"] < IDLE_S + 3 * analysis_s + 3, "the fast study waits for the idle timeout, no more"
    assert ends["fast"] < ends["trickle"], "the fast study is done before the trickling upload's deadline"

    assert value("cspine_upload_timeouts_total", {"rpc": "AnalyzeStudy", "limit": "idle"}) == 2
    assert value("cspine_upload_timeouts_total", {"rpc": "AnalyzeStudy", "limit": "deadline"}) == 1
    # counted as the handler returns, a moment after the client has its status
    assert wait_for(lambda: value("cspine_requests_total", {"rpc": "AnalyzeStudy", "code": "DEADLINE_EXCEEDED"}) == 3)
    assert wait_for(lambda: timed.service.in_flight == 0 and timed.service.queued == 0)
    assert timed.status() == SERVING


def test_an_add_case_upload_that_stalls_after_its_header_is_cut_off_by_the_idle_timeout(timed):
    curator = channel_to(timed.address, CURATOR_TOKEN)
    release = threading.Event()

    def header_then_stall():
        yield spb.CaseUpload(header=spb.CaseHeader(label="benign", pathology_reference="report 1"))
        release.wait(60)

    try:
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            spb_grpc.SupportSetStub(curator).AddCase(header_then_stall(), timeout=60)
        seconds = time.monotonic() - start
    finally:
        release.set()
        curator.close()
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert f"the upload sent nothing for {IDLE_S:g} s after message 1 (the idle timeout" in caught.value.details()
    assert IDLE_S - 0.1 <= seconds < IDLE_S + 3
    value = timed.metrics.registry.get_sample_value
    assert value("cspine_upload_timeouts_total", {"rpc": "AddCase", "limit": "idle"}) == 1
    assert wait_for(lambda: timed.service.in_flight == 0)


def test_service_info_reports_the_upload_deadline_and_idle_timeout(timed):
    limits = timed.stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10).limits
    assert (limits.upload_deadline_s, limits.idle_timeout_s) == (DEADLINE_S, IDLE_S)
