"""The gateway's grpc.aio server: a factory (``create_server`` → (server, port)) apart from running it
(``run_gateway``: health tracking Triton, metrics endpoint, SIGTERM drain)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cspine.config import GatewayConfig
from cspine.gateway.auth import AuthInterceptor
from cspine.gateway.interceptors import GatewayInterceptor
from cspine.gateway.metrics import Metrics
from cspine.gateway.servicer import SpineAnalysisServicer, SupportSetServicer
from cspine.gateway.tokens import TokenStore
from cspine.gateway.upload import UploadTimeouts
from cspine.service import AnalysisService
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["SpineAnalysis"].full_name,
    spb.DESCRIPTOR.services_by_name["SupportSet"].full_name,
)


def create_server(
    service: AnalysisService,
    config: GatewayConfig,
    metrics: Metrics,
    health_servicer: health.aio.HealthServicer,
    tokens: TokenStore,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A configured, not yet started server and the port it is bound to (TLS when ``credentials``)."""
    # The gateway's interceptor is the outer one, so refused calls still get a request id and are counted.
    server = grpc.aio.server(
        interceptors=[GatewayInterceptor(metrics), AuthInterceptor(tokens)],
        options=[
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", 256 * MiB),  # SEG and SR of a large CT
        ],
    )
    timeouts = UploadTimeouts(deadline_s=config.upload_deadline_s, idle_s=config.idle_timeout_s)
    pb_grpc.add_SpineAnalysisServicer_to_server(
        SpineAnalysisServicer(service, metrics, config.max_message_bytes, timeouts), server
    )
    spb_grpc.add_SupportSetServicer_to_server(SupportSetServicer(service, metrics, timeouts), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {config.host}:{config.port}")
    return server, port


async def track_health(
    service: AnalysisService, health_servicer: health.aio.HealthServicer, metrics: Metrics, interval_s: float
) -> None:
    """The health of each service, checked every ``interval_s``. The overall one ("", which ``/ready`` follows)
    and SpineAnalysis are SERVING while Triton and every model answer: a replica whose support store is down
    still analyses, with the prototype set it holds. SupportSet is SERVING while the store answers too (AddCase
    also analyses), NOT_SERVING while it does not."""
    analysis, support = SERVICE_NAMES
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    last = None
    while True:
        ready = await service.ready()
        up = {"": ready.triton, analysis: ready.triton, support: ready.triton and ready.store}
        for name, answers in up.items():
            await health_servicer.set(name, serving if answers else not_serving)
        metrics.serving = ready.triton
        metrics.triton_ready.set(1 if ready.triton else 0)
        metrics.store_up.set(1 if ready.store else 0)
        if (ready.triton, ready.store) != last:
            if not ready.triton:
                logger.info("health: NOT_SERVING (Triton is not ready)")
            elif not ready.store:
                logger.info("health: SERVING analyses; SupportSet NOT_SERVING (the support store does not answer)")
            else:
                logger.info("health: SERVING")
            last = (ready.triton, ready.store)
        await asyncio.sleep(interval_s)


@dataclass
class Gateway:
    """A started gateway: its server, port and health, until ``stop``."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    watcher: asyncio.Task
    metrics: Metrics

    async def stop(self, grace_s: float) -> None:
        """Stop taking studies (health NOT_SERVING), let those in flight finish within ``grace_s``."""
        self.watcher.cancel()
        self.metrics.serving = False
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_gateway(
    service: AnalysisService,
    config: GatewayConfig,
    metrics: Metrics,
    tokens: TokenStore,
    credentials: grpc.ServerCredentials | None = None,
) -> Gateway:
    health_servicer = health.aio.HealthServicer()
    server, port = create_server(service, config, metrics, health_servicer, tokens, credentials)
    metrics.publish_prototype_set(service.prototypes.version)
    metrics.queued.set_function(lambda: service.queued)
    service.on_prototypes = metrics.publish_prototype_set
    for name in ("", *SERVICE_NAMES):  # until the first check says otherwise
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    watcher = asyncio.create_task(track_health(service, health_servicer, metrics, config.health_interval_s))
    return Gateway(server, port, health_servicer, watcher, metrics)


async def run_gateway(
    service: AnalysisService,
    config: GatewayConfig,
    metrics: Metrics,
    tokens: TokenStore,
    credentials: grpc.ServerCredentials | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain."""
    gateway = await start_gateway(service, config, metrics, tokens, credentials)
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port, config.host)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    logger.info(
        "cspine gateway on %s:%d (metrics %s)",
        config.host,
        gateway.port,
        "off" if config.metrics_port is None else f":{config.metrics_port}",
    )
    logger.info(
        "uploads: deadline %g s (a study of max_study_bytes needs %.1f Mbit/s), idle timeout %g s",
        config.upload_deadline_s,
        service.limits.max_study_bytes * 8 / config.upload_deadline_s / 1e6,
        config.idle_timeout_s,
    )
    await stop.wait()
    logger.info("draining: %d studies in flight, grace %.0f s", service.in_flight, config.grace_s)
    await gateway.stop(config.grace_s)
    logger.info("stopped")
