"""The Helm chart, checked without a cluster: helm lint, helm template with the default and with production-like
values, every rendered object validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict) and
the custom resources against their CRD schemas, and what matters read off the rendered YAML: GPUs, the TensorRT
plan commands, probes, round-robin to Triton, secrets, disruption budgets, network policies, autoscaling, and the
optional DICOM node (its Service, variables, destinations Secret, volume and the one-gateway-pod rule)."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from cspine.config import ServeConfig
from cspine.inference.local_triton import default_repository
from cspine.inference.model_config import config_path, load_config, opt_batch, served_set
from cspine.inference.specs import MODELS, SERVED
from cspine.inference.tensorrt import plan_commands
from support.helm import CHART, NAMESPACE, ROOT, find, helm, render

PRODUCTION = ROOT / "tests" / "fixtures" / "helm" / "production-values.yaml"
TRTEXEC_DIR = "/usr/src/tensorrt/bin"  # triton.trtexecDir of the default values
KUBERNETES_VERSIONS = ("1.27.0", "1.33.0")  # the chart's kubeVersion floor, and a current release
BUILT_IN_GROUPS = ("v1", "apps/v1", "policy/v1", "networking.k8s.io/v1", "autoscaling/v2")
# The DICOM node on (over the default values): one gateway pod, as the chart requires.
DICOM_VALUES = {
    "gateway": {"replicas": 1, "autoscaling": {"enabled": False}},
    "dicom": {
        "enabled": True,
        "aeTitle": "CSPINE_ER",
        "allowedAeTitles": ["PACS_MAIN", "CT_SCANNER"],
        "allowedPeers": ["10.20.0.0/16", "192.0.2.10"],
        "destinations": [
            "pacs=dimse://PACS_MAIN@pacs.hospital.example:104",
            "archive=https://cspine:s3cret@archive.hospital.example/dicom-web",
        ],
        "quietSeconds": 2.5,
        "retainSeconds": 7200,
        "persistence": {"size": "100Gi", "storageClass": "fast-ssd"},
    },
}
DICOM_ON = (
    "--set", "dicom.enabled=true",
    "--set", "gateway.replicas=1",
    "--set", "gateway.autoscaling.enabled=false",
    "--set", "dicom.allowedAeTitles={PACS}",
)  # fmt: skip


@pytest.fixture(scope="module")
def default():
    return render()


@pytest.fixture(scope="module")
def production():
    return render(values=PRODUCTION)


@pytest.fixture(scope="module")
def dicom_values(tmp_path_factory):
    path = tmp_path_factory.mktemp("dicom") / "dicom-values.yaml"
    path.write_text(yaml.safe_dump(DICOM_VALUES))
    return path


@pytest.fixture(scope="module")
def dicom(dicom_values):
    return render(values=dicom_values)


def pod_spec(objects, name):
    (workload,) = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] == name]
    return workload["spec"]["template"]


def container(spec, name, init=False):
    (found,) = [c for c in spec["spec"]["initContainers" if init else "containers"] if c["name"] == name]
    return found


def env(c) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- lint, schema, validation ---------------------------------------------------------------------------------


def test_helm_lint_passes_in_strict_mode_with_default_and_production_values(dicom_values):
    for args in ((), ("--values", str(PRODUCTION)), ("--values", str(dicom_values))):
        result = helm("lint", "--strict", str(CHART), *args)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("variant", ["default", "production", "dicom"])
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_built_in_object_is_valid_against_the_kubernetes_openapi_schema_strictly(
    variant, version, default, production, dicom
):
    objects = {"default": default, "production": production, "dicom": dicom}[variant]
    built_in = [o for o in objects if o["apiVersion"] in BUILT_IN_GROUPS]
    assert len(built_in) >= 8
    for obj in built_in:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']}: {error.message} at {list(error.path)}")
    assert {o["apiVersion"] for o in objects} <= {*BUILT_IN_GROUPS, "monitoring.coreos.com/v1", "keda.sh/v1alpha1"}


def validate_custom_resources(objects, tmp_path) -> list:
    custom = [o for o in objects if o["apiVersion"] not in BUILT_IN_GROUPS]
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(custom))
    modules = ROOT / ".tools" / "node_modules"
    assert modules.is_dir(), "run `make tools`: it installs the CRD validators into .tools/node_modules"
    result = subprocess.run(
        ["node", str(ROOT / "tests" / "crd_validate.mjs"), str(modules), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["errors"]


def test_custom_resources_are_valid_against_their_crd_schemas(default, production, tmp_path):
    kinds = {o["kind"] for o in default + production if o["apiVersion"] not in BUILT_IN_GROUPS}
    assert kinds == {"ServiceMonitor", "PrometheusRule", "ScaledObject"}
    assert validate_custom_resources(default + production, tmp_path) == []


def test_the_crd_check_catches_a_wrongly_typed_field(default, tmp_path):
    (monitor, *_) = find(default, "ServiceMonitor")
    broken = json.loads(json.dumps(monitor))
    broken["spec"]["endpoints"][0]["interval"] = 15  # the CRD says string ("15s")
    errors = validate_custom_resources([broken], tmp_path)
    assert len(errors) == 1 and "interval must be string" in errors[0][2]


def test_values_outside_the_schema_are_refused_with_the_key_named():
    for setting, named in (
        ("triton.gpus=0", "/triton/gpus"),
        ("triton.image.tag=latest", "/triton/image/tag"),
        ("gateway.replica=3", "replica"),
        ("alerts.errorRatio=2", "/alerts/errorRatio"),
        ("dicom.destinations={pacs}", "/dicom/destinations/0"),
        ("dicom.port=70000", "/dicom/port"),
    ):
        result = helm("template", "cspine", str(CHART), "--set", setting)
        assert result.returncode != 0 and named in result.stderr, (setting, result.stderr)


@pytest.mark.parametrize(
    "settings, message",
    [
        (["gateway.graceSeconds=60", "gateway.terminationGracePeriodSeconds=30"], "must exceed gateway.graceSeconds"),
        (["postgresql.enabled=false"], "shared support store"),
        (["gateway.tls.enabled=true"], "gateway.tls.existingSecret"),
        (["keda.enabled=true"], "choose one autoscaler"),
        # the DICOM node: one gateway pod (a node per pod would split studies), its callers named, ports apart
        (["dicom.enabled=true", "dicom.allowedAeTitles={PACS}"], "dicom.enabled needs exactly one gateway pod"),
        (
            ["dicom.enabled=true", "dicom.allowedAeTitles={PACS}", "gateway.autoscaling.enabled=false"],
            "set gateway.replicas=1 and gateway.autoscaling.enabled=false",
        ),
        (
            ["dicom.enabled=true", "dicom.allowedAeTitles={PACS}", "gateway.replicas=1"],
            "dicom.enabled needs exactly one gateway pod",
        ),
        (
            ["dicom.enabled=true", "gateway.replicas=1", "gateway.autoscaling.enabled=false"],
            "dicom.enabled needs dicom.allowedAeTitles",
        ),
        ([*DICOM_ON[1::2], "dicom.tls=true"], "dicom.tls uses the gateway's certificate"),
        ([*DICOM_ON[1::2], "dicom.dicomwebPort=9464"], "9464 is used twice"),
        ([*DICOM_ON[1::2], "dicom.port=0", "dicom.dicomwebPort=0"], "both are 0"),
        (
            [*DICOM_ON[1::2], "dicom.destinations={a=http://x}", "dicom.destinationsSecret.existingSecret=s"],
            "choose one source of DICOM destinations",
        ),
    ],
)
def test_inconsistent_values_fail_the_render_with_a_clear_message(settings, message):
    args = [a for s in settings for a in ("--set", s)]
    result = helm("template", "cspine", str(CHART), *args)
    assert result.returncode != 0 and message in result.stderr, result.stderr


# -- Triton ---------------------------------------------------------------------------------------------------


def image_with_two_sets(root: Path) -> Path:
    """What a site's image carries in /opt/cspine/model_repository: the shipped repository and a version set 2
    (here version 1's files again; a real one comes from cspine export --version 2)."""
    image = root / "image"
    shutil.copytree(default_repository(), image, ignore=shutil.ignore_patterns("__pycache__"))
    for name in MODELS:
        shutil.copytree(image / name / "1", image / name / "2")
    return image


def run_init(script: str, image: Path, pod: Path, tmp: Path, path: str = "") -> subprocess.CompletedProcess:
    """Run an init container's script here, its paths mapped onto folders of this machine (the image's repository,
    the pod's model volume, its /tmp) and `cspine` this checkout's."""
    script = script.replace("/tmp/plan-commands.sh", "@TMP@/plan-commands.sh")
    script = re.sub(r"(?<![\w.-])/models", str(pod), script)
    script = script.replace("/opt/cspine/model_repository", str(image)).replace("@TMP@", str(tmp))
    environment = {**os.environ, "PATH": f"{path}{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}"}
    return subprocess.run(["/bin/bash", "-ec", script], env=environment, capture_output=True, text=True, timeout=120)


def test_triton_pods_load_every_set_the_image_carries_and_build_a_plan_for_each(tmp_path):
    """copy-models (the cspine image) copies the repository, names every set and writes the trtexec commands of
    `cspine triton plan-commands`; build-plans (the Triton image) runs them. Run here with a trtexec that writes
    the engine file it is asked for."""
    spec = pod_spec(render("--set", "models.version=2"), "cspine-triton")
    assert spec == pod_spec(render(), "cspine-triton")  # the set served is the gateways' choice: Triton stays
    assert [c["name"] for c in spec["spec"]["initContainers"]] == ["copy-models", "build-plans"]
    copy, build = (container(spec, n, init=True) for n in ("copy-models", "build-plans"))
    triton = container(spec, "triton")
    assert build["image"] == triton["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert "--model-config-name=gpu" in triton["args"] and "--model-repository=/models" in triton["args"]

    image, pod, tmp, tools = image_with_two_sets(tmp_path), tmp_path / "pod", tmp_path / "podtmp", tmp_path / "tools"
    for folder in (pod, tmp, tools):
        folder.mkdir()
    copied = run_init(copy["args"][0], image, pod, tmp)
    assert copied.returncode == 0, copied.stderr
    for name in MODELS:
        for config in (pod / name / "config.pbtxt", pod / name / "configs" / "gpu.pbtxt"):
            assert load_config(config).version_policy.HasField("all")
    written = [shlex.split(line) for line in (tmp / "plan-commands.sh").read_text().splitlines()]
    batches = {name: opt_batch(load_config(config_path(default_repository(), name, "gpu"))) for name in MODELS}
    assert written == plan_commands(str(pod), batches, (1, 2)) and len(written) == 2 * len(MODELS)

    trtexec = tools / "trtexec"
    trtexec.write_text('#!/bin/sh\nfor a; do case "$a" in --saveEngine=*) echo x > "${a#--saveEngine=}";; esac; done\n')
    trtexec.chmod(0o755)
    built = run_init(build["args"][0].replace(TRTEXEC_DIR, str(tools)), image, pod, tmp)
    assert built.returncode == 0, built.stderr
    assert sorted(str(p.relative_to(pod)) for p in pod.glob("*/*/model.plan")) == sorted(
        f"{name}/{version}/model.plan" for name in MODELS for version in (1, 2)
    )


def test_gateways_serve_the_chosen_set_and_name_it_in_every_triton_call(default, tmp_path):
    """choose-models names models.version in the gateway's copy of the repository; cspine serve reads that copy
    and pins its Triton calls to it. A set the image lacks stops the pod's start with the reason."""
    spec = pod_spec(render("--set", "models.version=2"), "cspine-gateway")
    choose = container(spec, "choose-models", init=True)
    gateway = container(spec, "gateway")
    assert env(gateway)["CSPINE_MODEL_REPOSITORY"] == "/models" and env(gateway)["CSPINE_TRITON_PIN_VERSIONS"] == "1"
    mounts = {m["name"]: m for m in gateway["volumeMounts"]}
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"]
    image = image_with_two_sets(tmp_path)
    for version in (1, 2):
        pod = tmp_path / f"gateway-{version}"
        pod.mkdir()
        spec = pod_spec(render("--set", f"models.version={version}"), "cspine-gateway")
        done = run_init(container(spec, "choose-models", init=True)["args"][0], image, pod, tmp_path)
        assert done.returncode == 0, done.stderr
        assert served_set(pod) == version and served_set(image) == 1
    pod = tmp_path / "gateway-3"
    pod.mkdir()
    script = container(pod_spec(render("--set", "models.version=3"), "cspine-gateway"), "choose-models", True)
    failed = run_init(script["args"][0], image, pod, tmp_path)
    assert failed.returncode != 0 and "no version set 3" in failed.stderr and "the sets are 1, 2" in failed.stderr
    assert "cspine models use 1 " in container(pod_spec(default, "cspine-gateway"), "choose-models", True)["args"][0]
    assert choose["image"] == gateway["image"]


def test_triton_pods_ask_for_gpus_on_gpu_nodes(default, production):
    for objects, gpus in ((default, 1), (production, 2)):
        spec = pod_spec(objects, "cspine-triton")
        assert container(spec, "triton")["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert container(spec, "build-plans", init=True)["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert spec["spec"]["nodeSelector"]
        assert any(t["key"] == "nvidia.com/gpu" for t in spec["spec"]["tolerations"])
    selector = pod_spec(production, "cspine-triton")["spec"]["nodeSelector"]
    assert selector["node.kubernetes.io/instance-type"] == "g5.2xlarge"  # helm merges it with the default's
    gateway = container(pod_spec(default, "cspine-gateway"), "gateway")
    assert "nvidia.com/gpu" not in json.dumps(gateway["resources"])


def test_triton_probes_use_its_health_endpoints_and_allow_for_model_loading(default):
    triton = container(pod_spec(default, "cspine-triton"), "triton")
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert triton["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = triton["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert {p["name"] for p in triton["ports"]} == {"http", "grpc", "metrics"}


def test_the_triton_service_is_headless_and_selects_the_triton_pods(default):
    (service,) = find(default, "Service", "cspine-triton-headless")
    assert service["spec"]["clusterIP"] == "None"
    triton_labels = pod_spec(default, "cspine-triton")["metadata"]["labels"]
    gateway_labels = pod_spec(default, "cspine-gateway")["metadata"]["labels"]
    assert selects(service["spec"]["selector"], triton_labels)
    assert not selects(service["spec"]["selector"], gateway_labels)


# -- the gateway ----------------------------------------------------------------------------------------------


def test_the_gateway_round_robins_over_the_headless_triton_service(default):
    gateway = container(pod_spec(default, "cspine-gateway"), "gateway")
    variables = env(gateway)
    assert variables["CSPINE_TRITON_URL"] == f"dns:///cspine-triton-headless.{NAMESPACE}.svc.cluster.local:8001"
    assert variables["CSPINE_TRITON_ROUND_ROBIN"] == "1"
    assert float(variables["CSPINE_TRITON_RECONNECT_SECONDS"]) > 0
    assert variables["CSPINE_HOST"] == "0.0.0.0"
    assert (variables["CSPINE_MAX_STUDIES_IN_FLIGHT"], variables["CSPINE_MAX_QUEUED_STUDIES"]) == ("4", "2")


def test_gateway_secrets_come_from_kubernetes_secrets(default, production):
    spec = pod_spec(production, "cspine-gateway")
    gateway = container(spec, "gateway")
    variables = env(gateway)
    assert variables["CSPINE_STORE_URL"] == {"secretKeyRef": {"name": "cspine-store", "key": "url"}}
    volumes = {v["name"]: v for v in spec["spec"]["volumes"]}
    assert volumes["tokens"]["secret"]["secretName"] == "cspine-tokens"
    assert volumes["tls"]["secret"]["secretName"] == "cspine-gateway-tls"
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert variables["CSPINE_TOKENS"] == f"{mounts['tokens']}/tokens"
    assert variables["CSPINE_TLS_CERT"] == f"{mounts['tls']}/tls.crt"
    assert variables["CSPINE_TLS_CLIENT_CA"] == f"{mounts['tls']}/ca.crt"
    assert not find(production, "Secret") and not find(production, "StatefulSet")  # nothing generated
    # Defaults: generated tokens (one per role) and the trial PostgreSQL's URL, both in Secrets the chart makes.
    (tokens,) = find(default, "Secret", "cspine-gateway-tokens")
    lines = base64.b64decode(tokens["data"]["tokens"]).decode().splitlines()
    assert [line.split()[0] for line in lines] == ["analyst", "curator"] and all(len(x.split()[1]) == 40 for x in lines)
    (store,) = find(default, "Secret", "cspine-postgresql")
    url = base64.b64decode(store["data"]["url"]).decode()
    assert re.fullmatch(
        r"postgresql\+psycopg://cspine:\w{32}@cspine-postgresql\.cspine\.svc\.cluster\.local:5432/cspine", url
    )
    assert env(container(pod_spec(default, "cspine-gateway"), "gateway"))["CSPINE_STORE_URL"] == {
        "secretKeyRef": {"name": "cspine-postgresql", "key": "url"}
    }


def test_the_gateway_drains_before_kubernetes_kills_it_and_is_ready_only_when_serving(default, production):
    for objects in (default, production):
        spec = pod_spec(objects, "cspine-gateway")
        gateway = container(spec, "gateway")
        assert spec["spec"]["terminationGracePeriodSeconds"] > float(env(gateway)["CSPINE_GRACE_SECONDS"])
        assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
        assert gateway["livenessProbe"]["httpGet"]["port"] == "metrics"


def test_every_pod_runs_non_root_with_a_read_only_root_filesystem_and_bounded_resources(default, production):
    for objects in (default, production):
        workloads = [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]
        assert len(workloads) >= 2
        for workload in workloads:
            spec = workload["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] > 0
            assert spec["automountServiceAccountToken"] is False
            for c in spec["containers"] + spec.get("initContainers", []):
                where = f"{workload['metadata']['name']}/{c['name']}"
                context = c["securityContext"]
                assert context["readOnlyRootFilesystem"] is True, where
                assert context["allowPrivilegeEscalation"] is False, where
                assert context["capabilities"]["drop"] == ["ALL"], where
                assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], where


def test_images_are_pinned(default, production):
    for objects in (default, production):
        for workload in (o for o in objects if o["kind"] in ("Deployment", "StatefulSet")):
            spec = workload["spec"]["template"]["spec"]
            for c in spec["containers"] + spec.get("initContainers", []):
                assert re.fullmatch(r"[\w./-]+:[\w.-]+", c["image"]) and not c["image"].endswith(":latest")


def test_disruption_budgets_cover_triton_and_the_gateway(default):
    budgets = find(default, "PodDisruptionBudget")
    assert len(budgets) == 2
    for name in ("cspine-triton", "cspine-gateway"):
        labels = pod_spec(default, name)["metadata"]["labels"]
        assert [b for b in budgets if selects(b["spec"]["selector"]["matchLabels"], labels)], name


# -- network policies ------------------------------------------------------------------------------------------


def test_only_the_gateway_reaches_triton_and_postgresql(default):
    triton = pod_spec(default, "cspine-triton")["metadata"]["labels"]
    gateway = pod_spec(default, "cspine-gateway")["metadata"]["labels"]
    postgresql = pod_spec(default, "cspine-postgresql")["metadata"]["labels"]
    for name, labels, ports in (("cspine-triton", triton, {"grpc", "http"}), ("cspine-postgresql", postgresql, None)):
        (policy,) = find(default, "NetworkPolicy", name)
        assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        pod_rules = [r for r in policy["spec"]["ingress"] if "podSelector" in r["from"][0]]
        (rule,) = pod_rules
        selector = rule["from"][0]["podSelector"]["matchLabels"]
        assert selects(selector, gateway) and not selects(selector, triton)
        if ports:
            assert {p["port"] for p in rule["ports"]} == ports
    # the metrics port alone is open to the monitoring namespace
    (policy,) = find(default, "NetworkPolicy", "cspine-triton")
    (monitoring,) = [r for r in policy["spec"]["ingress"] if "namespaceSelector" in r["from"][0]]
    assert monitoring["ports"] == [{"port": "metrics"}]
    assert monitoring["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}


def test_only_allowed_namespaces_reach_the_gateway_api(production):
    (policy,) = find(production, "NetworkPolicy", "cspine-gateway")
    (api,) = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": "grpc"}]]
    (expression,) = api["from"][0]["namespaceSelector"]["matchExpressions"]
    assert expression["key"] == "kubernetes.io/metadata.name" and expression["operator"] == "In"
    assert sorted(expression["values"]) == ["cspine", "pacs", "ris"]
    assert selects(
        policy["spec"]["podSelector"]["matchLabels"], pod_spec(production, "cspine-gateway")["metadata"]["labels"]
    )


def test_network_policy_ports_name_ports_the_selected_pods_have(default, dicom):
    for objects in (default, dicom):
        for policy in find(objects, "NetworkPolicy"):
            pods = [
                o["spec"]["template"]
                for o in objects
                if o["kind"] in ("Deployment", "StatefulSet")
                and selects(policy["spec"]["podSelector"]["matchLabels"], o["spec"]["template"]["metadata"]["labels"])
            ]
            assert len(pods) == 1, policy["metadata"]["name"]
            names = {p["name"] for c in pods[0]["spec"]["containers"] for p in c.get("ports", [])}
            for rule in policy["spec"]["ingress"]:
                assert {p["port"] for p in rule["ports"]} <= names


# -- autoscaling and monitoring ---------------------------------------------------------------------------------

ADAPTER = ROOT / "helm" / "prometheus-adapter-values.yaml"


def adapter_rules() -> dict[str, dict]:
    rules = yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]
    return {rule["name"]["as"]: rule for rule in rules}


def test_hpas_scale_the_deployments_on_metrics_prometheus_adapter_serves(default):
    hpas = {h["metadata"]["name"]: h for h in find(default, "HorizontalPodAutoscaler")}
    assert set(hpas) == {"cspine-triton", "cspine-gateway"}
    served = adapter_rules()
    for name, hpa in hpas.items():
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        (metric,) = hpa["spec"]["metrics"]
        assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] in served
        assert "replicas" not in find(default, "Deployment", name)[0]["spec"]  # the HPA owns the count
    assert hpas["cspine-triton"]["spec"]["metrics"][0]["pods"]["metric"]["name"] == "triton_queue_us_per_request"
    assert hpas["cspine-triton"]["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "20000"


def test_keda_replaces_the_triton_hpa_with_the_same_queue_time_query(production):
    assert [h["metadata"]["name"] for h in find(production, "HorizontalPodAutoscaler")] == ["cspine-gateway"]
    (scaled,) = find(production, "ScaledObject")
    assert scaled["spec"]["scaleTargetRef"]["name"] == "cspine-triton"
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == (2, 6)
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert "rate(nv_inference_queue_duration_us{" in query and "rate(nv_inference_request_success{" in query
    assert trigger["metadata"]["threshold"] == "10000"
    assert "replicas" not in find(production, "Deployment", "cspine-triton")[0]["spec"]


def test_the_scaling_queries_compute_queue_time_per_request_on_synthetic_series(tmp_path):
    """promtool evaluates the adapter's query for two Triton pods with known (SYNTHETIC) counter rates."""
    query = adapter_rules()["triton_queue_us_per_request"]["metricsQuery"]
    query = query.replace("<<.LabelMatchers>>", 'namespace="cspine",pod=~"triton-a|triton-b"').replace(
        "<<.GroupBy>>", "pod"
    )
    in_flight = adapter_rules()["cspine_studies_in_flight"]["metricsQuery"]
    in_flight = in_flight.replace("<<.LabelMatchers>>", 'namespace="cspine",pod="gateway-a"').replace(
        "<<.GroupBy>>", "pod"
    )
    tests = {
        "rule_files": [],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    # pod a: 10 requests/s waiting 5 ms each; two models, split 6 + 4
                    {
                        "series": 'nv_inference_queue_duration_us{namespace="cspine",pod="triton-a",model="seg_ct"}',
                        "values": "0+450000x20",
                    },
                    {
                        "series": 'nv_inference_request_success{namespace="cspine",pod="triton-a",model="seg_ct"}',
                        "values": "0+90x20",
                    },
                    {
                        "series": 'nv_inference_queue_duration_us{namespace="cspine",pod="triton-a",model="seg_mr"}',
                        "values": "0+300000x20",
                    },
                    {
                        "series": 'nv_inference_request_success{namespace="cspine",pod="triton-a",model="seg_mr"}',
                        "values": "0+60x20",
                    },
                    # pod b: idle
                    {
                        "series": 'nv_inference_queue_duration_us{namespace="cspine",pod="triton-b",model="seg_ct"}',
                        "values": "0+0x20",
                    },
                    {
                        "series": 'nv_inference_request_success{namespace="cspine",pod="triton-b",model="seg_ct"}',
                        "values": "0+0x20",
                    },
                    {"series": 'cspine_studies_in_flight{namespace="cspine",pod="gateway-a"}', "values": "2x20"},
                ],
                "promql_expr_test": [
                    {
                        "expr": query,
                        "eval_time": "4m",
                        "exp_samples": [
                            {"labels": '{pod="triton-a"}', "value": 5000},
                            {"labels": '{pod="triton-b"}', "value": 0},
                        ],
                    },
                    {
                        "expr": in_flight,
                        "eval_time": "4m",
                        "exp_samples": [{"labels": '{pod="gateway-a"}', "value": 2}],
                    },
                ],
            }
        ],
    }
    path = tmp_path / "adapter_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_service_monitors_find_a_metrics_port_on_triton_and_gateway_pods(default):
    monitors = find(default, "ServiceMonitor")
    assert len(monitors) == 2
    services = find(default, "Service")
    for monitor in monitors:
        (endpoint,) = monitor["spec"]["endpoints"]
        matched = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert len(matched) == 1, monitor["metadata"]["name"]
        (port,) = [p for p in matched[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
        pods = [
            o["spec"]["template"]
            for o in find(default, "Deployment")
            if selects(matched[0]["spec"]["selector"], o["spec"]["template"]["metadata"]["labels"])
        ]
        (pod,) = pods
        assert port["targetPort"] in {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    assert {m["metadata"]["name"] for m in monitors} == {"cspine-triton", "cspine-gateway"}


def test_monitoring_objects_can_be_turned_off_for_clusters_without_the_operators():
    objects = render(
        "--set", "monitoring.serviceMonitor.enabled=false",
        "--set", "monitoring.prometheusRule.enabled=false",
        "--set", "monitoring.grafanaDashboard.enabled=false",
        "--set", "triton.autoscaling.enabled=false",
        "--set", "gateway.autoscaling.enabled=false",
    )  # fmt: skip
    assert {o["apiVersion"] for o in objects} <= set(BUILT_IN_GROUPS)
    assert not find(objects, "HorizontalPodAutoscaler")
    assert find(objects, "Deployment", "cspine-triton")[0]["spec"]["replicas"] == 1
    assert find(objects, "Deployment", "cspine-gateway")[0]["spec"]["replicas"] == 2


# -- the DICOM node ---------------------------------------------------------------------------------------------


def resolved_env(objects, c) -> dict[str, str]:
    """The container's variables as the pod sees them: secretKeyRefs read from the rendered Secrets."""
    found = {}
    for name, value in env(c).items():
        if isinstance(value, dict):
            ref = value["secretKeyRef"]
            (secret,) = find(objects, "Secret", ref["name"])
            value = base64.b64decode(secret["data"][ref["key"]]).decode()
        found[name] = value
    return found


def test_the_dicom_node_is_off_by_default(default, production):
    for objects in (default, production):
        spec = pod_spec(objects, "cspine-gateway")
        gateway = container(spec, "gateway")
        assert not [name for name in env(gateway) if name.startswith("CSPINE_DICOM") or name == "CSPINE_AE_TITLE"]
        assert {p["name"] for p in gateway["ports"]} == {"grpc", "metrics"}
        assert not find(objects, "Service", "cspine-dicom") and not find(objects, "PersistentVolumeClaim")
        assert not find(objects, "Secret", "cspine-dicom-destinations")
        volumes = {v["name"]: v for v in spec["spec"]["volumes"]}
        assert "emptyDir" in volumes["data"]
        assert find(objects, "Deployment", "cspine-gateway")[0]["spec"]["strategy"]["type"] == "RollingUpdate"
        (policy,) = find(objects, "NetworkPolicy", "cspine-gateway")
        assert not [p for r in policy["spec"]["ingress"] for p in r["ports"] if p["port"].startswith("dicom")]


def test_the_dicom_node_listens_on_its_ports_through_its_own_service(dicom):
    gateway = container(pod_spec(dicom, "cspine-gateway"), "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert (ports["dicom"], ports["dicomweb"]) == (11112, 8042)
    (service,) = find(dicom, "Service", "cspine-dicom")
    assert service["spec"]["type"] == "ClusterIP" and service["spec"]["publishNotReadyAddresses"] is True
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service["spec"]["ports"]} == {
        "dicom": (11112, "dicom"),
        "dicomweb": (8042, "dicomweb"),
    }
    assert selects(service["spec"]["selector"], pod_spec(dicom, "cspine-gateway")["metadata"]["labels"])
    assert not selects(service["spec"]["selector"], pod_spec(dicom, "cspine-triton")["metadata"]["labels"])
    # the gateway's ServiceMonitor still finds the gateway Service alone (the DICOM one is labelled dicom)
    (monitor,) = find(dicom, "ServiceMonitor", "cspine-gateway")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    assert [s["metadata"]["name"] for s in find(dicom, "Service") if selects(wanted, s["metadata"]["labels"])] == [
        "cspine-gateway"
    ]
    # a LoadBalancer keeps the senders' addresses, which allowedPeers check
    objects = render(*DICOM_ON, "--set", "dicom.service.type=LoadBalancer", "--set", "dicom.port=0")
    (service,) = find(objects, "Service", "cspine-dicom")
    assert service["spec"]["type"] == "LoadBalancer" and service["spec"]["externalTrafficPolicy"] == "Local"
    assert [p["name"] for p in service["spec"]["ports"]] == ["dicomweb"]
    assert env(container(pod_spec(objects, "cspine-gateway"), "gateway"))["CSPINE_DICOM_PORT"] == "0"  # off


def test_the_dicom_node_gets_its_settings_as_the_variables_cspine_serve_reads(dicom):
    gateway = container(pod_spec(dicom, "cspine-gateway"), "gateway")
    variables = env(gateway)
    assert variables["CSPINE_DICOM_PORT"] == "11112" and variables["CSPINE_DICOMWEB_PORT"] == "8042"
    assert variables["CSPINE_AE_TITLE"] == "CSPINE_ER"
    assert variables["CSPINE_DICOM_ALLOWED_AES"] == "PACS_MAIN,CT_SCANNER"
    assert variables["CSPINE_DICOM_ALLOWED_PEERS"] == "10.20.0.0/16,192.0.2.10"
    assert (variables["CSPINE_DICOM_QUIET_SECONDS"], variables["CSPINE_DICOM_RETAIN_SECONDS"]) == ("2.5", "7200")
    assert "CSPINE_DICOM_TLS" not in variables
    # cspine's own configuration accepts them and reads back the values
    node = ServeConfig.from_env(resolved_env(dicom, gateway)).dicom
    assert (node.port, node.dicomweb_port, node.ae_title) == (11112, 8042, "CSPINE_ER")
    assert node.allowed_aes == ("PACS_MAIN", "CT_SCANNER") and node.allowed_peers == ("10.20.0.0/16", "192.0.2.10")
    assert [(d.name, d.kind) for d in node.parsed_destinations] == [("pacs", "dimse"), ("archive", "stow")]
    assert (node.quiet_s, node.retain_s, node.tls) == (2.5, 7200.0, False)
    # DICOM TLS with the gateway's certificate
    objects = render(
        *DICOM_ON,
        "--set", "dicom.tls=true",
        "--set", "gateway.tls.enabled=true",
        "--set", "gateway.tls.existingSecret=cspine-gateway-tls",
    )  # fmt: skip
    variables = env(container(pod_spec(objects, "cspine-gateway"), "gateway"))
    assert variables["CSPINE_DICOM_TLS"] == "1" and variables["CSPINE_TLS_CERT"]
    (service,) = find(objects, "Service", "cspine-dicom")
    assert {p["name"]: p.get("appProtocol") for p in service["spec"]["ports"]}["dicomweb"] == "https"


def test_dicom_destinations_come_from_a_secret(dicom):
    variables = env(container(pod_spec(dicom, "cspine-gateway"), "gateway"))
    assert variables["CSPINE_DICOM_DESTINATIONS"] == {
        "secretKeyRef": {"name": "cspine-dicom-destinations", "key": "destinations"}
    }
    (secret,) = find(dicom, "Secret", "cspine-dicom-destinations")
    assert base64.b64decode(secret["data"]["destinations"]).decode() == ",".join(DICOM_VALUES["dicom"]["destinations"])
    assert "s3cret" not in json.dumps(find(dicom, "Deployment"))  # the password only in the Secret
    # or a Secret of the site's own: nothing generated
    objects = render(*DICOM_ON, "--set", "dicom.destinationsSecret.existingSecret=pacs-destinations")
    assert env(container(pod_spec(objects, "cspine-gateway"), "gateway"))["CSPINE_DICOM_DESTINATIONS"] == {
        "secretKeyRef": {"name": "pacs-destinations", "key": "destinations"}
    }
    assert not find(objects, "Secret", "cspine-dicom-destinations")
    # none at all: no variable (cspine serve then sends results nowhere)
    assert "CSPINE_DICOM_DESTINATIONS" not in env(container(pod_spec(render(*DICOM_ON), "cspine-gateway"), "gateway"))


def test_the_dicom_node_keeps_its_spool_and_outbox_on_a_persistent_volume_at_the_data_dir(dicom):
    deployment = find(dicom, "Deployment", "cspine-gateway")[0]
    spec = deployment["spec"]["template"]
    gateway = container(spec, "gateway")
    (claim,) = find(dicom, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "cspine-dicom"
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # survives helm uninstall
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = {v["name"]: v for v in spec["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in gateway["volumeMounts"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "cspine-dicom"}
    assert mounts["data"] == env(gateway)["CSPINE_DATA_DIR"] == "/var/lib/cspine"
    assert spec["spec"]["securityContext"]["fsGroup"] == spec["spec"]["securityContext"]["runAsUser"]
    # one node on the spool at a time: the old pod goes before the new one starts
    assert deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert [h["metadata"]["name"] for h in find(dicom, "HorizontalPodAutoscaler")] == ["cspine-triton"]
    # a claim of the site's own
    objects = render(*DICOM_ON, "--set", "dicom.persistence.existingClaim=pacs-spool")
    assert not find(objects, "PersistentVolumeClaim")
    volumes = {v["name"]: v for v in pod_spec(objects, "cspine-gateway")["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"] == {"claimName": "pacs-spool"}


def test_the_dicom_ports_admit_the_api_namespaces_and_the_allowed_peers(dicom):
    (policy,) = find(dicom, "NetworkPolicy", "cspine-gateway")
    (rule,) = [r for r in policy["spec"]["ingress"] if {"port": "dicom"} in r["ports"]]
    assert rule["ports"] == [{"port": "dicom"}, {"port": "dicomweb"}]
    (namespaces, *blocks) = rule["from"]
    assert namespaces["namespaceSelector"]["matchExpressions"][0]["values"] == [NAMESPACE]
    assert [b["ipBlock"]["cidr"] for b in blocks] == ["10.20.0.0/16", "192.0.2.10/32"]
    (api,) = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": "grpc"}]]
    assert "ipBlock" not in json.dumps(api)  # the peers reach the DICOM ports only


# -- the image ------------------------------------------------------------------------------------------------


def test_the_dockerfile_runs_as_the_user_the_chart_expects_and_ships_the_models_where_triton_copies_from(default):
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.count("\nFROM ") + dockerfile.startswith("FROM ") == 2 or dockerfile.count("FROM ") == 2
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    spec = pod_spec(default, "cspine-gateway")["spec"]
    assert int(user[0]) == spec["securityContext"]["runAsUser"] != 0
    assert "COPY model_repository /opt/cspine/model_repository" in dockerfile
    assert "CSPINE_MODEL_REPOSITORY=/opt/cspine/model_repository" in dockerfile
    for source in re.findall(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE):
        assert (ROOT / source).exists(), source
    for model in SERVED:
        assert (ROOT / "model_repository" / model).is_dir()


def test_strict_validation_catches_a_misplaced_field(default):
    (deployment, *_) = find(default, "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1  # not a Container field
    with pytest.raises(kubernetes_validate.ValidationError, match="gpus"):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)
