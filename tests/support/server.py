"""A real gateway (grpc.aio) in-process on a free port, channels that carry a bearer token, the study uploads the
tests send, free ports, and polling until something holds."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cspine.config import AnalysisConfig, GatewayConfig, IngestLimits, TritonClientConfig
from cspine.gateway.metrics import Metrics
from cspine.gateway.server import start_gateway
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import default_repository, free_ports
from cspine.service import AnalysisService
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from support.tokens import ANALYST_TOKEN, TOKENS, Bearer

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def free_port() -> int:
    return free_ports(1)[0]


def channel_to(
    address: str, token: str | None = ANALYST_TOKEN, credentials: grpc.ChannelCredentials | None = None
) -> grpc.Channel:
    """A channel to ``address`` (TLS with ``credentials``, else insecure) that sends ``token`` on every call (none
    when ``token`` is None)."""
    options = [("grpc.max_receive_message_length", 256 << 20)]
    if credentials is None:
        channel = grpc.insecure_channel(address, options=options)
    else:
        channel = grpc.secure_channel(address, credentials, options=options)
    return grpc.intercept_channel(channel, Bearer(token)) if token else channel


class GatewayThread:
    """A real gateway (grpc.aio) on its own event loop thread, on a free port, accepting ``support.tokens``; TLS
    with ``tls`` (the server's credentials, and the channel credentials of its own ``channel``)."""

    def __init__(
        self,
        triton_url: str,
        *,
        limits=IngestLimits(),
        in_flight: int = 2,
        queued: int = 0,
        health_interval_s=2.0,
        store=None,
        tls: tuple[grpc.ServerCredentials, grpc.ChannelCredentials] | None = None,
        **config,  # more GatewayConfig fields (upload_deadline_s, idle_timeout_s …)
    ):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.metrics = Metrics()

        async def start():
            observer = self.metrics.observe_triton
            self.client = TritonClient(triton_url, TritonClientConfig(timeout_s=60.0), observer=observer)
            analysis = AnalysisConfig(limits=limits, max_studies_in_flight=in_flight, max_queued_studies=queued)
            self.service = AnalysisService(self.client, default_repository(), analysis, store=store)
            gateway_config = GatewayConfig(port=0, metrics_port=None, health_interval_s=health_interval_s, **config)
            credentials = None if tls is None else tls[0]
            return await start_gateway(self.service, gateway_config, self.metrics, TOKENS, credentials)

        self.gateway = self.call(start())
        self.address = f"127.0.0.1:{self.gateway.port}"
        self.channel = channel_to(self.address, credentials=None if tls is None else tls[1])
        self.stub = pb_grpc.SpineAnalysisStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def call(self, coroutine, timeout=120):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def status(self) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service="cspine.v1.SpineAnalysis")).status

    def close(self):
        self.channel.close()
        self.call(self.gateway.stop(1.0))
        self.call(self.client.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def files_of(case) -> list[Path]:
    """Every DICOM file of a written phantom case (CT, MR, XR)."""
    return sorted(p for folder in ("ct", "mr", "xr") for p in (case.path / folder).glob("*.dcm"))


def upload(paths: Iterable[Path], options=None) -> Iterator[pb.StudyUpload]:
    """An AnalyzeStudy request stream: the options first when given, then one message per file."""
    if options is not None:
        yield pb.StudyUpload(options=options)
    for path in paths:
        yield pb.StudyUpload(dicom_instance=Path(path).read_bytes())


class Held:
    """An upload that sends one instance, then waits until released (or forever)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.release = threading.Event()

    def __iter__(self):
        yield pb.StudyUpload(dicom_instance=self.data)
        self.release.wait(60)


def seconds_until(condition: Callable[[], bool], timeout: float, step: float = 0.05) -> float | None:
    """Seconds until ``condition()`` held (polled every ``step``), None when it did not within ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(step)
    return None


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, step: float = 0.05) -> bool:
    """Whether ``condition()`` held within ``timeout``."""
    return seconds_until(condition, timeout, step) is not None
