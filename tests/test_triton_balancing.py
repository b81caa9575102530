"""How the gateway spreads Triton calls over several Triton pods (the Helm chart's headless service): gRPC's
round_robin over every address a name resolves to, and a fresh channel (a fresh lookup) every ``reconnect_s``.
Two real gRPC servers answering Triton's ServerReady stand in for two Triton pods; the ``ipv4:`` target lists
both addresses the way DNS lists a headless service's pods."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from cspine.config import TritonClientConfig
from cspine.inference.client import TritonClient


class ReadyServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, name: str, calls: Counter, peers: set) -> None:
        self.name, self.calls, self.peers = name, calls, peers

    async def ServerReady(self, request, context):
        self.calls[self.name] += 1
        self.peers.add(context.peer())
        return service_pb2.ServerReadyResponse(ready=True)


async def start_pods(count: int, calls: Counter, peers: set) -> tuple[list[grpc.aio.Server], list[int]]:
    servers, ports = [], []
    for i in range(count):
        server = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(ReadyServicer(f"pod-{i}", calls, peers), server)
        ports.append(server.add_insecure_port("127.0.0.1:0"))
        await server.start()
        servers.append(server)
    return servers, ports


async def ready_calls(round_robin: bool, calls_to_make: int = 40) -> Counter:
    calls: Counter = Counter()
    servers, ports = await start_pods(2, calls, set())
    target = "ipv4:" + ",".join(f"127.0.0.1:{p}" for p in ports)
    try:
        async with TritonClient(target, TritonClientConfig(round_robin=round_robin)) as client:
            for _ in range(calls_to_make):
                assert await client.server_ready(timeout_s=5)
    finally:
        for server in servers:
            await server.stop(None)
    return calls


def test_round_robin_spreads_calls_evenly_over_every_resolved_address():
    calls = asyncio.run(ready_calls(round_robin=True))
    assert sum(calls.values()) == 40
    assert min(calls["pod-0"], calls["pod-1"]) >= 15  # the first calls may go out before both are connected


def test_without_round_robin_one_long_lived_connection_takes_every_call():
    calls = asyncio.run(ready_calls(round_robin=False))
    assert sorted(calls.values()) == [40]


def test_the_client_opens_a_fresh_channel_after_reconnect_seconds_and_retires_the_old_one():
    """A fresh channel resolves the name again (pods the autoscaler added); calls keep succeeding across the
    switch, and the old channel is closed once calls on it have had ``timeout_s``."""

    async def run() -> None:
        calls: Counter = Counter()
        servers, ports = await start_pods(1, calls, set())
        try:
            config = TritonClientConfig(reconnect_s=0.3, timeout_s=0.5)
            async with TritonClient(f"127.0.0.1:{ports[0]}", config) as client:
                first = client.client
                assert await client.server_ready(timeout_s=5) and client.client is first
                await asyncio.sleep(0.4)
                assert await client.server_ready(timeout_s=5)
                second = client.client
                assert second is not first and len(client._retiring) == 1
                await asyncio.sleep(0.7)
                assert not client._retiring  # the old channel was closed
                assert await client.server_ready(timeout_s=5)
            assert calls["pod-0"] == 3
        finally:
            for server in servers:
                await server.stop(None)

    asyncio.run(run())


def test_reconnect_seconds_must_be_positive():
    with pytest.raises(ValueError, match="reconnect_s must be positive"):
        TritonClientConfig(reconnect_s=0)
