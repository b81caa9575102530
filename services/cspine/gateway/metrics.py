"""Prometheus metrics of the gateway (prefix ``cspine_``), in a registry of its own, exposed on their own
port. Triton exports its ``nv_inference_*`` metrics itself; dashboards join the two."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "cspine_requests", "RPCs handled, by method and status code", ["rpc", "code"], registry=r
        )
        self.latency = Histogram(
            "cspine_request_seconds", "RPC latency, by method", ["rpc"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.stages = Histogram(
            "cspine_stage_seconds",
            "Work time per pipeline stage and study",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.triton = Histogram(
            "cspine_triton_request_seconds",
            "Triton inference calls as the gateway sees them, by model",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("cspine_studies_in_flight", "Studies being received or analysed", registry=r)
        self.received = Counter("cspine_received_bytes", "Bytes of DICOM uploads received", registry=r)
        self.prototype_set = Gauge(
            "cspine_prototype_set_info", "The prototype set analyses use (value 1)", ["version"], registry=r
        )
        self.triton_ready = Gauge("cspine_triton_ready", "1 while Triton and every model answer", registry=r)
        self.store_up = Gauge("cspine_store_up", "1 while the support store answers", registry=r)

    def publish_prototype_set(self, version: str) -> None:
        """The prototype set in use: the only series of cspine_prototype_set_info."""
        self.prototype_set.clear()
        self.prototype_set.labels(version).set(1)

    def observe_triton(self, model: str, seconds: float) -> None:
        self.triton.labels(model).observe(seconds)

    def observe_stages(self, stage_seconds: dict[str, float]) -> None:
        for stage, seconds in stage_seconds.items():
            if stage != "total":
                self.stages.labels(stage).observe(seconds)

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        """Expose /metrics over HTTP on ``port`` (a daemon thread)."""
        start_http_server(port, addr=address, registry=self.registry)
