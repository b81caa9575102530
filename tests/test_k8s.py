"""`cspine k8s status` against a stand-in API server: a real HTTP server on 127.0.0.1 that answers the Kubernetes
API paths the official client calls, from fixtures in the API server's formats (tests/fixtures/k8s), filters lists
by label selector as the API server does, and answers Triton's ready endpoint on the pod-proxy path with what
Triton 2.51 answers (200 and an empty body; 400 and {"error":"Model version not ready"}). Not a live cluster."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml
from kubernetes import client

from cspine.cli import main
from cspine.inference.specs import SERVED
from cspine.ops import k8s
from support import helm

FIXTURES = Path(__file__).parent / "fixtures" / "k8s"
ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "cspine"
TOKEN = "operator-token-for-tests"
NOW = datetime(2025, 6, 4, 10, 0, 0, tzinfo=UTC)
MODELS = tuple(SERVED)

TRITON_A = "cspine-triton-7c9d6b5f4-2xk4q"  # ready in every scenario
TRITON_B = "cspine-triton-7c9d6b5f4-h8v6n"  # degraded: restarted twice (OOMKilled), seg_xr not ready
TRITON_C = "cspine-triton-7c9d6b5f4-w5nkc"  # degraded: running, Triton not listening yet
TRITON_D = "cspine-triton-7c9d6b5f4-p3jzt"  # degraded: Pending, building plans (Init:1/2)
CANARY = "canary-cspine-triton-6b7d8f9c5-r2sdl"  # another release in the same namespace, never ready


def _status_object(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    """A metav1.Status as the API server writes it for a failed request."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


def _selected(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based label selectors (k=v, k==v, k!=v), as the API server reads them; others are refused."""
    for requirement in filter(None, selector.split(",")):
        match = re.fullmatch(r"([\w./-]+)\s*(==|=|!=)\s*([\w.-]*)", requirement)
        if match is None:
            raise ValueError(f"unable to parse requirement: {requirement!r}")
        key, op, value = match.groups()
        if (labels.get(key) == value) != (op != "!="):
            return False
    return True


@dataclass(frozen=True)
class Seen:
    raw_path: str  # as sent
    path: str  # decoded, as the API server routes it (Go's net/http hands it the unescaped path)
    query: dict[str, list[str]]
    authorization: str | None


class FakeApiServer:
    """The API server's side of the calls `cspine k8s status` makes, over real HTTP."""

    def __init__(self, pods: str, hpas: str, triton: str | None = None, token: str | None = None) -> None:
        self.pods = json.loads((FIXTURES / pods).read_text())
        self.hpas = json.loads((FIXTURES / hpas).read_text())
        self.triton = json.loads((FIXTURES / triton).read_text()) if triton else {}
        self.token = token
        self.seen: list[Seen] = []
        self.routes = (
            (r"/api/v1/namespaces/(?P<namespace>[^/]+)/pods", self.list_pods),
            (
                r"/api/v1/namespaces/(?P<namespace>[^/]+)/pods/(?P<pod>[^/:]+):(?P<port>\d+)"
                r"/proxy/v2/models/(?P<model>[^/]+)/ready",
                self.triton_ready,
            ),
            (r"/apis/autoscaling/v2/namespaces/(?P<namespace>[^/]+)/horizontalpodautoscalers", self.list_hpas),
            (
                r"/apis/autoscaling/v2/namespaces/(?P<namespace>[^/]+)/horizontalpodautoscalers/(?P<name>[^/]+)",
                self.get_hpa,
            ),
        )
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.http.api = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.http.shutdown()
        self.http.server_close()

    def answer(self, target: str, authorization: str | None) -> tuple[int, str, bytes]:
        split = urlsplit(target)
        path, query = unquote(split.path), parse_qs(split.query)
        self.seen.append(Seen(split.path, path, query, authorization))
        if self.token is not None and authorization != f"Bearer {self.token}":
            return self.json(401, _status_object(401, "Unauthorized", "Unauthorized"))
        for pattern, handler in self.routes:
            match = re.fullmatch(pattern, path)
            if match:
                try:
                    return handler(query=query, **match.groupdict())
                except ValueError as exc:
                    return self.json(400, _status_object(400, "BadRequest", str(exc)))
        return self.json(404, _status_object(404, "NotFound", "the server could not find the requested resource"))

    @staticmethod
    def json(code: int, body: dict) -> tuple[int, str, bytes]:
        return code, "application/json", json.dumps(body).encode()

    def _list(self, listing: dict, namespace: str, query: dict) -> dict:
        selector = query.get("labelSelector", [""])[0]
        items = [
            item
            for item in listing["items"]
            if item["metadata"]["namespace"] == namespace and _selected(selector, item["metadata"].get("labels", {}))
        ]
        return {**listing, "items": items}

    def list_pods(self, namespace: str, query: dict) -> tuple[int, str, bytes]:
        return self.json(200, self._list(self.pods, namespace, query))

    def list_hpas(self, namespace: str, query: dict) -> tuple[int, str, bytes]:
        return self.json(200, self._list(self.hpas, namespace, query))

    def get_hpa(self, namespace: str, name: str, query: dict) -> tuple[int, str, bytes]:
        for item in self.hpas["items"]:
            if item["metadata"]["namespace"] == namespace and item["metadata"]["name"] == name:
                return self.json(200, {"kind": "HorizontalPodAutoscaler", "apiVersion": "autoscaling/v2", **item})
        details = {"name": name, "group": "autoscaling", "kind": "horizontalpodautoscalers"}
        message = f'horizontalpodautoscalers.autoscaling "{name}" not found'
        return self.json(404, _status_object(404, "NotFound", message, details))

    def triton_ready(self, namespace: str, pod: str, port: str, model: str, query: dict) -> tuple[int, str, bytes]:
        found = [
            p for p in self.pods["items"] if p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == pod
        ]
        if not found:
            details = {"name": pod, "kind": "pods"}
            return self.json(404, _status_object(404, "NotFound", f'pods "{pod}" not found', details))
        status = found[0]["status"]
        triton = next(c for c in status["containerStatuses"] if c["name"] == "triton")
        if not triton.get("started") or "running" not in triton["state"]:
            # Triton opens its HTTP port once its models are loaded; until then the API server's dial fails.
            message = f"error trying to reach service: dial tcp {status['podIP']}:{port}: connect: connection refused"
            return self.json(503, _status_object(503, "ServiceUnavailable", message))
        answer = self.triton.get(pod, {}).get(model, {"status": 200, "contentType": "text/plain", "body": ""})
        return answer["status"], answer["contentType"], answer["body"].encode()

    def proxied(self, pod: str) -> list[str]:
        """The models asked about on one pod, in order."""
        prefix = f"/api/v1/namespaces/{NAMESPACE}/pods/{pod}:8000/proxy/v2/models/"
        return [s.path[len(prefix) :].removesuffix("/ready") for s in self.seen if s.path.startswith(prefix)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        code, content_type, body = self.server.api.answer(self.path, self.headers.get("Authorization"))
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def write_kubeconfig(path: Path, server: str, token: str = TOKEN, namespace: str = NAMESPACE) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "ops",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "operator", "user": {"token": token}}],
                "contexts": [
                    {"name": "ops", "context": {"cluster": "fake", "user": "operator", "namespace": namespace}}
                ],
            }
        )
    )
    return path


def run_cli(capsys: pytest.CaptureFixture, kubeconfig: Path, *extra: str) -> tuple[int, str, str]:
    code = main(["k8s", "status", "--kubeconfig", str(kubeconfig), *extra])
    out, err = capsys.readouterr()
    return code, out, err


def gather(server: FakeApiServer) -> k8s.ReleaseStatus:
    with client.ApiClient(k8s.prepare(client.Configuration(host=server.url))) as api:
        return k8s.gather_status(api, NAMESPACE, "cspine", MODELS, NOW)


# --- against the stand-in API server ------------------------------------------------------------------------


def test_gather_reads_pods_models_and_hpas_from_the_api_objects():
    with FakeApiServer("pods-healthy.json", "hpas-healthy.json") as server:
        status = gather(server)
    names = [p.name for p in status.pods]
    assert names == [
        TRITON_A,
        "cspine-triton-7c9d6b5f4-h8v6n",
        "cspine-gateway-5f8b9d7c6d-m4tzr",
        "cspine-gateway-5f8b9d7c6d-x7plq",
    ]
    a = status.pods[0]
    assert (a.component, a.phase, a.status, a.ready) == ("triton", "Running", "Running", True)
    assert (a.containers_ready, a.containers_total, a.restarts, a.node) == (1, 1, 0, "gpu-node-a1")
    assert a.age_seconds == int((NOW - datetime(2025, 6, 2, 8, 14, 9, tzinfo=UTC)).total_seconds())
    assert a.models == tuple(k8s.ModelReadiness(m, True, "") for m in MODELS)
    assert status.pods[2].models == ()  # gateway pods have no models to ask about
    triton, gateway = status.hpas
    assert (triton.name, triton.scale_target) == ("cspine-triton", "Deployment/cspine-triton")
    assert (triton.current_replicas, triton.desired_replicas, triton.min_replicas, triton.max_replicas) == (2, 2, 1, 4)
    assert triton.metrics == (
        k8s.MetricState("triton_queue_us_per_request", "Pods", "AverageValue", "20k", "4210500m", 20000.0, 4210.5),
    )
    assert gateway.metrics[0].current_value == 0.5 and gateway.metrics[0].target_value == 2.0
    assert [c.type for c in triton.conditions] == ["AbleToScale", "ScalingActive", "ScalingLimited"]
    assert k8s.judge(status) == k8s.Verdict(problems=(), notes=())


def test_server_receives_the_charts_label_selectors_and_pod_proxy_paths():
    with FakeApiServer("pods-healthy.json", "hpas-healthy.json") as server:
        gather(server)
    selectors = [s.query["labelSelector"][0] for s in server.seen if "labelSelector" in s.query]
    assert selectors == [
        "app.kubernetes.io/name=cspine,app.kubernetes.io/instance=cspine,app.kubernetes.io/component=triton",
        "app.kubernetes.io/name=cspine,app.kubernetes.io/instance=cspine,app.kubernetes.io/component=gateway",
        "app.kubernetes.io/name=cspine,app.kubernetes.io/instance=cspine",
    ]
    assert server.proxied(TRITON_A) == list(MODELS)
    # The path kubectl would send (`kubectl get --raw .../pods/POD:8000/proxy/v2/models/M/ready`), unescaped.
    raw = [s.raw_path for s in server.seen if "/proxy/" in s.path]
    assert raw[0] == f"/api/v1/namespaces/cspine/pods/{TRITON_A}:8000/proxy/v2/models/{MODELS[0]}/ready"
    assert server.proxied(CANARY) == []  # the other release's pod was filtered out by the selector
    assert not any("/horizontalpodautoscalers/" in s.path for s in server.seen)  # both found by label


def test_all_ready_release_exits_0(tmp_path, capsys):
    with FakeApiServer("pods-healthy.json", "hpas-healthy.json", token=TOKEN) as server:
        code, out, err = run_cli(capsys, write_kubeconfig(tmp_path / "kubeconfig", server.url))
    assert (code, err) == (0, "")
    assert "cspine release cspine in namespace cspine" in out
    assert re.search(rf"{TRITON_A}\s+Running\s+1/1\s+0\s+gpu-node-a1\s+\S+\s+6/6", out)
    assert re.search(r"cspine-triton\s+2\s+2\s+1-4\s+triton_queue_us_per_request\s+4210.5\s+20000 per pod", out)
    assert CANARY not in out
    assert out.rstrip().endswith("healthy: every pod and model ready, no autoscaler blocked")


def test_unready_triton_pod_with_unready_model_and_restarts_exits_1_naming_them(tmp_path, capsys):
    with FakeApiServer("pods-degraded.json", "hpas-degraded.json", "triton-ready-degraded.json") as server:
        code, out, err = run_cli(capsys, write_kubeconfig(tmp_path / "kubeconfig", server.url))
    assert code == 1
    problems = err.splitlines()
    assert problems == [
        f"cspine k8s status: pod {TRITON_B} (triton) not ready: Running, 0/1 containers ready, 2 restarts, "
        "last triton: OOMKilled (exit 137)",
        f"cspine k8s status: pod {TRITON_B}: 1/6 models not ready: seg_xr (HTTP 400: Model version not ready)",
        f"cspine k8s status: pod {TRITON_D} (triton) not ready: Init:1/2, 0/1 containers ready, 0 restarts",
        f"cspine k8s status: pod {TRITON_D}: 6/6 models not ready: seg_ct, seg_mr, seg_xr, lesion_embed, "
        "proto_classify, lesion_classify (not asked: pod is Init:1/2)",
        f"cspine k8s status: pod {TRITON_C} (triton) not ready: Running, 0/1 containers ready, 0 restarts",
        f"cspine k8s status: pod {TRITON_C}: 6/6 models not ready: seg_ct (HTTP 503: error trying to reach service: "
        "dial tcp 10.244.5.12:8000: connect: connection refused); seg_mr, seg_xr, lesion_embed, proto_classify, "
        "lesion_classify (not asked: HTTP 503: error trying to reach service: dial tcp 10.244.5.12:8000: connect: "
        "connection refused)",
    ]
    assert server.proxied(TRITON_B) == list(MODELS)
    assert server.proxied(TRITON_C) == ["seg_ct"]  # once the API server cannot reach Triton, stop asking
    assert server.proxied(TRITON_D) == []  # a pod still initialising is not asked
    assert f"  {TRITON_B}: not ready: seg_xr (HTTP 400: Model version not ready)" in out
    assert "pod cspine-gateway-5f8b9d7c6d-m4tzr is ready after 1 restart, last gateway: Error (exit 1)" in out
    assert "no HorizontalPodAutoscaler for gateway (autoscaling off?)" in out
    assert "cspine-triton: ScalingLimited True (TooManyReplicas)" in out
    assert out.rstrip().endswith("NOT healthy: 6 problem(s), listed on stderr")
    # The gateway HPA was not found by label, so it was asked for by name, and the API server said 404.
    assert any(s.path.endswith("/horizontalpodautoscalers/cspine-gateway") for s in server.seen)


def test_hpa_with_scaling_active_false_exits_1_naming_the_reason(tmp_path, capsys):
    with FakeApiServer("pods-healthy.json", "hpas-metric-missing.json") as server:
        code, out, err = run_cli(capsys, write_kubeconfig(tmp_path / "kubeconfig", server.url))
    assert code == 1
    assert err.splitlines() == [
        "cspine k8s status: HPA cspine-triton: ScalingActive False (FailedGetPodsMetric): the HPA was unable to "
        "compute the replica count: unable to get metric triton_queue_us_per_request: unable to fetch metrics from "
        "custom metrics API: the server could not find the metric triton_queue_us_per_request for pods"
    ]
    # The controller writes currentMetrics [{"type": ""}] when it reads nothing: the current value is unknown.
    assert re.search(r"cspine-triton\s+2\s+2\s+1-4\s+triton_queue_us_per_request\s+<unknown>\s+20000 per pod", out)


def test_json_output_has_stable_keys_and_values(tmp_path, capsys):
    with FakeApiServer("pods-degraded.json", "hpas-degraded.json", "triton-ready-degraded.json") as server:
        code, out, _ = run_cli(capsys, write_kubeconfig(tmp_path / "kubeconfig", server.url), "--json")
    data = json.loads(out)
    assert code == 1
    assert list(data) == [
        "release",
        "namespace",
        "checked_at",
        "healthy",
        "problems",
        "notes",
        "models",
        "pods",
        "hpas",
    ]
    assert (data["release"], data["namespace"], data["healthy"], data["models"]) == (
        "cspine",
        NAMESPACE,
        False,
        list(MODELS),
    )
    assert len(data["problems"]) == 6
    pod = next(p for p in data["pods"] if p["name"] == TRITON_B)
    assert list(pod) == [f.name for f in fields(k8s.PodState)]
    assert (pod["ready"], pod["restarts"], pod["status"]) == (False, 2, "Running")
    assert pod["last_termination"] == "triton: OOMKilled (exit 137)"
    assert pod["models"][2] == {"model": "seg_xr", "ready": False, "reason": "HTTP 400: Model version not ready"}
    assert [list(m) for m in pod["models"]] == [["model", "ready", "reason"]] * len(MODELS)
    (hpa,) = data["hpas"]
    assert list(hpa) == [f.name for f in fields(k8s.HpaState)]
    assert list(hpa["metrics"][0]) == [f.name for f in fields(k8s.MetricState)]
    assert hpa["metrics"][0]["current_value"] == 27840.0
    assert list(hpa["conditions"][0]) == ["type", "status", "reason", "message"]


def test_context_namespace_and_release_flags_choose_what_is_read(tmp_path, capsys):
    with FakeApiServer("pods-healthy.json", "hpas-healthy.json") as server:
        kubeconfig = tmp_path / "kubeconfig"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "elsewhere",
            "clusters": [
                {"name": "fake", "cluster": {"server": server.url}},
                {"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}},
            ],
            "users": [{"name": "operator", "user": {"token": TOKEN}}],
            "contexts": [
                {"name": "elsewhere", "context": {"cluster": "gone", "user": "operator"}},
                {"name": "ops", "context": {"cluster": "fake", "user": "operator", "namespace": NAMESPACE}},
            ],
        }
        kubeconfig.write_text(yaml.safe_dump(config))
        assert run_cli(capsys, kubeconfig, "--context", "ops")[0] == 0
        code, _, err = run_cli(capsys, kubeconfig, "--context", "ops", "--namespace", "staging")
        assert code == 1
        assert err.splitlines()[0] == (
            "cspine k8s status: no triton pods in namespace staging match app.kubernetes.io/name=cspine,"
            "app.kubernetes.io/instance=cspine,app.kubernetes.io/component=triton"
        )
        server.seen.clear()
        code, out, err = run_cli(capsys, kubeconfig, "--context", "ops", "--release", "canary")
    assert code == 1
    assert err.splitlines() == [
        "cspine k8s status: no gateway pods in namespace cspine match app.kubernetes.io/name=cspine,"
        "app.kubernetes.io/instance=canary,app.kubernetes.io/component=gateway",
        f"cspine k8s status: pod {CANARY} (triton) not ready: Running, 0/1 containers ready, 5 restarts",
        f"cspine k8s status: pod {CANARY}: 6/6 models not ready: seg_ct (HTTP 503: error trying to reach service: "
        "dial tcp 10.244.7.3:8000: connect: connection refused); seg_mr, seg_xr, lesion_embed, proto_classify, "
        "lesion_classify (not asked: HTTP 503: error trying to reach service: dial tcp 10.244.7.3:8000: connect: "
        "connection refused)",
    ]
    assert "no HorizontalPodAutoscaler for triton (autoscaling off?)" in out
    hpa_reads = [s.path.rsplit("/", 1)[1] for s in server.seen if "/horizontalpodautoscalers/" in s.path]
    assert hpa_reads == ["canary-cspine-triton", "canary-cspine-gateway"]


def test_unreachable_api_server_exits_2_with_a_one_line_message(tmp_path, capsys):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, out, err = run_cli(capsys, write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}"))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert err.startswith(f"cspine: error: cannot reach the API server at http://127.0.0.1:{port}: ")
    assert "Connection refused" in err and "Traceback" not in err


def test_api_server_refusing_the_credentials_exits_2_with_its_message(tmp_path, capsys):
    with FakeApiServer("pods-healthy.json", "hpas-healthy.json", token=TOKEN) as server:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url, token="expired")
        code, out, err = run_cli(capsys, kubeconfig)
    assert (code, out) == (2, "")
    assert err == f"cspine: error: the API server at {server.url} refused to list triton pods: HTTP 401: Unauthorized\n"


def test_unusable_kubeconfig_exits_2_with_a_one_line_message(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "kubeconfig"
    code, out, err = run_cli(capsys, missing)
    assert (code, out) == (2, "")
    assert err == f"cspine: error: cannot use kubeconfig {missing}: Invalid kube-config file. No configuration found.\n"


def test_cli_end_to_end_in_a_subprocess_uses_the_contexts_namespace_and_token(tmp_path):
    with FakeApiServer("pods-healthy.json", "hpas-healthy.json", token=TOKEN) as server:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server.url)
        result = subprocess.run(
            [str(Path(sys.executable).parent / "cspine"), "k8s", "status", "--kubeconfig", str(kubeconfig)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert (result.returncode, result.stderr) == (0, "")
    assert f"{TRITON_A}  Running" in result.stdout
    assert server.seen and all(s.authorization == f"Bearer {TOKEN}" for s in server.seen)
    assert all(
        s.path.startswith(("/api/v1/namespaces/cspine/", "/apis/autoscaling/v2/namespaces/cspine/"))
        for s in server.seen
    )


# --- pure parts ----------------------------------------------------------------------------------------------


def test_object_names_drop_the_chart_name_when_the_release_has_it():
    assert k8s.object_name("cspine", k8s.Component.TRITON) == "cspine-triton"
    assert k8s.object_name("prod", k8s.Component.GATEWAY) == "prod-cspine-gateway"
    assert k8s.object_name("cspine-prod", k8s.Component.TRITON) == "cspine-prod-triton"


def test_cluster_access_prefers_the_flag_then_kubeconfig_env_then_the_service_account():
    in_pod = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert k8s.ClusterAccess.choose("/k/a", "c", {**in_pod, "KUBECONFIG": "/k/b"}) == k8s.ClusterAccess("/k/a", "c")
    assert k8s.ClusterAccess.choose(None, None, {**in_pod, "KUBECONFIG": "/k/b"}) == k8s.ClusterAccess("/k/b")
    assert k8s.ClusterAccess.choose(None, None, in_pod) == k8s.ClusterAccess(in_cluster=True)
    assert k8s.ClusterAccess.choose(None, None, {}) == k8s.ClusterAccess(str(Path("~/.kube/config").expanduser()))


def test_error_answers_are_attributed_to_triton_or_the_api_server():
    assert k8s.answer_text('{"error":"Model version not ready"}') == ("triton", "Model version not ready")
    status = json.dumps(_status_object(403, "Forbidden", 'pods "x" is forbidden: cannot get resource "pods/proxy"'))
    assert k8s.answer_text(status) == ("kubernetes", 'pods "x" is forbidden: cannot get resource "pods/proxy"')
    assert k8s.answer_text("") == ("other", "(empty answer)")
    assert k8s.answer_text("<html>\n bad gateway</html>") == ("other", "<html> bad gateway</html>")


def test_ages_read_like_kubectls():
    cases = {59: "59s", 150: "2m30s", 3599: "59m", 3 * 3600 + 120: "3h2m", 30 * 3600: "30h", 50 * 3600: "2d2h"}
    assert {s: k8s.format_age(s) for s in cases} == cases
    assert k8s.format_age(None) == "?"


# --- the fixtures and the chart ------------------------------------------------------------------------------


def test_fixtures_are_valid_kubernetes_objects():
    import kubernetes_validate

    checked = 0
    for path in sorted([*FIXTURES.glob("pods-*.json"), *FIXTURES.glob("hpas-*.json")]):
        listing = json.loads(path.read_text())
        kind = listing["kind"].removesuffix("List")
        for item in listing["items"]:
            kubernetes_validate.validate(
                {"apiVersion": listing["apiVersion"], "kind": kind, **item}, "1.33.0", strict=True
            )
            checked += 1
    assert checked == 17


def test_names_selectors_and_metrics_match_what_the_chart_renders():
    objects = helm.render()  # RuntimeError naming `make tools` when helm is missing
    hpa_fixture = {h["metadata"]["name"]: h for h in json.loads((FIXTURES / "hpas-healthy.json").read_text())["items"]}
    for component in k8s.Component:
        name = k8s.object_name(helm.RELEASE, component)
        (deployment,) = helm.find(objects, "Deployment", name)
        wanted = dict(r.split("=") for r in k8s.component_selector(helm.RELEASE, component).split(","))
        assert deployment["spec"]["selector"]["matchLabels"] == wanted
        assert wanted.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        (hpa,) = helm.find(objects, "HorizontalPodAutoscaler", name)
        assert wanted.items() <= hpa["metadata"]["labels"].items()
        rendered = [
            (m["pods"]["metric"]["name"], float(m["pods"]["target"]["averageValue"])) for m in hpa["spec"]["metrics"]
        ]
        recorded = [(m.name, m.target_value) for m in k8s.hpa_state(_hpa(hpa_fixture[name]), component).metrics]
        assert rendered == recorded
    (triton,) = helm.find(objects, "Deployment", k8s.object_name(helm.RELEASE, k8s.Component.TRITON))
    ports = {
        p["name"]: p["containerPort"] for c in triton["spec"]["template"]["spec"]["containers"] for p in c["ports"]
    }
    assert ports[k8s.TRITON_HTTP_PORT_NAME] == k8s.TRITON_HTTP_PORT


def _hpa(item: dict) -> client.V2HorizontalPodAutoscaler:
    return client.V2HorizontalPodAutoscaler.from_dict(
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", **item}
    )
