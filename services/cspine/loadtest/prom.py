"""Prometheus figures of a load step: scrape Triton's ``nv_inference_*`` and the gateway's ``cspine_*`` metrics
before and after, diff the counters, and turn the differences into per-request and per-study figures (Triton
queue and compute time, batch size, the share of Triton-side time spent executing models; the gateway's time
per pipeline stage)."""

from __future__ import annotations

import urllib.request
from collections import defaultdict

from prometheus_client.parser import text_string_to_metric_families

# name → {sorted label pairs → value}
Snapshot = dict[str, dict[tuple[tuple[str, str], ...], float]]

# Triton's cumulative per-request durations (µs), by the figure they become.
TRITON_DURATIONS = {
    "request": "nv_inference_request_duration_us",
    "queue": "nv_inference_queue_duration_us",
    "compute_input": "nv_inference_compute_input_duration_us",
    "compute_infer": "nv_inference_compute_infer_duration_us",
    "compute_output": "nv_inference_compute_output_duration_us",
}


def parse(text: str) -> Snapshot:
    """Prometheus text exposition → {sample name: {labels: value}}. A counter is keyed by its name without
    ``_total`` (Triton exposes ``nv_inference_count``, prometheus-client ``cspine_requests_total``; the parser
    reports both with the suffix)."""
    snapshot: Snapshot = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name
            if family.type == "counter" and name == f"{family.name}_total":
                name = family.name
            snapshot[name][tuple(sorted(sample.labels.items()))] = float(sample.value)
    return dict(snapshot)


def scrape(url: str, timeout_s: float = 5.0) -> Snapshot:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return parse(response.read().decode("utf-8"))


def diff(after: Snapshot, before: Snapshot) -> Snapshot:
    """``after − before`` for every sample of ``after`` (a sample new in ``after`` counts from 0). Meaningful
    for counters and the sums and counts of histograms, which is all the figures below read."""
    return {
        name: {labels: value - before.get(name, {}).get(labels, 0.0) for labels, value in samples.items()}
        for name, samples in after.items()
    }


def by_label(snapshot: Snapshot, name: str, label: str, **where: str) -> dict[str, float]:
    """The samples of ``name`` summed by the value of ``label``, keeping those whose labels match ``where``."""
    out: dict[str, float] = defaultdict(float)
    for labels, value in snapshot.get(name, {}).items():
        pairs = dict(labels)
        if all(pairs.get(k) == v for k, v in where.items()) and label in pairs:
            out[pairs[label]] += value
    return dict(out)


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def triton_figures(delta: Snapshot, ensembles: frozenset[str] = frozenset(), wall_s: float | None = None) -> dict:
    """Per model and in total, from the counter differences of a step.

    ``avg_batch`` is items (slices, lesions) per model execution, as Triton counts them: a request already carries
    a whole series. ``requests_per_execution`` above 1 is what dynamic batching added: requests merged into one
    execution.

    Durations are Triton's per-request sums, so a batch of k requests counts its execution k times and the
    ratios below are per request. Ensembles are listed but left out of the totals: their time is their
    composing models' time, which is counted already. ``model_execution_share`` is compute_infer over request
    duration; the rest is named: queue (waiting for a model instance or for a batch to form), input/output
    (copying tensors in and out), other (scheduling and the Python backend's hand-over outside those)."""
    requests = by_label(delta, "nv_inference_request_success", "model")
    inferences = by_label(delta, "nv_inference_count", "model")
    executions = by_label(delta, "nv_inference_exec_count", "model")
    failures = by_label(delta, "nv_inference_request_failure", "model")
    durations = {key: by_label(delta, name, "model") for key, name in TRITON_DURATIONS.items()}
    models = {}
    totals = dict.fromkeys(TRITON_DURATIONS, 0.0)
    total_inferences = total_executions = total_requests = 0.0
    for model in sorted(m for m, n in requests.items() if n > 0):
        n = requests[model]
        us = {key: durations[key].get(model, 0.0) for key in TRITON_DURATIONS}
        ensemble = model in ensembles
        models[model] = {
            "requests": int(n),
            "failures": int(failures.get(model, 0.0)),
            "ensemble": ensemble,
            "avg_batch": _round(_ratio(inferences.get(model, 0.0), executions.get(model, 0.0)), 2),
            "requests_per_execution": _round(_ratio(n, executions.get(model, 0.0)), 2),
            **{f"{key}_ms": _round(us[key] / n / 1000.0) for key in TRITON_DURATIONS},
            "model_execution_share": _round(_ratio(us["compute_infer"], us["request"])),
        }
        if not ensemble:
            for key in TRITON_DURATIONS:
                totals[key] += us[key]
            total_inferences += inferences.get(model, 0.0)
            total_executions += executions.get(model, 0.0)
            total_requests += n
    other = totals["request"] - totals["queue"] - totals["compute_input"] - totals["compute_infer"]
    other -= totals["compute_output"]
    request_s = totals["request"] / 1e6
    total = {
        "requests": int(total_requests),
        "request_seconds": round(request_s, 3),
        "queue_ms_per_request": _round(_ratio(totals["queue"] / 1000.0, total_requests)),
        "compute_ms_per_request": _round(
            _ratio(
                (totals["compute_input"] + totals["compute_infer"] + totals["compute_output"]) / 1000.0, total_requests
            )
        ),
        "avg_batch": _round(_ratio(total_inferences, total_executions), 2),
        "requests_per_execution": _round(_ratio(total_requests, total_executions), 2),
        "model_execution_share": _round(_ratio(totals["compute_infer"], totals["request"])),
        "queue_share": _round(_ratio(totals["queue"], totals["request"])),
        "input_output_share": _round(_ratio(totals["compute_input"] + totals["compute_output"], totals["request"])),
        "other_share": _round(_ratio(other, totals["request"])),
        "model_execution_seconds_per_second": _round(_ratio(totals["compute_infer"] / 1e6, wall_s or 0.0)),
    }
    return {"models": models, "total": total}


def gateway_figures(delta: Snapshot, rpc: str = "AnalyzeStudy") -> dict:
    """Per analysed study: seconds in each pipeline stage, Triton calls as the gateway saw them, the mean
    AnalyzeStudy latency (every call, refused ones included), status codes and MB received."""
    stage_sum = by_label(delta, "cspine_stage_seconds_sum", "stage")
    stage_count = by_label(delta, "cspine_stage_seconds_count", "stage")
    analysed = max(stage_count.values(), default=0.0)
    triton_sum = by_label(delta, "cspine_triton_request_seconds_sum", "model")
    triton_count = by_label(delta, "cspine_triton_request_seconds_count", "model")
    calls = by_label(delta, "cspine_request_seconds_count", "rpc").get(rpc, 0.0)
    seconds = by_label(delta, "cspine_request_seconds_sum", "rpc").get(rpc, 0.0)
    codes = by_label(delta, "cspine_requests", "code", rpc=rpc)
    received = sum(delta.get("cspine_received_bytes", {}).values())
    return {
        "studies_analysed": int(analysed),
        "stage_seconds_per_study": {
            stage: _round(_ratio(stage_sum[stage], stage_count.get(stage, 0.0))) for stage in sorted(stage_sum)
        },
        "triton_ms_per_call": {
            model: _round(_ratio(triton_sum[model] * 1000.0, triton_count.get(model, 0.0)), 1)
            for model in sorted(triton_sum)
            if triton_count.get(model)
        },
        "triton_calls_per_study": _round(_ratio(sum(triton_count.values()), analysed), 2),
        "request_seconds_mean": _round(_ratio(seconds, calls)),
        "codes": {code: int(n) for code, n in sorted(codes.items()) if n},
        "received_mb": round(received / 1e6, 1),
    }


# The gateway's own work: the stages that do not wait on Triton (segment and classify mostly do).
GATEWAY_WORK_STAGES = ("select", "preprocess", "measure", "fuse", "dicom")


def time_split(triton: dict | None, gateway: dict | None) -> dict | None:
    """Per analysed study, seconds of work: model execution in Triton, the rest of Triton's request time, and
    the gateway's own stages (GATEWAY_WORK_STAGES; ingest is not a stage metric); and model execution's share
    of model execution + gateway work. Work is summed over calls, so it can exceed a study's wall time."""
    if not triton or not gateway or not gateway.get("studies_analysed"):
        return None
    studies = gateway["studies_analysed"]
    total = triton["total"]
    request_s = total["request_seconds"] / studies
    model_s = request_s * (total["model_execution_share"] or 0.0)
    stages = gateway["stage_seconds_per_study"]
    gateway_s = sum(stages.get(stage) or 0.0 for stage in GATEWAY_WORK_STAGES)
    return {
        "model_execution_s_per_study": round(model_s, 3),
        "triton_overhead_s_per_study": round(request_s - model_s, 3),
        "gateway_work_s_per_study": round(gateway_s, 3),
        "model_share_of_work": _round(_ratio(model_s, model_s + gateway_s)),
    }
