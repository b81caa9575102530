"""The chart's monitoring, checked with the real tools: the PrometheusRule rendered by helm, checked and
unit-tested by promtool on SYNTHETIC series (tests/promtool/alerts_test.yaml), and the Grafana dashboard
(helm/cspine/files/dashboard.json), whose every query, like every alert, names a metric the gateway or Triton
exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cspine.gateway.metrics import Metrics
from support.helm import CHART, ROOT, find, helm, render

PROMTOOL_TESTS = ROOT / "tests" / "promtool" / "alerts_test.yaml"
RULES_FILE = "cspine-rules.yaml"  # the rule_files entry of alerts_test.yaml
DASHBOARD = CHART / "files" / "dashboard.json"
RULE_TEMPLATE = "templates/prometheusrule.yaml"
DASHBOARD_TEMPLATE = "templates/grafana-dashboard.yaml"

ALERTS = {
    "CspineHighErrorRatio": "critical",
    "CspineStudyLatencyP99High": "warning",
    "CspineTritonQueueTimeHigh": "warning",
    "CspineTritonDown": "critical",
    "CspinePrototypeStoreUnreachable": "critical",
    "CspineGatewayDown": "critical",
}

# Triton's own metrics, as its metrics documentation lists them (Triton Inference Server user guide, "Metrics":
# https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/user_guide/metrics.html):
# per model and version, request counts and cumulative durations in microseconds; per GPU, utilisation and memory.
TRITON_METRICS = frozenset(
    {
        "nv_inference_request_success",
        "nv_inference_request_failure",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
        "nv_gpu_utilization",
        "nv_gpu_memory_used_bytes",
        "nv_gpu_memory_total_bytes",
    }
)
# Prometheus writes `up` itself for every target it scrapes.
PROMETHEUS_METRICS = frozenset({"up"})
# The series names each exposition type gives in PromQL (prometheus_client names a counter family without _total).
SERIES_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}

# What the dashboard must show: traffic, latency and stages from the gateway; queue, compute, batching, GPU from
# Triton; readiness and the prototype set in use.
DASHBOARD_METRICS = {
    "cspine_requests_total",
    "cspine_request_seconds_bucket",
    "cspine_stage_seconds_sum",
    "cspine_stage_seconds_count",
    "cspine_studies_in_flight",
    "cspine_triton_ready",
    "cspine_store_up",
    "cspine_prototype_set_info",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_success",
    "nv_gpu_utilization",
    "nv_gpu_memory_used_bytes",
}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# PromQL words that look like metric names but are not (functions are told apart by the "(" after them).
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or"}
PROMQL_KEYWORDS |= {"unless", "inf", "nan"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found on PATH: install the Debian package prometheus (`make sysdeps`); the chart's alert "
            "rules and dashboard queries are checked with it",
            pytrace=False,
        )
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def gateway_series() -> set[str]:
    """Every series name the gateway's registry can expose, labelled families included (they have no samples
    until first used)."""
    families = Metrics().registry.collect()
    return {f.name + suffix for f in families for suffix in SERIES_SUFFIXES[f.type]}


def metric_names(expr: str) -> list[str]:
    """The metric names a PromQL expression selects, once per selector, in order."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values and strings
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)  # matchers, ranges
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = []
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group().lower() in PROMQL_KEYWORDS:
            continue
        names.append(match.group())
    return names


def rule_object(*args: str) -> dict:
    (rule,) = find(render("--show-only", RULE_TEMPLATE, *args), "PrometheusRule")
    return rule


def alert_rules(rule: dict) -> dict[str, dict]:
    return {r["alert"]: r for group in rule["spec"]["groups"] for r in group["rules"]}


@pytest.fixture(scope="module")
def default_rule() -> dict:
    return rule_object()


@pytest.fixture(scope="module")
def rules_dir(default_rule: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The rendered rules file (the PrometheusRule's spec) with the promtool unit tests beside it."""
    folder = tmp_path_factory.mktemp("promtool")
    (folder / RULES_FILE).write_text(yaml.safe_dump(default_rule["spec"], sort_keys=False))
    shutil.copy(PROMTOOL_TESTS, folder / PROMTOOL_TESTS.name)
    return folder


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel but the rows, collapsed rows' panels included."""
    panels = []
    for panel in dashboard["panels"]:
        panels += panel.get("panels", []) if panel["type"] == "row" else [panel]
    return panels


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in dashboard_panels(dashboard) for t in p["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = re.fullmatch(r"label_values\((.*), *\w+\)", variable["query"]["query"])
            assert query, variable["query"]
            queries.append((f"variable {variable['name']}", query.group(1)))
    return queries


def as_plain_promql(expr: str) -> str:
    """A dashboard query as Prometheus itself would get it from Grafana, for namespace cspine."""
    return expr.replace("$__rate_interval", "5m").replace("$namespace", "cspine")


def datasource_references(node: object) -> list[object]:
    if isinstance(node, dict):
        found = [node["datasource"]] if "datasource" in node else []
        return found + [ref for value in node.values() for ref in datasource_references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in datasource_references(value)]
    return []


# --- alerts -----------------------------------------------------------------------------------------------------


def test_the_rendered_rules_pass_promtool_check(rules_dir: Path):
    result = promtool("check", "rules", str(rules_dir / RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_each_alert_fires_and_stays_silent_on_synthetic_series_as_the_promtool_unit_tests_expect(rules_dir: Path):
    result = promtool("test", "rules", PROMTOOL_TESTS.name, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_promtool_unit_tests_show_every_alert_both_firing_and_silent():
    cases = [case for test in yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    assert {c["alertname"] for c in cases if c["exp_alerts"]} == set(ALERTS)
    assert {c["alertname"] for c in cases if not c["exp_alerts"]} == set(ALERTS)
    for case in cases:
        for alert in case["exp_alerts"]:
            assert alert["exp_labels"]["severity"] == ALERTS[case["alertname"]]
            assert set(alert["exp_annotations"]) == {"summary", "description"}


def test_every_alert_has_its_severity_the_for_of_the_values_and_says_what_to_check(default_rule: dict):
    rules = alert_rules(default_rule)
    assert {name: rule["labels"]["severity"] for name, rule in rules.items()} == ALERTS
    for name, rule in rules.items():
        assert rule["for"] == "5m", name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        assert "Check " in rule["annotations"]["description"], name
        assert rule["annotations"]["description"].endswith("Runbook: docs/deploy.md#alerts."), name


def test_the_default_thresholds_of_the_values_end_the_threshold_alerts_expressions(default_rule: dict):
    rules = alert_rules(default_rule)
    assert rules["CspineHighErrorRatio"]["expr"].endswith("> 0.05")
    assert rules["CspineStudyLatencyP99High"]["expr"].endswith("> 10")
    assert rules["CspineTritonQueueTimeHigh"]["expr"].endswith("> 100000")
    assert 'code=~"INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|UNKNOWN"' in rules["CspineHighErrorRatio"]["expr"]


def test_a_p99_threshold_set_on_the_command_line_reaches_the_latency_expression():
    rule = alert_rules(rule_object("--set", "alerts.p99StudySeconds=42"))["CspineStudyLatencyP99High"]
    assert rule["expr"].startswith("histogram_quantile(0.99, ")
    assert rule["expr"].endswith("> 42")
    assert "above 42 s." in rule["annotations"]["description"]


def test_thresholds_and_for_from_a_values_file_reach_every_alert(tmp_path: Path):
    values = tmp_path / "alerts.yaml"
    values.write_text(yaml.safe_dump({"alerts": {"errorRatio": 0.2, "queueMicroseconds": 2500000, "for": "15m"}}))
    (rule,) = find(render("--show-only", RULE_TEMPLATE, values=values), "PrometheusRule")
    rules = alert_rules(rule)
    assert rules["CspineHighErrorRatio"]["expr"].endswith("> 0.2")
    # a plain integer, not Go's 2.5e+06, in the expression and the text
    assert rules["CspineTritonQueueTimeHigh"]["expr"].endswith("> 2500000")
    assert "above 2500000 µs." in rules["CspineTritonQueueTimeHigh"]["annotations"]["description"]
    assert {r["for"] for r in rules.values()} == {"15m"}


def test_the_rules_select_their_own_release_by_namespace_and_service_name():
    result = helm("template", "radiology", str(CHART), "--namespace", "imaging", "--show-only", RULE_TEMPLATE)
    assert result.returncode == 0, result.stderr
    (rule,) = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    rules = alert_rules(rule)
    gateway = 'namespace="imaging", service="radiology-cspine-gateway"'
    triton = 'namespace="imaging", service="radiology-cspine-triton-headless"'
    for name in ("CspineHighErrorRatio", "CspineStudyLatencyP99High", "CspinePrototypeStoreUnreachable"):
        assert gateway in rules[name]["expr"], name
    assert triton in rules["CspineTritonQueueTimeHigh"]["expr"]
    assert triton in rules["CspineTritonDown"]["expr"] and gateway in rules["CspineTritonDown"]["expr"]
    assert all('"cspine' not in r["expr"] for r in rules.values())  # nothing of the default release left


def test_without_service_monitors_the_down_alerts_do_not_fire_on_absent_targets():
    with_monitors = alert_rules(rule_object())
    without = alert_rules(rule_object("--set", "monitoring.serviceMonitor.enabled=false"))
    assert "absent(up{" in with_monitors["CspineTritonDown"]["expr"]
    assert "absent(up{" in with_monitors["CspineGatewayDown"]["expr"]
    assert not any("absent(" in r["expr"] for r in without.values())


def test_extra_rule_labels_join_the_chart_labels():
    rule = rule_object("--set", "monitoring.prometheusRule.labels.release=kube-prometheus-stack")
    labels = rule["metadata"]["labels"]
    assert labels["release"] == "kube-prometheus-stack"
    assert labels["app.kubernetes.io/name"] == "cspine"
    assert rule["metadata"]["name"] == "cspine"


def test_no_prometheus_rule_is_rendered_when_disabled():
    assert len(find(render(), "PrometheusRule")) == 1
    assert find(render("--set", "monitoring.prometheusRule.enabled=false"), "PrometheusRule") == []


# --- metric names, alerts and dashboard together ------------------------------------------------------------------


def test_the_name_finder_sees_every_selector_and_no_function_label_or_number():
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{rpc="x{y}"}[5m]))) / on(pod) group_left(version) '
        'b_info > 1e6 or absent(up{job="z"}) unless c offset 5m'
    )
    assert metric_names(expr) == ["a_bucket", "b_info", "up", "c"]


def test_every_metric_an_alert_or_a_panel_queries_is_exported_by_the_gateway_or_triton(
    default_rule: dict, dashboard: dict
):
    known = gateway_series() | TRITON_METRICS | PROMETHEUS_METRICS
    queries = [(f"alert {name}", rule["expr"]) for name, rule in alert_rules(default_rule).items()]
    queries += dashboard_queries(dashboard)
    unknown = {where: sorted(set(metric_names(expr)) - known) for where, expr in queries}
    assert {where: names for where, names in unknown.items() if names} == {}
    assert all(metric_names(expr) for _, expr in queries)


# --- dashboard --------------------------------------------------------------------------------------------------


def test_the_dashboard_is_cspines_with_a_prometheus_datasource_and_a_namespace_variable(dashboard: dict):
    assert dashboard["uid"] == "cspine"
    assert dashboard["title"] == "cspine — gateway and Triton"
    assert dashboard["schemaVersion"] == 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    namespace = variables["namespace"]
    assert namespace["type"] == "query"
    assert namespace["datasource"] == DATASOURCE
    assert namespace["query"]["query"] == "label_values(cspine_studies_in_flight, namespace)"


def test_every_panel_has_a_target_and_every_datasource_reference_is_the_variable(dashboard: dict):
    panels = dashboard_panels(dashboard)
    assert len(panels) >= 12
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert all(target["expr"].strip() for target in panel["targets"]), panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
    references = datasource_references(dashboard)
    assert len(references) > len(panels)  # panels, their targets and the namespace variable
    assert all(ref == DATASOURCE for ref in references)


def test_every_dashboard_selector_is_limited_to_the_chosen_namespace(dashboard: dict):
    for where, expr in dashboard_queries(dashboard):
        if where.startswith("variable"):
            continue
        selectors = re.findall(r"[A-Za-z_:][\w:]*\{([^}]*)\}", expr)
        assert len(selectors) == len(metric_names(expr)), where  # no bare metric names
        assert all('namespace="$namespace"' in labels for labels in selectors), where


def test_the_dashboard_joins_gateway_traffic_stages_and_readiness_with_triton_queue_batching_and_gpus(
    dashboard: dict,
):
    used = {name for _, expr in dashboard_queries(dashboard) for name in metric_names(expr)}
    assert used >= DASHBOARD_METRICS, sorted(DASHBOARD_METRICS - used)


def test_every_dashboard_query_is_valid_promql(dashboard: dict, tmp_path: Path):
    rules = [
        {"record": f"cspine_dashboard:query_{i}", "expr": as_plain_promql(expr)}
        for i, (_, expr) in enumerate(dashboard_queries(dashboard))
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def panel_query(dashboard: dict, title: str, ref: str = "A") -> str:
    (panel,) = [p for p in dashboard_panels(dashboard) if p["title"] == title]
    (target,) = [t for t in panel["targets"] if t["refId"] == ref]
    return as_plain_promql(target["expr"])


def test_the_batch_size_queue_and_stage_panels_compute_known_values_on_synthetic_series(
    dashboard: dict, tmp_path: Path
):
    """SYNTHETIC counters a minute apart: seg_ct runs 240 inferences in 60 executions (batches of 4), each of its
    60 requests waits 3000 µs and computes 9000 µs; the segment stage takes 2 s per study, 5 studies a minute."""
    triton = 'namespace="cspine", service="cspine-triton-headless", pod="cspine-triton-fake-a", model="seg_ct"'
    gateway = 'namespace="cspine", service="cspine-gateway", pod="cspine-gateway-fake-a", stage="segment"'
    series = {
        f"nv_inference_count{{{triton}}}": "0+240x20",
        f"nv_inference_exec_count{{{triton}}}": "0+60x20",
        f"nv_inference_request_success{{{triton}}}": "0+60x20",
        f"nv_inference_queue_duration_us{{{triton}}}": "0+180000x20",
        f"nv_inference_compute_infer_duration_us{{{triton}}}": "0+540000x20",
        f"cspine_stage_seconds_sum{{{gateway}}}": "0+10x20",
        f"cspine_stage_seconds_count{{{gateway}}}": "0+5x20",
        # another namespace's Triton, batching nothing: the namespace filter keeps it out
        'nv_inference_count{namespace="elsewhere", model="seg_ct"}': "0+60x20",
        'nv_inference_exec_count{namespace="elsewhere", model="seg_ct"}': "0+60x20",
    }
    queue_time = "Queue vs compute time per request, per model"
    expectations = [
        (panel_query(dashboard, "Average batch size, per model"), '{model="seg_ct"}', 4),
        (panel_query(dashboard, queue_time, "A"), '{model="seg_ct"}', 3000),
        (panel_query(dashboard, queue_time, "B"), '{model="seg_ct"}', 9000),
        (panel_query(dashboard, "Time per pipeline stage, per study"), '{stage="segment"}', 2),
    ]
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": name, "values": values} for name, values in series.items()],
                "promql_expr_test": [
                    {"expr": expr, "eval_time": "15m", "exp_samples": [{"labels": labels, "value": value}]}
                    for expr, labels, value in expectations
                ],
            }
        ],
    }
    path = tmp_path / "dashboard_test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_rendered_config_map_carries_the_dashboard_json_with_the_sidecar_label(dashboard: dict):
    (config_map,) = find(render("--show-only", DASHBOARD_TEMPLATE), "ConfigMap", "cspine-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["app.kubernetes.io/instance"] == "cspine"
    assert json.loads(config_map["data"]["cspine.json"]) == dashboard
    assert config_map["data"]["cspine.json"] == DASHBOARD.read_text().rstrip("\n")


def test_no_dashboard_config_map_is_rendered_when_disabled():
    assert find(render(), "ConfigMap", "cspine-dashboard")
    assert find(render("--set", "monitoring.grafanaDashboard.enabled=false"), "ConfigMap", "cspine-dashboard") == []
