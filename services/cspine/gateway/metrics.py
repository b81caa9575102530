"""Prometheus metrics of the gateway (prefix ``cspine_``), in a registry of its own, exposed on their own
port. Triton exports its ``nv_inference_*`` metrics itself; dashboards join the two.

The same port answers ``GET /ready``: 200 while the gateway is SERVING, 503 otherwise. Kubernetes' gRPC
probes cannot speak TLS, so the Helm chart's readiness probe asks this plain-HTTP endpoint instead."""

from __future__ import annotations

import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

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
        self.queued = Gauge("cspine_studies_queued", "Studies waiting for a free slot, upload unread", registry=r)
        self.received = Counter("cspine_received_bytes", "Bytes of DICOM uploads received", registry=r)
        self.upload_timeouts = Counter(
            "cspine_upload_timeouts",
            "Uploads ended with DEADLINE_EXCEEDED for being too slow, by method and limit (idle, deadline)",
            ["rpc", "limit"],
            registry=r,
        )
        self.prototype_set = Gauge(
            "cspine_prototype_set_info", "The prototype set analyses use (value 1)", ["version"], registry=r
        )
        self.triton_ready = Gauge("cspine_triton_ready", "1 while Triton and every model answer", registry=r)
        self.triton_restarts = Counter(
            "cspine_triton_restarts",
            "Restarts of the local Triton of cspine serve after it exited on its own (every try counts)",
            registry=r,
        )
        self.store_up = Gauge("cspine_store_up", "1 while the support store answers", registry=r)
        # The DICOM node's (dicomnet/), when it runs.
        self.dicom_associations = Counter(
            "cspine_dicom_associations",
            "DICOM associations, by outcome (accepted, rejected: calling AE title; refused: peer address)",
            ["outcome"],
            registry=r,
        )
        self.dicom_instances = Counter(
            "cspine_dicom_instances_received", "Instances stored by the DICOM node, by interface", ["via"], registry=r
        )
        self.dicom_studies = Counter(
            "cspine_dicom_studies",
            "Studies the DICOM node finished, by outcome (analysed; not_analysed: an SR says why)",
            ["outcome"],
            registry=r,
        )
        self.dicom_deliveries = Counter(
            "cspine_dicom_deliveries",
            "Result objects sent to destinations, by destination and outcome",
            ["destination", "outcome"],
            registry=r,
        )
        self.dicom_outbox_depth = Gauge(
            "cspine_dicom_outbox_depth", "Result objects waiting for a destination", registry=r
        )
        self.dicom_pending = Gauge("cspine_dicom_studies_pending", "Studies received and not analysed yet", registry=r)
        self.serving = False  # the gateway's health, set by its health tracker: what /ready answers

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

    def app(self):
        """The WSGI app: ``/ready`` answers from ``serving``; any other path, the metrics."""
        metrics = make_wsgi_app(self.registry)

        def app(environ, start_response):
            if environ.get("PATH_INFO") == "/ready":
                status, body = (
                    ("200 OK", b"SERVING\n") if self.serving else ("503 Service Unavailable", b"NOT_SERVING\n")
                )
                start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
                return [body]
            return metrics(environ, start_response)

        return app

    def serve(self, port: int, address: str = "0.0.0.0") -> int:
        """Expose /metrics and /ready over HTTP on ``port`` (0: a free one) in a daemon thread; the port."""
        server = make_server(address, port, self.app(), ThreadingWSGIServer, handler_class=_QuietHandler)
        threading.Thread(target=server.serve_forever, name="cspine-metrics", daemon=True).start()
        return server.server_port


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args) -> None:  # probes every few seconds: no access log on stderr
        pass
