"""Load tests: a short real Locust run against a real `cspine serve` (report written, counts consistent, no
errors), the overload run (RESOURCE_EXHAUSTED, fast, then a study succeeds again), and the pure logic beneath
them: Locust CSV → summary.json, the sweep's choice of step, Prometheus diffs, the scaling script's plan and
HPA handling. Locust itself only ever runs in subprocesses: it monkey-patches on import."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from cspine.client import Tls, analyze_paths
from cspine.gateway.tokens import Role, find_client_token
from cspine.loadtest import prom, results
from cspine.loadtest.pool import ensure_pool, plan, read_manifest
from cspine.loadtest.runner import Load, find_locustfile, locust_command
from cspine.ops.embedded import EmbeddedServer

ROOT = Path(__file__).resolve().parents[1]


def _scaling():
    spec = importlib.util.spec_from_file_location("cspine_scaling", ROOT / "load_tests" / "scaling.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


scaling = _scaling()


# --------------------------------------------------------------------------------------------------------
# Real runs


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory) -> Path:
    """Two small SYNTHETIC studies (a 29-slice CT, a radiograph), made once for the module."""
    return ensure_pool(tmp_path_factory.mktemp("pool-cache"), "small", seed=3)


def _loadtest(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cspine", "loadtest", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


def _locust_total(out: Path) -> dict:
    with open(out / "locust_stats.csv", newline="") as f:
        return next(row for row in csv.DictReader(f) if row["Name"] == "Aggregated")


def test_a_short_closed_loop_run_writes_the_report_with_consistent_counts_and_no_errors(triton, small_pool, tmp_path):
    out = tmp_path / "run"
    pool = read_manifest(small_pool)
    # The server is started by cspine loadtest itself (on the test session's Triton, to save its start-up).
    done = _loadtest(
        "--users", "2", "--duration", "5", "--out", str(out), "--pool", "small", "--pool-seed", "3",
        "--cache", str(small_pool.parent), "--triton-url", triton.grpc_url, "--triton-metrics", triton.metrics_url,
    )  # fmt: skip
    for name in ("summary.json", "report.html", "locust_stats.csv", "locust_failures.csv", "latency.png"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    total = _locust_total(out)
    log = results.read_request_logs(out)
    assert summary["errors"] == {} and summary["mode"] == "closed" and summary["users"] == 2
    assert summary["requests"] == int(total["Request Count"]) == len(log) == summary["succeeded"] > 0
    assert int(total["Failure Count"]) == 0 and all(code == "OK" for _, _, code in log)
    assert summary["studies_per_s"] == pytest.approx(float(total["Requests/s"]), rel=1e-3)
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert "AnalyzeStudy" in (out / "report.html").read_text()
    # The server's own counts of the run agree with Locust's: every call reached the gateway and was analysed.
    gateway = summary["gateway"]
    assert gateway["codes"] == {"OK": summary["requests"]} and gateway["studies_analysed"] == summary["requests"]
    triton_total = summary["triton"]["total"]
    assert triton_total["requests"] >= summary["requests"] and 0 < triton_total["model_execution_share"] <= 1
    assert set(summary["triton"]["models"]) >= {"seg_ct", "seg_xr"}
    assert summary["triton"]["models"]["lesion_classify"]["ensemble"] is True
    assert {s["profile"] for s in pool["studies"]} == {"ct_thick", "xr"}
    assert f"{summary['requests']} calls" in done.stdout


def test_overload_answers_resource_exhausted_fast_and_the_server_recovers(triton, small_pool, tmp_path):
    extra = ["--triton-url", triton.grpc_url, "--max-studies-in-flight", "1"]
    with EmbeddedServer(tmp_path / "data", tmp_path / "serve.log", extra) as server:
        out = tmp_path / "overload"
        _loadtest(
            "--overload", "--target", server.address, "--data-dir", str(tmp_path / "data"), "--users", "4",
            "--duration", "5", "--backoff", "0.2", "--out", str(out), "--pool", "small", "--pool-seed", "3",
            "--cache", str(small_pool.parent), "--gateway-metrics", f"http://127.0.0.1:{server.metrics_port}/metrics",
        )  # fmt: skip
        summary = json.loads((out / "summary.json").read_text())
        overload = summary["overload"]
        refused = summary["errors"].get("RESOURCE_EXHAUSTED", 0)
        assert refused > 0 and set(summary["errors"]) == {"RESOURCE_EXHAUSTED"}
        assert (overload["max_studies_in_flight"], overload["max_queued_studies"], overload["users"]) == (1, 2, 4)
        assert overload["resource_exhausted"] == refused == summary["gateway"]["codes"]["RESOURCE_EXHAUSTED"]
        # Refused at once, not after a wait: far faster than the studies that were analysed.
        assert overload["rejection_ms"]["p99_ms"] < 1000 and overload["rejection_ms"]["p50_ms"] < summary["p50_ms"]
        assert summary["succeeded"] > 0 and overload["recovered"] is True
        assert int(_locust_total(out)["Failure Count"]) == refused
        # And the server takes a normal study again, asked by the test itself.
        token = find_client_token(tmp_path / "data", Role.ANALYST)
        study = small_pool / read_manifest(small_pool)["studies"][0]["name"]
        assert analyze_paths(server.address, [study], timeout_s=60, token=token).modalities


# --------------------------------------------------------------------------------------------------------
# Locust CSV → summary.json


def _write_csv(path: Path, rows: list[list]) -> None:
    with path.open("w", newline="") as f:
        csv.writer(f).writerows(rows)


STATS_HEAD = ["Type", "Name", "Request Count", "Failure Count", "Median Response Time", "Average Response Time",
              "Min Response Time", "Max Response Time", "Average Content Size", "Requests/s", "Failures/s",
              "50%", "66%", "75%", "80%", "90%", "95%", "98%", "99%", "99.9%", "99.99%", "100%"]  # fmt: skip


def test_summary_takes_counts_from_locust_and_latency_from_the_successful_studies(tmp_path):
    row = [6, 2, 900, 800, 4, 2100, 1500, 0.6, 0.2, 900, 1000, 1000, 1000, 2000, 2100, 2100, 2100, 2100, 2100, 2100]
    _write_csv(tmp_path / "locust_stats.csv", [STATS_HEAD, ["grpc", "AnalyzeStudy", *row], ["", "Aggregated", *row]])
    _write_csv(
        tmp_path / "locust_failures.csv",
        [["Method", "Name", "Error", "Occurrences", "First Seen", "Last Seen"],
         ["grpc", "AnalyzeStudy", "RESOURCE_EXHAUSTED", 2, "", ""]],
    )  # fmt: skip
    head = ["timestamp", "request_type", "name", "response_time_ms", "response_length", "status_code", "exception"]
    calls = [(1000.0, "OK"), (2000.0, "OK"), (900.0, "OK"), (2100.0, "OK"), (4.0, "RESOURCE_EXHAUSTED"),
             (6.0, "RESOURCE_EXHAUSTED")]  # fmt: skip
    _write_csv(
        tmp_path / "requests-11.csv",
        [head, *[[100.0 + i, "grpc", "AnalyzeStudy", ms, 10, 0, "" if code == "OK" else code]
                 for i, (ms, code) in enumerate(calls)]],
    )  # fmt: skip
    summary = results.summarize(tmp_path / "locust", tmp_path, {"mode": "closed", "users": 3})
    assert summary["requests"] == 6 and summary["succeeded"] == 4 and summary["users"] == 3
    assert summary["errors"] == {"RESOURCE_EXHAUSTED": 2}
    assert summary["studies_per_s"] == pytest.approx(0.4) and summary["studies_per_min"] == pytest.approx(24.0)
    assert summary["p50_ms"] == 1500.0 and summary["max_ms"] == 2100.0  # of the four successes only
    assert summary["rejected"]["RESOURCE_EXHAUSTED"]["count"] == 2
    assert summary["rejected"]["RESOURCE_EXHAUSTED"]["max_ms"] == 6.0
    assert summary["locust"]["p99_ms"] == 2100.0 and summary["per_request_log_calls"] == 6
    # Without the per-request log (a distributed master), the percentiles are Locust's over every call.
    without = results.summarize(tmp_path / "locust", None, {})
    assert without["p50_ms"] == 900.0 and "rejected" not in without


def _step(users, per_s, p99, errors=None, requests=100):
    errors = errors or {}
    return {"users": users, "studies_per_s": per_s, "p99_ms": p99, "errors": errors, "requests": requests,
            "succeeded": requests - sum(errors.values())}  # fmt: skip


def test_the_sweep_picks_the_fastest_step_under_the_p99_target_without_errors():
    steps = [
        _step(1, 0.30, 2000),
        _step(2, 0.52, 4000),
        _step(4, 0.60, 12000),  # fastest, but over the target
        _step(8, 0.55, 6000, {"RESOURCE_EXHAUSTED": 40}),  # under the target, but refusing studies
    ]
    assert results.best_step(steps, 10_000)["users"] == 2
    assert results.best_step(steps, 10_000, max_error_share=0.5)["users"] == 8
    assert results.best_step(steps, 1000) is None
    assert results.saturation_step(steps)["users"] == 4
    assert results.best_step([_step(1, 0.5, 900), _step(2, 0.5, 800)], 1000)["users"] == 1  # a tie: less load


def test_the_tail_check_compares_the_slowest_study_with_twice_the_p99():
    assert results.tail_check({"p99_ms": 1000.0, "max_ms": 1900.0})["max_within_2x_p99"] is True
    assert results.tail_check({"p99_ms": 1000.0, "max_ms": 2500.0}) == {
        "p99_ms": 1000.0, "max_ms": 2500.0, "max_over_p99": 2.5, "max_within_2x_p99": False
    }  # fmt: skip
    assert results.tail_check({"p99_ms": None, "max_ms": None})["max_within_2x_p99"] is None


def test_batching_comparison_pairs_steps_of_the_same_concurrency():
    on = {"steps": [{**_step(2, 0.6, 3000), "triton": {"total": {"requests_per_execution": 1.4}}}]}
    off = {"steps": [{**_step(2, 0.5, 3500), "triton": {"total": {"requests_per_execution": 1.0}}}, _step(4, 1, 1)]}
    rows = results.compare_batching(on, off)["steps"]
    assert len(rows) == 1 and rows[0]["gain"] == 1.2 and rows[0]["requests_per_execution"] == {"on": 1.4, "off": 1.0}
    assert "| 2 | 0.600 | 0.500 | 1.2×" in results.batching_markdown(results.compare_batching(on, off))


# --------------------------------------------------------------------------------------------------------
# Prometheus


TRITON_BEFORE = """# TYPE nv_inference_request_success counter
nv_inference_request_success{model="seg_ct",version="1"} 10
nv_inference_request_success{model="lesion_classify",version="1"} 4
nv_inference_request_success{model="lesion_embed",version="1"} 4
# TYPE nv_inference_count counter
nv_inference_count{model="seg_ct",version="1"} 300
nv_inference_count{model="lesion_embed",version="1"} 8
# TYPE nv_inference_exec_count counter
nv_inference_exec_count{model="seg_ct",version="1"} 10
nv_inference_exec_count{model="lesion_embed",version="1"} 4
# TYPE nv_inference_request_duration_us counter
nv_inference_request_duration_us{model="seg_ct",version="1"} 1000000
nv_inference_request_duration_us{model="lesion_classify",version="1"} 50000
nv_inference_request_duration_us{model="lesion_embed",version="1"} 40000
# TYPE nv_inference_queue_duration_us counter
nv_inference_queue_duration_us{model="seg_ct",version="1"} 100000
# TYPE nv_inference_compute_infer_duration_us counter
nv_inference_compute_infer_duration_us{model="seg_ct",version="1"} 800000
nv_inference_compute_infer_duration_us{model="lesion_classify",version="1"} 45000
nv_inference_compute_infer_duration_us{model="lesion_embed",version="1"} 36000
# TYPE nv_inference_compute_input_duration_us counter
nv_inference_compute_input_duration_us{model="seg_ct",version="1"} 20000
# TYPE nv_inference_compute_output_duration_us counter
nv_inference_compute_output_duration_us{model="seg_ct",version="1"} 10000
"""


def _bump(text: str, changes: dict[str, float]) -> str:
    lines = []
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        lines.append(f"{key} {float(value) + changes[key]:g}" if key in changes else line)
    return "\n".join(lines) + "\n"


def test_triton_figures_come_from_counter_differences_and_leave_ensembles_out_of_the_totals():
    after = _bump(
        TRITON_BEFORE,
        {
            'nv_inference_request_success{model="seg_ct",version="1"}': 4,
            'nv_inference_count{model="seg_ct",version="1"}': 128,
            'nv_inference_exec_count{model="seg_ct",version="1"}': 2,  # 4 requests in 2 executions: batched
            'nv_inference_request_duration_us{model="seg_ct",version="1"}': 2_000_000,
            'nv_inference_queue_duration_us{model="seg_ct",version="1"}': 300_000,
            'nv_inference_compute_input_duration_us{model="seg_ct",version="1"}': 40_000,
            'nv_inference_compute_infer_duration_us{model="seg_ct",version="1"}': 1_600_000,
            'nv_inference_compute_output_duration_us{model="seg_ct",version="1"}': 20_000,
            'nv_inference_request_success{model="lesion_classify",version="1"}': 2,
            'nv_inference_request_duration_us{model="lesion_classify",version="1"}': 400_000,
            'nv_inference_compute_infer_duration_us{model="lesion_classify",version="1"}': 390_000,
        },
    )
    delta = prom.diff(prom.parse(after), prom.parse(TRITON_BEFORE))
    figures = prom.triton_figures(delta, frozenset({"lesion_classify"}), wall_s=4.0)
    ct = figures["models"]["seg_ct"]
    assert ct["requests"] == 4 and ct["avg_batch"] == 64.0 and ct["requests_per_execution"] == 2.0
    assert ct["queue_ms"] == 75.0 and ct["compute_infer_ms"] == 400.0 and ct["model_execution_share"] == 0.8
    assert "lesion_embed" not in figures["models"]  # no requests in the step
    assert figures["models"]["lesion_classify"]["ensemble"] is True
    total = figures["total"]  # seg_ct alone: the ensemble's time is its members' time
    assert total["requests"] == 4 and total["model_execution_share"] == 0.8 and total["queue_share"] == 0.15
    assert total["input_output_share"] == 0.03 and total["other_share"] == 0.02
    assert total["compute_ms_per_request"] == 415.0 and total["model_execution_seconds_per_second"] == 0.4


def test_the_time_split_sets_model_execution_against_the_gateways_own_work():
    triton = {"total": {"request_seconds": 10.0, "model_execution_share": 0.8}}
    gateway = {"studies_analysed": 4, "stage_seconds_per_study": {"preprocess": 0.2, "measure": 0.3, "segment": 2.5}}
    split = prom.time_split(triton, gateway)
    assert split == {
        "model_execution_s_per_study": 2.0,
        "triton_overhead_s_per_study": 0.5,
        "gateway_work_s_per_study": 0.5,  # segment waits on Triton: not the gateway's own work
        "model_share_of_work": 0.8,
    }
    assert prom.time_split(None, gateway) is None and prom.time_split(triton, {"studies_analysed": 0}) is None


def test_counters_are_keyed_without_total_whoever_exposes_them():
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    registry = CollectorRegistry()
    Counter("cspine_requests", "", ["rpc", "code"], registry=registry).labels("AnalyzeStudy", "OK").inc(3)
    stages = Histogram("cspine_stage_seconds", "", ["stage"], registry=registry)
    before = prom.parse(generate_latest(registry).decode())
    stages.labels("segment").observe(1.5)
    stages.labels("segment").observe(2.5)
    stages.labels("measure").observe(0.5)
    stages.labels("measure").observe(0.25)
    Counter("cspine_received_bytes", "", registry=registry).inc(2e6)
    after = prom.parse(generate_latest(registry).decode())
    assert after["cspine_requests"][(("code", "OK"), ("rpc", "AnalyzeStudy"))] == 3
    assert prom.parse(TRITON_BEFORE)["nv_inference_count"][(("model", "seg_ct"), ("version", "1"))] == 300
    figures = prom.gateway_figures(prom.diff(after, before))
    assert figures["studies_analysed"] == 2 and figures["received_mb"] == 2.0 and figures["codes"] == {}
    assert figures["stage_seconds_per_study"] == {"measure": 0.375, "segment": 2.0}


# --------------------------------------------------------------------------------------------------------
# The Locust command, the pool, the locustfile


def test_the_locust_command_spreads_the_open_loop_rate_over_users_and_keeps_the_token_off_it(tmp_path):
    load = Load(users=4, duration_s=30, rate=2.0, timeout_s=60)
    command = locust_command(Path("lf.py"), "127.0.0.1:1", load, tmp_path / "pool", tmp_path)
    flags = dict(zip(command, command[1:], strict=False))
    assert flags["-u"] == "4" and flags["-t"] == "30s" and flags["--stop-timeout"] == "60"
    assert flags["--cspine-arrival-rate"] == "0.5" and flags["--cspine-arrivals"] == "poisson"
    assert flags["--csv"] == str(tmp_path / "locust") and flags["-H"] == "127.0.0.1:1"
    assert not any("token" in part.lower() for part in command)
    assert Load(users=2, duration_s=5).mode == "closed" and load.mode == "open"


def test_the_locust_command_passes_the_targets_tls_files_to_options_the_locustfile_declares(tmp_path):
    tls = Tls(tmp_path / "ca.pem", tmp_path / "client.crt", tmp_path / "client.key")
    load = Load(users=1, duration_s=5)
    command = locust_command(Path("lf.py"), "grpcs://cspine.example.org", load, tmp_path / "pool", tmp_path, tls)
    flags = dict(zip(command, command[1:], strict=False))
    files = ("--cspine-ca", "--cspine-client-cert", "--cspine-client-key")
    assert [flags[f] for f in files] == [str(tls.ca), str(tls.client_cert), str(tls.client_key)]
    assert flags["-H"] == "grpcs://cspine.example.org"
    plain = locust_command(Path("lf.py"), "127.0.0.1:1", load, tmp_path / "pool", tmp_path)
    assert not set(files) & set(plain)
    declared = find_locustfile().read_text()  # Locust is never imported here: the options are read as text
    assert all(f'"{option}"' in declared for option in files)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"users": 0}, "users must be at least 1, got 0"), ({"rate": -1.0}, "rate must be above 0"),
     ({"arrivals": "bursty"}, "arrivals must be one of poisson, uniform, got 'bursty'")],
)  # fmt: skip
def test_a_load_with_impossible_settings_is_refused_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Load(**{"users": 1, "duration_s": 5, **kwargs})


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--target", "127.0.0.1:1", "--no-batching", "--users", "1"], "--no-batching: only for the server"),
        (["--duration", "5"], "give --users N (closed loop) or --rate R (open loop)"),
        (["--sweep", "1,2", "--rate", "1"], "--rate is an open-loop single run"),
    ],
)
def test_the_command_refuses_contradictory_flags_before_starting_anything(argv, match, capsys, tmp_path):
    from cspine.cli import main

    assert main(["loadtest", "--out", str(tmp_path), *argv]) == 2
    assert match in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no pool made, no server started


def test_the_pool_plan_draws_profiles_by_weight():
    names = [p.name for p in plan("realistic", 8)]
    assert names == ["ct_mr_xr", "ct_mr_xr", "ct", "mr_xr"] * 2
    with pytest.raises(ValueError, match="unknown pool preset 'huge'"):
        plan("huge", 2)


def test_the_locustfile_of_the_checkout_is_found_and_sets_up_gevent_before_grpc_channels():
    path = find_locustfile()
    assert path == ROOT / "load_tests" / "locustfile.py"
    text = path.read_text()
    assert text.index("init_gevent()") < text.index("open_channel(")
    # cspine never imports Locust, and nothing in this process has been monkey-patched (pytriton imports gevent).
    assert "locust" not in sys.modules
    assert "gevent.monkey" not in sys.modules or not sys.modules["gevent.monkey"].is_anything_patched()


# --------------------------------------------------------------------------------------------------------
# load_tests/scaling.py without a cluster


def test_the_scaling_plan_and_names_follow_the_chart():
    assert scaling.replica_plan(max_replicas=3) == [1, 2, 3]
    assert scaling.replica_plan([4, 1, 2, 2]) == [1, 2, 4]
    with pytest.raises(ValueError, match="at least 1"):
        scaling.replica_plan([0, 2])
    assert scaling.triton_name("prod") == "prod-cspine-triton"
    assert scaling.triton_name("cspine-eu") == "cspine-eu-triton"
    assert scaling.triton_selector("prod") == (
        "app.kubernetes.io/name=cspine,app.kubernetes.io/instance=prod,app.kubernetes.io/component=triton"
    )


def test_an_hpa_is_pinned_only_when_it_could_choose_another_count():
    bounds = scaling.HpaBounds(1, 4)
    assert scaling.needs_pin(bounds, 2) and not scaling.needs_pin(None, 2)
    assert not scaling.needs_pin(scaling.HpaBounds(2, 2), 2)
    assert scaling.pin_patch(3) == {"spec": {"minReplicas": 3, "maxReplicas": 3}}
    assert scaling.restore_patch(bounds) == {"spec": {"minReplicas": 1, "maxReplicas": 4}}


def _pod(phase="Running", ready="True", deleting=None):
    return SimpleNamespace(
        metadata=SimpleNamespace(deletion_timestamp=deleting),
        status=SimpleNamespace(phase=phase, conditions=[SimpleNamespace(type="Ready", status=ready)]),
    )


def test_only_running_ready_pods_not_being_deleted_count():
    pods = [_pod(), _pod(ready="False"), _pod(phase="Pending"), _pod(deleting="2026-01-01T00:00:00Z"), _pod()]
    assert scaling.ready_count(pods) == 2


class FakeCluster:
    """Stands in for the cluster: records every call; pods become ready as soon as the Deployment is scaled."""

    def __init__(self, replicas=3, bounds=None):
        self.calls = []
        self.current = replicas
        self.bounds = bounds

    def replicas(self):
        return self.current

    def scale(self, n):
        self.calls.append(("scale", n))
        self.current = n

    def hpa_bounds(self):
        return self.bounds

    def patch_hpa(self, patch):
        self.calls.append(("hpa", patch["spec"]["minReplicas"], patch["spec"]["maxReplicas"]))

    def ready_pods(self):
        return self.current


def test_each_step_pins_the_hpa_scales_sweeps_and_gives_the_hpa_its_bounds_back():
    cluster = FakeCluster(bounds=scaling.HpaBounds(1, 4))
    results = scaling.run_steps(cluster, [1, 2], lambda n: {"n": n}, settle_s=0, sleep=lambda s: None)
    assert results == {1: {"n": 1}, 2: {"n": 2}}
    assert cluster.calls == [("hpa", 1, 1), ("scale", 1), ("hpa", 1, 4), ("hpa", 2, 2), ("scale", 2), ("hpa", 1, 4)]


def test_without_an_hpa_the_deployment_gets_its_replicas_back_even_when_a_sweep_fails():
    cluster = FakeCluster(replicas=3)

    def failing(n):
        raise RuntimeError("gateway down")

    with pytest.raises(RuntimeError, match="gateway down"):
        scaling.run_steps(cluster, [1, 2], failing, settle_s=0, sleep=lambda s: None)
    assert cluster.calls == [("scale", 1), ("scale", 3)]


def test_pods_that_never_become_ready_time_out_naming_the_counts():
    cluster = FakeCluster(replicas=1)
    cluster.ready_pods = lambda: 1
    with pytest.raises(TimeoutError, match="1 Triton pods ready after 10 s, waiting for 2"):
        scaling.wait_ready(cluster, 2, 10.0, sleep=lambda s: None)


def test_the_scaling_table_reports_throughput_per_replica_and_efficiency():
    results = {
        1: {"best": {"studies_per_s": 0.5, "users": 2}, "saturation": {"studies_per_s": 0.6}},
        2: {"best": {"studies_per_s": 0.9, "users": 4}, "saturation": {"studies_per_s": 1.0}},
        4: {"best": None, "saturation": {"studies_per_s": 1.2}},
    }
    rows = scaling.scaling_rows(results)
    assert [r["sustained_per_replica"] for r in rows] == [0.5, 0.45, None]
    assert [r["efficiency"] for r in rows] == [1.0, 0.9, None]
    assert rows[2]["saturation_per_replica"] == 0.3
    assert "| 2 | 0.900 | 0.450 | 4 | 1.000 | 0.500 | 0.90 |" in scaling.scaling_markdown(rows)
