"""A crash of the local Triton under a real ``cspine serve``: tritonserver killed with SIGKILL is reaped, its
Python backend stubs end, it is started again on the same ports and the gateway serves again without a restart;
the study in flight gets UNAVAILABLE. A stub that dies ends its server (restarted too), a restart whose models
do not load is retried, and nothing of Triton outlives a killed ``cspine serve``."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cspine.config import TritonClientConfig
from cspine.errors import TritonUnavailableError
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository, restart_delay
from cspine.inference.specs import SERVED
from cspine.ops.embedded import EmbeddedServer
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from support.server import files_of, seconds_until, upload, wait_for
from support.tokens import served_metadata

STUB = "triton_python_backend_stub"
SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Proc:
    pid: int
    state: str
    ppid: int
    pgid: int
    program: str
    cpu_ticks: int


def processes() -> list[Proc]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            program = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        ticks = int(stat[11]) + int(stat[12])  # utime + stime
        found.append(Proc(int(entry.name), stat[0], int(stat[1]), int(stat[2]), program, ticks))
    return found


def cpu_ticks(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) + int(stat[12])


def tritonserver_of(parent: int) -> Proc | None:
    return next((p for p in processes() if p.ppid == parent and p.program.endswith("tritonserver")), None)


def live_stubs_of(server: int) -> list[Proc]:
    """Stubs started by ``server`` (its process group, or its children) that have not exited."""
    return [p for p in processes() if STUB in p.program and server in (p.pgid, p.ppid) and p.state not in ("Z", "X")]


def is_zombie(pid: int) -> bool:
    try:
        return "State:\tZ" in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    data = tmp_path_factory.mktemp("serve")
    with EmbeddedServer(data / "data", data / "serve.log") as server:
        channel = grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", 256 << 20)])
        server.stub = pb_grpc.SpineAnalysisStub(channel)
        server.health = health_pb2_grpc.HealthStub(channel)
        server.metadata = served_metadata(data / "data")
        yield server
        channel.close()


def _serving(server) -> bool:
    try:
        return server.health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == SERVING
    except grpc.RpcError:
        return False


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class HealthLog:
    """The gateway's health, asked every 0.1 s in a thread: when it was last NOT_SERVING, when SERVING after."""

    def __init__(self, server) -> None:
        self.server, self.start = server, time.monotonic()
        self.not_serving: float | None = None
        self.serving_again: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic() - self.start
            if not _serving(self.server):
                self.not_serving, self.serving_again = now, None
            elif self.not_serving is not None and self.serving_again is None:
                self.serving_again = now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_restart_delays_double_from_one_second_up_to_thirty():
    assert [restart_delay(n) for n in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]
    assert restart_delay(10_000) == 30


@pytest.mark.slow
def test_a_killed_tritonserver_is_reaped_its_stubs_end_and_serving_resumes(serve, phantom_cases):
    server = tritonserver_of(serve.process.pid)
    assert server is not None and len(live_stubs_of(server.pid)) == 5
    busy = sum(p.cpu_ticks for p in live_stubs_of(server.pid))
    in_flight = serve.stub.AnalyzeStudy.future(
        upload(files_of(phantom_cases["benign"])), timeout=120, metadata=serve.metadata
    )
    # Kill once a stub is running a model: the study is then inside a Triton call.
    assert wait_for(lambda: sum(p.cpu_ticks for p in live_stubs_of(server.pid)) > busy + 10, timeout=60)
    assert not in_flight.done()
    os.kill(server.pid, signal.SIGKILL)
    killed = time.monotonic()
    health = HealthLog(serve)
    reaped = seconds_until(lambda: not Path(f"/proc/{server.pid}").exists() and not is_zombie(server.pid), timeout=3)
    assert reaped is not None, "tritonserver must be reaped, not left a zombie"
    stubs_gone = seconds_until(lambda: not live_stubs_of(server.pid), timeout=5)
    assert stubs_gone is not None, f"stubs of the killed server outlive it: {live_stubs_of(server.pid)}"

    error = in_flight.exception(timeout=60)
    assert error is not None and error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "Triton" in error.details()

    def restarted() -> bool:
        new = tritonserver_of(serve.process.pid)
        ready = f"http://127.0.0.1:{serve.triton_ports.http}/v2/health/ready"  # the same ports as before
        return new is not None and new.pid != server.pid and _http_ok(ready)

    triton_back = seconds_until(restarted, timeout=150, step=0.2)
    assert triton_back is not None, "Triton must be started again on its ports"
    # The gateway asks Triton every 2 s: SERVING again within a few seconds (if it noticed the crash at all).
    assert wait_for(lambda: health.not_serving is None or health.serving_again is not None, timeout=10)
    assert wait_for(lambda: _serving(serve), timeout=10)
    xr = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
    result = serve.stub.AnalyzeStudy(upload(xr), timeout=120, metadata=serve.metadata)
    assert [m.modality for m in result.modalities] == [pb.XR] and result.modalities[0].assessment.status == pb.ASSESSED
    analysed = time.monotonic() - killed
    health.close()

    with urllib.request.urlopen(f"http://127.0.0.1:{serve.metrics_port}/metrics", timeout=5) as response:
        assert "cspine_triton_restarts_total 1.0" in response.read().decode()
    log = serve.log_path.read_text()
    assert "tritonserver exited unexpectedly (killed by SIGKILL)" in log and "tritonserver restarted" in log
    print(
        f"\nkill -> tritonserver reaped {reaped:.2f} s, old stubs gone {stubs_gone:.2f} s, Triton ready again "
        f"{triton_back:.1f} s, NOT_SERVING last seen {health.not_serving} s, SERVING again {health.serving_again} s, "
        f"first analysis answered {analysed:.1f} s"
    )


@pytest.mark.slow
def test_nothing_of_triton_outlives_a_killed_cspine_serve(serve):
    server = tritonserver_of(serve.process.pid)
    assert server is not None and live_stubs_of(server.pid)
    serve.process.send_signal(signal.SIGKILL)
    serve.process.wait(timeout=10)

    def gone() -> bool:
        alive = [p for p in processes() if server.pid in (p.pid, p.pgid) and p.state not in ("Z", "X")]
        return not alive

    lingered = seconds_until(gone, timeout=10)
    assert lingered is not None, "tritonserver or its stubs outlive cspine serve"
    print(f"\nserve SIGKILL -> tritonserver and stubs gone within {lingered:.2f} s")


@pytest.mark.slow
def test_a_dead_stub_restarts_triton_and_a_restart_whose_model_does_not_load_is_retried(tmp_path, caplog):
    repository = tmp_path / "repository"
    shutil.copytree(default_repository(), repository, ignore=shutil.ignore_patterns("__pycache__"))
    restarts = []
    triton = LocalTriton(repository, TritonPorts.free(), supervise=True, on_restart=lambda: restarts.append(1))
    model = repository / "seg_xr" / "1" / "model.onnx"
    spec = SERVED["seg_ct"]
    slices = {t.name: np.zeros((256, *t.shape), np.float32) for t in spec.inputs}

    async def kill_the_stub_in_flight(server: int) -> None:
        stub = next(p for p in live_stubs_of(server) if "/seg_ct/" in Path(f"/proc/{p.pid}/cmdline").read_text())
        async with TritonClient(triton.grpc_url, TritonClientConfig(timeout_s=60)) as client:
            call = asyncio.create_task(client.infer(spec, slices))
            while cpu_ticks(stub.pid) < stub.cpu_ticks + 10:  # until it has run the model for 0.1 s
                await asyncio.sleep(0.02)
            os.kill(stub.pid, signal.SIGKILL)  # as the OOM killer would: Triton itself stays up
            with pytest.raises(TritonUnavailableError, match="seg_ct"):
                await call

    with caplog.at_level(logging.WARNING, logger="cspine.triton"), triton:
        first = triton.process.pid
        model.rename(model.with_suffix(".hidden"))  # the next start fails: seg_xr does not load
        asyncio.run(kill_the_stub_in_flight(first))
        assert wait_for(lambda: not Path(f"/proc/{first}").exists(), timeout=5), "the server of a dead stub is ended"
        assert wait_for(lambda: len(restarts) >= 2, timeout=60), "a failed restart must be tried again"
        model.with_suffix(".hidden").rename(model)
        assert wait_for(lambda: "tritonserver restarted" in caplog.text, timeout=90)
        assert triton.process.pid != first and triton.process.poll() is None
        assert not live_stubs_of(first)
    assert "a Python backend stub of tritonserver died" in caplog.text
    failed = [r.getMessage() for r in caplog.records if "restart 1 failed" in r.getMessage()]
    assert failed and "model seg_xr did not load" in failed[0]
    assert "restarting tritonserver in 2 s (restart 2)" in caplog.text, "the delay doubles after a failed restart"
