"""``cspine k8s status``: the state of one cspine release on a Kubernetes cluster, read with the official
``kubernetes`` client — the Triton and gateway pods (phase, readiness, restarts, node, age), each served model's
readiness asked of Triton itself through the API server's pod proxy, and the two HorizontalPodAutoscalers
(replicas, each metric against its target, the conditions that stop scaling).

Tested against fixtures in the formats the Kubernetes API server and Triton 2.51 answer with, served by a real
local HTTP server (tests/test_k8s.py); it has not been run against a live cluster.

``gather_status`` reads the cluster into the data classes below, ``judge`` decides what is wrong (a pure
function), ``format_status`` and ``status_json`` present the result. Access needed: list pods, get pods/proxy,
list and get horizontalpodautoscalers in the release's namespace.
"""

from __future__ import annotations

import enum
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal, TypeVar, cast, overload

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.utils import parse_quantity

from cspine.errors import UnavailableError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The labels and names the Helm chart (helm/cspine/templates/_helpers.tpl) gives its objects.
CHART_NAME = "cspine"
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
TRITON_HTTP_PORT_NAME = "http"
TRITON_HTTP_PORT = 8000  # when the pod spec names no "http" port
IN_CLUSTER_NAMESPACE_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
DEFAULT_TIMEOUT_S = 10.0


class Component(str, enum.Enum):
    """The parts of a release this command looks at (the chart's app.kubernetes.io/component values)."""

    TRITON = "triton"
    GATEWAY = "gateway"


# An HPA condition type → the status that means the autoscaler cannot work (fails `cspine k8s status`).
BLOCKING_CONDITIONS: dict[str, str] = {"AbleToScale": "False", "ScalingActive": "False"}
# The status each condition has when all is well; any other is shown (ScalingLimited True: at min or max).
HEALTHY_CONDITIONS: dict[str, str] = {"AbleToScale": "True", "ScalingActive": "True", "ScalingLimited": "False"}
# MetricSpec.type → the attribute of MetricSpec and MetricStatus that holds that kind of source.
METRIC_SOURCES: dict[str, str] = {
    "Pods": "pods",
    "Object": "object",
    "External": "external",
    "Resource": "resource",
    "ContainerResource": "container_resource",
}
# MetricTarget.type → the attribute of MetricTarget and MetricValueStatus holding the value, and how the
# table writes the current value and the target.
TARGET_VALUES: dict[str, tuple[str, str, str]] = {
    "AverageValue": ("average_value", "{}", "{} per pod"),
    "Value": ("value", "{}", "{}"),
    "Utilization": ("average_utilization", "{}%", "{}% of request"),
}
# Ages as `kubectl get` writes them: (below this many seconds, format).
AGE_FORMATS: tuple[tuple[int, Callable[[int], str]], ...] = (
    (120, lambda s: f"{s}s"),
    (600, lambda s: f"{s // 60}m{s % 60}s"),
    (3 * 3600, lambda s: f"{s // 60}m"),
    (8 * 3600, lambda s: f"{s // 3600}h{s % 3600 // 60}m"),
    (48 * 3600, lambda s: f"{s // 3600}h"),
    (8 * 86400, lambda s: f"{s // 86400}d{s % 86400 // 3600}h"),
    (730 * 86400, lambda s: f"{s // 86400}d"),
)


class ClusterError(UnavailableError):
    """The cluster cannot be reached or read: no usable kubeconfig, API server down, access refused. One line."""


@dataclass(frozen=True)
class ModelReadiness:
    """Triton's answer to ``GET /v2/models/<model>/ready`` on one pod (reason empty when ready)."""

    model: str
    ready: bool
    reason: str = ""


@dataclass(frozen=True)
class PodState:
    """One pod as ``kubectl get pods`` shows it, plus the readiness of each model (Triton pods only)."""

    name: str
    component: str
    phase: str
    status: str  # kubectl's STATUS column: Running, Init:1/2, CrashLoopBackOff, Terminating …
    ready: bool  # the pod's Ready condition
    containers_ready: int
    containers_total: int
    restarts: int
    last_termination: str | None  # "triton: OOMKilled (exit 137)" for containers that restarted
    node: str | None
    age_seconds: int | None
    models: tuple[ModelReadiness, ...]


@dataclass(frozen=True)
class MetricState:
    """One metric of an HPA: its target and the value the controller last read (None: it could not read it)."""

    name: str
    type: str
    target_type: str
    target: str  # the quantity as the API server writes it ("20k")
    current: str | None
    target_value: float | None
    current_value: float | None


@dataclass(frozen=True)
class HpaCondition:
    type: str
    status: str
    reason: str
    message: str


@dataclass(frozen=True)
class HpaState:
    name: str
    component: str
    scale_target: str
    current_replicas: int
    desired_replicas: int
    min_replicas: int
    max_replicas: int
    metrics: tuple[MetricState, ...]
    conditions: tuple[HpaCondition, ...]


@dataclass(frozen=True)
class ReleaseStatus:
    release: str
    namespace: str
    checked_at: str
    models: tuple[str, ...]
    pods: tuple[PodState, ...]
    hpas: tuple[HpaState, ...]


@dataclass(frozen=True)
class Verdict:
    """What is wrong (problems: exit status 1) and what is worth knowing but not wrong (notes)."""

    problems: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def healthy(self) -> bool:
        return not self.problems


# --- names and selectors -------------------------------------------------------------------------------------


def release_prefix(release: str) -> str:
    """RELEASE-cspine, or RELEASE alone when it already contains "cspine" (the chart's cspine.fullname)."""
    prefix = release if CHART_NAME in release else f"{release}-{CHART_NAME}"
    return prefix[:63].rstrip("-")


def object_name(release: str, component: Component) -> str:
    """The Deployment's and the HPA's name of a component."""
    return f"{release_prefix(release)}-{component.value}"


def release_selector(release: str) -> str:
    return f"{NAME_LABEL}={CHART_NAME},{INSTANCE_LABEL}={release}"


def component_selector(release: str, component: Component) -> str:
    return f"{release_selector(release)},{COMPONENT_LABEL}={component.value}"


# --- connecting ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterAccess:
    """How to reach the API server: a kubeconfig (several joined by ':' as in KUBECONFIG) and a context, or the
    service account of the pod this runs in."""

    kubeconfig: str | None = None
    context: str | None = None
    in_cluster: bool = False

    @staticmethod
    def choose(kubeconfig: str | None, context: str | None, environ: Mapping[str, str]) -> ClusterAccess:
        """--kubeconfig first, then $KUBECONFIG; with neither, the pod's service account when
        KUBERNETES_SERVICE_HOST is set, else ~/.kube/config."""
        chosen = kubeconfig or environ.get("KUBECONFIG")
        if chosen:
            return ClusterAccess(chosen, context)
        if environ.get("KUBERNETES_SERVICE_HOST"):
            return ClusterAccess(context=context, in_cluster=True)
        return ClusterAccess(str(Path("~/.kube/config").expanduser()), context)


def connect(access: ClusterAccess, namespace_file: Path = IN_CLUSTER_NAMESPACE_FILE) -> tuple[client.ApiClient, str]:
    """An ApiClient for ``access``, and the namespace its context names (else ``default``)."""
    configuration = client.Configuration()
    where = "the in-cluster service account" if access.in_cluster else f"kubeconfig {access.kubeconfig}"
    try:
        if access.in_cluster:
            config.load_incluster_config(client_configuration=configuration)
            namespace = namespace_file.read_text().strip() if namespace_file.is_file() else ""
        else:
            config.load_kube_config(
                config_file=access.kubeconfig,
                context=access.context,
                client_configuration=configuration,
                persist_config=False,
            )
            namespace = _context_namespace(access)
    except (ConfigException, OSError, ValueError, yaml.YAMLError) as exc:
        raise ClusterError(f"cannot use {where}: {_one_line(exc)}") from exc
    return client.ApiClient(prepare(configuration)), namespace or "default"


def prepare(configuration: client.Configuration) -> client.Configuration:
    """Settings this command needs on any client configuration, returned for chaining."""
    # No retries: a status command should answer at once, and urllib3 logs every retry as a warning.
    configuration.retries = 0
    # Send the pod-proxy path as kubectl does (pods/POD:8000/proxy/v2/models/M/ready) rather than with ':' and
    # '/' percent-encoded; Kubernetes names are DNS labels, so no other path parameter contains either.
    configuration.safe_chars_for_path_param = "/:"
    return configuration


def _context_namespace(access: ClusterAccess) -> str:
    contexts, current = config.list_kube_config_contexts(access.kubeconfig)
    chosen = next((c for c in contexts if c["name"] == access.context), current) if access.context else current
    return ((chosen or {}).get("context") or {}).get("namespace") or ""


# --- reading the cluster -------------------------------------------------------------------------------------


def gather_status(
    api: client.ApiClient,
    namespace: str,
    release: str,
    models: Sequence[str],
    now: datetime,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ReleaseStatus:
    """Read the release's pods and HPAs, and ask each running Triton pod whether each of ``models`` is ready.
    Raises ClusterError when the API server cannot be reached or refuses a list; a model Triton cannot be
    asked about is reported not ready, with the reason."""
    core = client.CoreV1Api(api)
    host = api.configuration.host
    pods = []
    for component in Component:
        listing = _read(
            host,
            f"list {component.value} pods",
            core.list_namespaced_pod,
            namespace,
            label_selector=component_selector(release, component),
            _request_timeout=timeout_s,
        )
        for pod in sorted(listing.items, key=_name):
            checks = check_models(core, namespace, pod, models, timeout_s) if component is Component.TRITON else ()
            pods.append(pod_state(pod, component, now, checks))
    hpas = gather_hpas(client.AutoscalingV2Api(api), host, namespace, release, timeout_s)
    return ReleaseStatus(release, namespace, now.isoformat(timespec="seconds"), tuple(models), tuple(pods), hpas)


def gather_hpas(
    autoscaling: client.AutoscalingV2Api, host: str, namespace: str, release: str, timeout_s: float
) -> tuple[HpaState, ...]:
    """The HPA of each component: found by the release's labels (KEDA copies them onto the HPA it makes),
    else by the chart's name; a component without one (autoscaling off) is left out."""
    listing = _read(
        host,
        "list HorizontalPodAutoscalers",
        autoscaling.list_namespaced_horizontal_pod_autoscaler,
        namespace,
        label_selector=release_selector(release),
        _request_timeout=timeout_s,
    )
    labelled: dict[str | None, client.V2HorizontalPodAutoscaler] = {}
    for item in sorted(listing.items, key=_name):
        labelled.setdefault((_metadata(item).labels or {}).get(COMPONENT_LABEL), item)
    states = []
    for component in Component:
        hpa = labelled.get(component.value)
        if hpa is None:
            name = object_name(release, component)
            hpa = _read(
                host,
                f"read HorizontalPodAutoscaler {name}",
                autoscaling.read_namespaced_horizontal_pod_autoscaler,
                name,
                namespace,
                _request_timeout=timeout_s,
                missing_ok=True,
            )
        if hpa is not None:
            states.append(hpa_state(hpa, component))
    return tuple(states)


def check_models(
    core: client.CoreV1Api, namespace: str, pod: client.V1Pod, models: Sequence[str], timeout_s: float
) -> tuple[ModelReadiness, ...]:
    """Each model's readiness on one Triton pod. A pod that is not running is not asked; once the API server
    says it cannot reach Triton, the remaining models are not asked either (each would wait for the same)."""
    if _pod_status(pod).phase != "Running" or _metadata(pod).deletion_timestamp is not None:
        reason = f"not asked: pod is {display_status(pod)}"
        return tuple(ModelReadiness(model, False, reason) for model in models)
    target = f"{_name(pod)}:{triton_http_port(pod)}"
    results: list[ModelReadiness] = []
    for index, model in enumerate(models):
        readiness, triton_answered = ask_model_ready(core, namespace, target, model, timeout_s)
        results.append(readiness)
        if not triton_answered:
            results += [ModelReadiness(m, False, f"not asked: {readiness.reason}") for m in models[index + 1 :]]
            break
    return tuple(results)


def ask_model_ready(
    core: client.CoreV1Api, namespace: str, target: str, model: str, timeout_s: float
) -> tuple[ModelReadiness, bool]:
    """Triton's ``GET /v2/models/<model>/ready`` through the API server's pod proxy (``target`` is POD:PORT);
    200 means ready. The second value says whether Triton answered (False: the API server or the network did)."""
    logger.debug("asking %s whether %s is ready", target, model)
    try:
        # Without preloading the client returns urllib3's response, not the str its annotation names.
        response = cast(
            urllib3.HTTPResponse,
            core.connect_get_namespaced_pod_proxy_with_path(
                name=target,
                namespace=namespace,
                path=f"v2/models/{model}/ready",
                _preload_content=False,
                _request_timeout=timeout_s,
            ),
        )
    except ApiException as exc:
        source, text = answer_text(exc.body)
        if not exc.status:  # raised before any HTTP answer (TLS failure, unusable answer)
            return ModelReadiness(model, False, _one_line(exc.reason)), False
        return ModelReadiness(model, False, f"HTTP {exc.status}: {text}"), source == "triton"
    except urllib3.exceptions.HTTPError as exc:
        return ModelReadiness(model, False, f"no answer: {_transport_reason(exc)}"), False
    response.read()
    response.release_conn()
    return ModelReadiness(model, True), True


def answer_text(body: str | None) -> tuple[str, str]:
    """Who answered an HTTP error and what it said: ("kubernetes", message) for the API server's own Status
    object, ("triton", error) for Triton's ``{"error": …}``, ("other", the text) for anything else."""
    text = (body or "").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("kind") == "Status":
        return "kubernetes", str(data.get("message") or data.get("reason") or "")
    if isinstance(data, dict) and "error" in data:
        return "triton", str(data["error"])
    return "other", _one_line(text)[:200] or "(empty answer)"


def triton_http_port(pod: client.V1Pod) -> int:
    """The container port named "http" (Triton's HTTP endpoint), else 8000."""
    for container in _pod_spec(pod).containers:
        for port in container.ports or []:
            if port.name == TRITON_HTTP_PORT_NAME:
                return port.container_port
    return TRITON_HTTP_PORT


@overload
def _read(
    host: str, what: str, call: Callable[..., T], *args: Any, missing_ok: Literal[False] = False, **kwargs: Any
) -> T: ...
@overload
def _read(
    host: str, what: str, call: Callable[..., T], *args: Any, missing_ok: Literal[True], **kwargs: Any
) -> T | None: ...
def _read(
    host: str, what: str, call: Callable[..., T], *args: Any, missing_ok: bool = False, **kwargs: Any
) -> T | None:
    """``call(*args, **kwargs)``, with every way it can fail turned into a one-line ClusterError (or None for
    a 404 when ``missing_ok``)."""
    try:
        return call(*args, **kwargs)
    except ApiException as exc:
        if missing_ok and exc.status == 404:
            return None
        if not exc.status:
            raise ClusterError(f"cannot talk to the API server at {host}: {_one_line(exc.reason)}") from exc
        _, text = answer_text(exc.body)
        raise ClusterError(f"the API server at {host} refused to {what}: HTTP {exc.status}: {text}") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise ClusterError(f"cannot reach the API server at {host}: {_transport_reason(exc)}") from exc
    except ValueError as exc:  # pydantic's ValidationError: the answer is not the Kubernetes object asked for
        raise ClusterError(f"unexpected answer from {host} to {what}: {_one_line(exc)[:200]}") from exc


def _transport_reason(exc: urllib3.exceptions.HTTPError) -> str:
    reason = getattr(exc, "reason", None) or exc
    # urllib3 starts its connection errors with the connection object's repr: noise for an operator.
    return re.sub(r"^<[^>]*>:\s*", "", _one_line(reason))


def _one_line(value: object) -> str:
    return " ".join(str(value).split())


# --- from API objects to states (pure) -----------------------------------------------------------------------


def _metadata(obj: client.V1Pod | client.V2HorizontalPodAutoscaler) -> client.V1ObjectMeta:
    """The object's metadata, which the API server sets on every object it answers with."""
    if obj.metadata is None:
        raise ClusterError(f"the API server answered with a {type(obj).__name__} without metadata")
    return obj.metadata


def _name(obj: client.V1Pod | client.V2HorizontalPodAutoscaler) -> str:
    """The object's name, which the API server sets on every object it answers with."""
    name = _metadata(obj).name
    if name is None:
        raise ClusterError(f"the API server answered with a {type(obj).__name__} without a name")
    return name


def _pod_spec(pod: client.V1Pod) -> client.V1PodSpec:
    """The pod's spec, which every pod the API server answers with has."""
    if pod.spec is None:
        raise ClusterError(f"the API server answered with pod {_name(pod)} without a spec")
    return pod.spec


def _pod_status(pod: client.V1Pod) -> client.V1PodStatus:
    """The pod's status, which every pod the API server answers with has (a new one: phase Pending)."""
    if pod.status is None:
        raise ClusterError(f"the API server answered with pod {_name(pod)} without a status")
    return pod.status


def pod_state(
    pod: client.V1Pod, component: Component, now: datetime, models: Sequence[ModelReadiness] = ()
) -> PodState:
    status = _pod_status(pod)
    spec = _pod_spec(pod)
    containers = status.container_statuses or []
    restarted = [*containers, *(status.init_container_statuses or [])]
    conditions = {c.type: c.status for c in status.conditions or []}
    created = _metadata(pod).creation_timestamp
    return PodState(
        name=_name(pod),
        component=component.value,
        phase=status.phase or "Unknown",
        status=display_status(pod),
        ready=conditions.get("Ready") == "True",
        containers_ready=sum(1 for c in containers if c.ready),
        containers_total=len(spec.containers),
        restarts=sum(c.restart_count for c in restarted),
        last_termination=_last_termination(restarted),
        node=spec.node_name,
        age_seconds=int((now - created).total_seconds()) if created else None,
        models=tuple(models),
    )


def display_status(pod: client.V1Pod) -> str:
    """What ``kubectl get pods`` shows in its STATUS column, for the states a cspine pod goes through."""
    if _metadata(pod).deletion_timestamp is not None:
        return "Terminating"
    status = _pod_status(pod)
    inits = status.init_container_statuses or []
    for index, init in enumerate(inits):
        terminated = init.state.terminated if init.state else None
        waiting = init.state.waiting if init.state else None
        if terminated is not None and terminated.exit_code == 0:
            continue
        if terminated is not None:
            return f"Init:{terminated.reason or f'ExitCode:{terminated.exit_code}'}"
        if waiting is not None and waiting.reason and waiting.reason != "PodInitializing":
            return f"Init:{waiting.reason}"
        return f"Init:{index}/{len(_pod_spec(pod).init_containers or inits)}"
    for container in status.container_statuses or []:
        state = container.state
        if state is not None and state.waiting is not None and state.waiting.reason:
            return state.waiting.reason
        if state is not None and state.terminated is not None:
            return state.terminated.reason or f"ExitCode:{state.terminated.exit_code}"
    return status.reason or status.phase or "Unknown"


def _last_termination(statuses: Sequence[client.V1ContainerStatus]) -> str | None:
    ends = [
        f"{s.name}: {s.last_state.terminated.reason or 'terminated'} (exit {s.last_state.terminated.exit_code})"
        for s in statuses
        if s.restart_count and s.last_state is not None and s.last_state.terminated is not None
    ]
    return "; ".join(ends) or None


def hpa_state(hpa: client.V2HorizontalPodAutoscaler, component: Component) -> HpaState:
    spec = hpa.spec
    status = hpa.status
    current: dict[tuple[str, str], client.V2MetricStatus] = {}
    for metric in (status.current_metrics if status else None) or []:
        # With no metric readable, the controller writes {"type": ""}: nothing to match.
        if metric.type in METRIC_SOURCES:
            current.setdefault(_metric_key(metric), metric)
    reference = spec.scale_target_ref
    return HpaState(
        name=_name(hpa),
        component=component.value,
        scale_target=f"{reference.kind}/{reference.name}",
        current_replicas=(status.current_replicas or 0) if status else 0,
        desired_replicas=status.desired_replicas if status else 0,
        min_replicas=spec.min_replicas or 1,
        max_replicas=spec.max_replicas,
        metrics=tuple(metric_state(m, current.get(_metric_key(m))) for m in spec.metrics or []),
        conditions=tuple(
            HpaCondition(c.type, c.status, c.reason or "", c.message or "")
            for c in ((status.conditions if status else None) or [])
        ),
    )


def _metric_source(metric: Any) -> Any:
    return getattr(metric, METRIC_SOURCES[metric.type], None) if metric.type in METRIC_SOURCES else None


def _metric_name(source: Any) -> str:
    identifier = getattr(source, "metric", None)  # Pods, Object, External name a metric; Resource a resource
    return identifier.name if identifier is not None else source.name


def _metric_key(metric: Any) -> tuple[str, str]:
    source = _metric_source(metric)
    return metric.type, _metric_name(source) if source is not None else ""


def metric_state(spec: client.V2MetricSpec, status: client.V2MetricStatus | None) -> MetricState:
    source = _metric_source(spec)
    if source is None:
        return MetricState(spec.type or "?", spec.type or "", "", "", None, None, None)
    attribute = TARGET_VALUES.get(source.target.type, ("value",))[0]
    target = getattr(source.target, attribute)
    status_source = _metric_source(status) if status is not None else None
    current = getattr(status_source.current, attribute, None) if status_source is not None else None
    return MetricState(
        name=_metric_name(source),
        type=spec.type,
        target_type=source.target.type,
        target="" if target is None else str(target),
        current=None if current is None else str(current),
        target_value=_number(target),
        current_value=_number(current),
    )


def _number(quantity: object) -> float | None:
    if quantity is None:
        return None
    try:
        return float(parse_quantity(quantity))
    except (ValueError, InvalidOperation):
        return None


# --- judging (pure) ------------------------------------------------------------------------------------------


def judge(status: ReleaseStatus) -> Verdict:
    """Problems: a component without pods, a pod not ready, a model not ready, an HPA with AbleToScale or
    ScalingActive False. Notes: restarts of pods that are ready, a component without an HPA. (Other unusual
    HPA conditions, such as ScalingLimited True at the maximum, are shown with the HPA, not judged.)"""
    problems: list[str] = []
    notes: list[str] = []
    for component in Component:
        if not any(pod.component == component.value for pod in status.pods):
            problems.append(
                f"no {component.value} pods in namespace {status.namespace} match "
                f"{component_selector(status.release, component)}"
            )
    for pod in status.pods:
        restarts = f"{pod.restarts} restart{'' if pod.restarts == 1 else 's'}"
        restarts += f", last {pod.last_termination}" if pod.last_termination else ""
        if not pod.ready:
            problems.append(
                f"pod {pod.name} ({pod.component}) not ready: {pod.status}, "
                f"{pod.containers_ready}/{pod.containers_total} containers ready, {restarts}"
            )
        elif pod.restarts:
            notes.append(f"pod {pod.name} is ready after {restarts}")
        unready = [m for m in pod.models if not m.ready]
        if unready:
            problems.append(f"pod {pod.name}: {len(unready)}/{len(pod.models)} models not ready: {_by_reason(unready)}")
    for component in Component:
        if not any(hpa.component == component.value for hpa in status.hpas):
            notes.append(f"no HorizontalPodAutoscaler for {component.value} (autoscaling off?)")
    for hpa in status.hpas:
        problems += [
            f"HPA {hpa.name}: {c.type} {c.status} ({c.reason}): {c.message}"
            for c in hpa.conditions
            if BLOCKING_CONDITIONS.get(c.type) == c.status
        ]
    return Verdict(tuple(problems), tuple(notes))


def _by_reason(models: Sequence[ModelReadiness]) -> str:
    grouped: dict[str, list[str]] = {}
    for m in models:
        grouped.setdefault(m.reason, []).append(m.model)
    return "; ".join(f"{', '.join(names)} ({reason})" for reason, names in grouped.items())


# --- presenting ----------------------------------------------------------------------------------------------


def status_json(status: ReleaseStatus, verdict: Verdict) -> dict[str, Any]:
    """The status as JSON-ready data; the keys are always present (None where a value is unknown)."""
    return {
        "release": status.release,
        "namespace": status.namespace,
        "checked_at": status.checked_at,
        "healthy": verdict.healthy,
        "problems": list(verdict.problems),
        "notes": list(verdict.notes),
        "models": list(status.models),
        "pods": [asdict(pod) for pod in status.pods],
        "hpas": [asdict(hpa) for hpa in status.hpas],
    }


def format_age(seconds: int | None) -> str:
    if seconds is None:
        return "?"
    seconds = max(seconds, 0)
    for limit, shape in AGE_FORMATS:
        if seconds < limit:
            return shape(seconds)
    return f"{seconds // (365 * 86400)}y{seconds % (365 * 86400) // 86400}d"


def format_status(status: ReleaseStatus, verdict: Verdict) -> str:
    lines = [f"cspine release {status.release} in namespace {status.namespace} at {status.checked_at}"]
    for component in Component:
        pods = [p for p in status.pods if p.component == component.value]
        lines += ["", f"{component.value} pods"]
        if not pods:
            lines.append(f"  none match {component_selector(status.release, component)}")
            continue
        headers = ["NAME", "STATUS", "READY", "RESTARTS", "NODE", "AGE"]
        if component is Component.TRITON:
            headers.append("MODELS READY")
        rows = []
        for pod in pods:
            row = [pod.name, pod.status, f"{pod.containers_ready}/{pod.containers_total}", str(pod.restarts)]
            row += [pod.node or "<none>", format_age(pod.age_seconds)]
            if component is Component.TRITON:
                row.append(f"{sum(m.ready for m in pod.models)}/{len(pod.models)}")
            rows.append(row)
        lines += _table(headers, rows)
        for pod in pods:
            unready = [m for m in pod.models if not m.ready]
            lines += [f"  {pod.name}: not ready: {_by_reason(unready)}"] if unready else []
    lines += ["", "HorizontalPodAutoscalers"]
    if status.hpas:
        rows = []
        for hpa in status.hpas:
            replicas = [hpa.name, str(hpa.current_replicas), str(hpa.desired_replicas)]
            replicas.append(f"{hpa.min_replicas}-{hpa.max_replicas}")
            for index, metric in enumerate(hpa.metrics or (None,)):
                left = replicas if index == 0 else ["", "", "", ""]
                rows.append(left + (_metric_cells(metric) if metric else ["<no metrics>", "", ""]))
        lines += _table(["NAME", "CURRENT", "DESIRED", "MIN-MAX", "METRIC", "CURRENT VALUE", "TARGET"], rows)
        for hpa in status.hpas:
            lines += [
                f"  {hpa.name}: {c.type} {c.status} ({c.reason}): {c.message}"
                for c in hpa.conditions
                if c.status != HEALTHY_CONDITIONS.get(c.type, c.status)
            ]
    else:
        lines.append("  none")
    if verdict.notes:
        lines += ["", "notes"] + [f"  {note}" for note in verdict.notes]
    lines.append("")
    if verdict.healthy:
        lines.append("healthy: every pod and model ready, no autoscaler blocked")
    else:
        lines.append(f"NOT healthy: {len(verdict.problems)} problem(s), listed on stderr")
    return "\n".join(lines)


def _metric_cells(metric: MetricState) -> list[str]:
    _, current_shape, target_shape = TARGET_VALUES.get(metric.target_type, ("", "{}", "{}"))
    current = (
        "<unknown>" if metric.current is None else current_shape.format(_plain(metric.current_value, metric.current))
    )
    return [metric.name, current, target_shape.format(_plain(metric.target_value, metric.target))]


def _plain(value: float | None, raw: str) -> str:
    """A quantity as a plain number (4210.5 rather than 4210500m), or as written when it is not a number."""
    if value is None:
        return raw
    return format(Decimal(str(value)).normalize(), "f")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows, strict=True)]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in (headers, *rows)]
