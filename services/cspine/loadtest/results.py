"""What a load run leaves behind, read back: Locust's CSV and the per-request CSV as ``summary.json``; a sweep's
steps as the best one under a p99 target, its table (Markdown) and plot (PNG). Pure functions, apart from
reading and writing the files named."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

OK = "OK"
REQUEST_TYPE, REQUEST_NAME = "grpc", "AnalyzeStudy"
PERCENTILES = {"p50_ms": 50, "p95_ms": 95, "p99_ms": 99}


# --------------------------------------------------------------------------------------------------------
# One run


def read_locust_stats(prefix: Path) -> dict[str, dict[str, str]]:
    """Rows of Locust's ``PREFIX_stats.csv`` by name ("AnalyzeStudy", "Aggregated")."""
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {row["Name"]: row for row in csv.DictReader(f)}


def read_locust_failures(prefix: Path) -> dict[str, int]:
    """``{error: occurrences}`` from Locust's ``PREFIX_failures.csv``; cspine's locustfile reports a failed call as
    its gRPC status code name, so the keys are codes (RESOURCE_EXHAUSTED …)."""
    errors: dict[str, int] = {}
    with open(f"{prefix}_failures.csv", newline="") as f:
        for row in csv.DictReader(f):
            errors[row["Error"]] = errors.get(row["Error"], 0) + int(row["Occurrences"])
    return dict(sorted(errors.items()))


def read_request_logs(folder: Path) -> list[tuple[float, float, str]]:
    """(start time, latency ms, status code) of every AnalyzeStudy call in ``folder/requests-*.csv`` (one file per
    load-generating process, written by load_tests/locustfile.py), in start order."""
    rows = []
    for path in sorted(Path(folder).glob("requests-*.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                if row["request_type"] == REQUEST_TYPE and row["name"] == REQUEST_NAME:
                    rows.append((float(row["timestamp"]), float(row["response_time_ms"]), row["exception"] or OK))
    return sorted(rows)


def latency(ms: list[float] | np.ndarray) -> dict[str, float | None]:
    """p50/p95/p99 (linear interpolation), max and mean in ms; None for no calls."""
    values = np.asarray(ms, dtype=float)
    if values.size == 0:
        return {**dict.fromkeys(PERCENTILES), "max_ms": None, "mean_ms": None}
    out = {key: round(float(np.percentile(values, q)), 1) for key, q in PERCENTILES.items()}
    return {**out, "max_ms": round(float(values.max()), 1), "mean_ms": round(float(values.mean()), 1)}


def _int(text: str) -> int:
    return int(float(text)) if text not in ("", "N/A") else 0


def _float(text: str) -> float | None:
    return float(text) if text not in ("", "N/A") else None


def summarize(prefix: Path, log_folder: Path | None, run: dict) -> dict:
    """summary.json of one run.

    ``requests``, ``errors`` and ``studies_per_s`` are Locust's own figures (its CSV; they hold in distributed
    runs too): calls completed, failed calls by status code, and successful calls per second (Locust's
    requests/s − failures/s). The latency percentiles are those of the successful studies, from the per-request
    log, when there is one; without it (a distributed master) they are Locust's, over every call. ``rejected``
    gives the latency of failed calls by code: how fast overload is answered. ``run`` (mode, users, rate …) is
    copied in."""
    rows = read_locust_stats(prefix)
    total = rows.get("Aggregated") or {}
    requests = _int(total.get("Request Count", "0"))
    failures = _int(total.get("Failure Count", "0"))
    rps, fps = _float(total.get("Requests/s", "")) or 0.0, _float(total.get("Failures/s", "")) or 0.0
    locust = {
        "requests": requests,
        "failures": failures,
        "requests_per_s": round(rps, 4),
        "p50_ms": _float(total.get("50%", "")),
        "p95_ms": _float(total.get("95%", "")),
        "p99_ms": _float(total.get("99%", "")),
        "max_ms": _float(total.get("Max Response Time", "")),
    }
    errors = read_locust_failures(prefix)
    log = read_request_logs(log_folder) if log_folder else []
    summary = {
        "synthetic": True,
        **run,
        "requests": requests,
        "succeeded": requests - failures,
        "errors": errors,
        "studies_per_s": round(rps - fps, 4),
        "studies_per_min": round(60 * (rps - fps), 2),
    }
    if log:
        ok = [ms for _, ms, code in log if code == OK]
        summary.update(latency(ok))
        summary["latency_of"] = "successful studies (per-request log)"
        summary["rejected"] = {
            code: {"count": len(values), **latency(values)}
            for code in sorted({c for _, _, c in log if c != OK})
            for values in [[ms for _, ms, c in log if c == code]]
        }
        summary["per_request_log_calls"] = len(log)
    else:
        summary.update({k: locust[k] for k in ("p50_ms", "p95_ms", "p99_ms", "max_ms")})
        summary["latency_of"] = "every call (Locust's percentiles; no per-request log)"
    summary["locust"] = locust
    return summary


def write_json(path: Path, body: dict) -> Path:
    Path(path).write_text(json.dumps(body, indent=2) + "\n")
    return Path(path)


def plot_latency(log: list[tuple[float, float, str]], path: Path, title: str) -> Path | None:
    """Latency of every call against time since the first, coloured by status code (PNG)."""
    if not log:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    start = log[0][0]
    fig, ax = plt.subplots(figsize=(8, 4))
    for code in sorted({c for _, _, c in log}, key=lambda c: (c != OK, c)):
        points = [(t - start, ms / 1000.0) for t, ms, c in log if c == code]
        seconds, latency = zip(*points, strict=True)
        ax.scatter(seconds, latency, s=10, label=f"{code} ({len(points)})", alpha=0.7)
    ax.set_xlabel("seconds since the first call")
    ax.set_ylabel("latency (s)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------------------
# A sweep


def error_share(step: dict) -> float:
    return sum(step["errors"].values()) / step["requests"] if step["requests"] else 0.0


def best_step(steps: list[dict], p99_target_ms: float, max_error_share: float = 0.0) -> dict | None:
    """The step with the most studies/s whose p99 is under the target and whose failed share of calls is at most
    ``max_error_share`` (default: none failed); the lighter load wins a tie. None when no step qualifies."""
    good = [
        s
        for s in steps
        if s["succeeded"] > 0 and s["p99_ms"] is not None and s["p99_ms"] <= p99_target_ms
        if error_share(s) <= max_error_share
    ]
    return max(good, key=lambda s: (s["studies_per_s"], -s["users"]), default=None)


def saturation_step(steps: list[dict]) -> dict | None:
    """The step with the most studies/s, whatever its latency or errors: what the node does flat out."""
    return max((s for s in steps if s["succeeded"] > 0), key=lambda s: (s["studies_per_s"], -s["users"]), default=None)


def tail_check(summary: dict) -> dict:
    """The issue's tail goal for one run: no successful study slower than twice the run's p99."""
    p99, worst = summary.get("p99_ms"), summary.get("max_ms")
    if not p99 or worst is None:
        return {"p99_ms": p99, "max_ms": worst, "max_over_p99": None, "max_within_2x_p99": None}
    ratio = worst / p99
    return {"p99_ms": p99, "max_ms": worst, "max_over_p99": round(ratio, 2), "max_within_2x_p99": ratio <= 2.0}


def _users(n: int) -> str:
    return f"{n} user" if n == 1 else f"{n} users"


def _s(ms: float | None) -> str:
    return "–" if ms is None else f"{ms / 1000:.2f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _num(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def step_rows(steps: list[dict]) -> list[str]:
    """Markdown table: load, throughput and latency beside Triton's and the gateway's figures per step."""
    stages = sorted({k for s in steps for k in (s.get("gateway") or {}).get("stage_seconds_per_study", {})})
    shown = [k for k in ("preprocess", "segment", "measure", "classify", "dicom", "select", "fuse") if k in stages]
    head = (
        "| users | studies/s | p50 s | p99 s | max s | errors | Triton queue ms/req | compute ms/req | items/exec "
        "| req/exec | model exec share | " + " | ".join(f"gw {k} s" for k in shown) + " |"
    )
    lines = [head, "|" + "---|" * (11 + len(shown))]
    for s in steps:
        t = (s.get("triton") or {}).get("total", {})
        g = (s.get("gateway") or {}).get("stage_seconds_per_study", {})
        errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
        load = f"{s['users']}" if s.get("mode") != "open" else f"{s['rate']:g}/s open"
        lines.append(
            f"| {load} | {s['studies_per_s']:.3f} | {_s(s['p50_ms'])} | {_s(s['p99_ms'])} | {_s(s['max_ms'])} "
            f"| {errors} | {_num(t.get('queue_ms_per_request'))} | {_num(t.get('compute_ms_per_request'))} "
            f"| {_num(t.get('avg_batch'), '{:.2f}')} | {_num(t.get('requests_per_execution'), '{:.2f}')} "
            f"| {_pct(t.get('model_execution_share'))} | " + " | ".join(_num(g.get(k), "{:.2f}") for k in shown) + " |"
        )
    return lines


WITHIN = {True: "within", False: "NOT within", None: "not measured against"}


def sweep_markdown(sweep: dict) -> str:
    """The sweep's report: the table, the best step under the target, saturation, the tail check, Triton's time."""
    lines = [
        f"# Load sweep ({sweep['started']}, SYNTHETIC studies, pool {sweep['pool']})",
        "",
        f"Target {sweep['target']}; closed loop, {sweep['duration_s']:g} s per step; p99 target "
        f"{sweep['p99_target_ms'] / 1000:g} s; {sweep.get('server', '')}".rstrip("; "),
        "",
        *step_rows(sweep["steps"]),
        "",
    ]
    best, sat = sweep.get("best"), sweep.get("saturation")
    if best:
        lines.append(
            f"**Sustained: {best['studies_per_s']:.3f} studies/s ({60 * best['studies_per_s']:.1f}/min) at "
            f"{_users(best['users'])}, p99 {best['p99_ms'] / 1000:.2f} s, errors {sum(best['errors'].values())}.**"
        )
    else:
        lines.append("**No step met the p99 target without errors.**")
    if sat:
        t = (sat.get("triton") or {}).get("total", {})
        lines.append(
            f"Saturation: {sat['studies_per_s']:.3f} studies/s at {_users(sat['users'])}. Triton-side time there: "
            f"model execution {_pct(t.get('model_execution_share'))}, queue {_pct(t.get('queue_share'))}, "
            f"input/output {_pct(t.get('input_output_share'))}, other {_pct(t.get('other_share'))}."
        )
        split = sat.get("time_split")
        if split:
            lines.append(
                f"Work per study there: model execution {split['model_execution_s_per_study']:.2f} s, the rest of "
                f"Triton's request time {split['triton_overhead_s_per_study']:.2f} s, the gateway's own stages "
                f"{split['gateway_work_s_per_study']:.2f} s: model execution is "
                f"{_pct(split['model_share_of_work'])} of model execution + gateway work."
            )
    tail = sweep.get("headroom")
    if tail:
        check = tail["tail"]
        lines.append(
            f"At 80 % of saturation ({tail['rate']:.3f} studies/s offered, open loop, {tail['arrivals']} arrivals): "
            f"{tail['studies_per_s']:.3f} studies/s, p99 {_s(check['p99_ms'])} s, slowest {_s(check['max_ms'])} s "
            f"({WITHIN[check['max_within_2x_p99']]} 2× p99), errors "
            f"{sum(tail['errors'].values())} of {tail['requests']}."
        )
    return "\n".join(lines) + "\n"


def plot_sweep(sweep: dict, path: Path) -> Path:
    """Throughput and p99 against concurrency (left); per step, where a study's time goes on the Triton side and
    in the gateway's stages, side by side (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sweep["steps"]
    users = [s["users"] for s in steps]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.6))
    ax.plot(users, [s["studies_per_s"] for s in steps], "o-", color="tab:blue", label="studies/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(users, [str(u) for u in users])
    ax.set_xlabel("concurrent users (closed loop)")
    ax.set_ylabel("studies/s", color="tab:blue")
    ax.set_ylim(bottom=0, top=1.15 * max([s["studies_per_s"] for s in steps] + [0.01]))
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(users, [(s["p99_ms"] or 0) / 1000 for s in steps], "s--", color="tab:red", label="p99")
    ax2.axhline(sweep["p99_target_ms"] / 1000, color="tab:red", alpha=0.4, linestyle=":", label="p99 target")
    ax2.set_ylabel("p99 latency (s)", color="tab:red")
    ax2.set_ylim(bottom=0)
    if sweep.get("best"):
        ax.axvline(sweep["best"]["users"], color="tab:green", alpha=0.5, label="best under target")
    ax.set_title("throughput and p99 against load")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper left", fontsize=8)

    # Right: seconds per analysed study. Triton: its request time split; gateway: its stages.
    x = np.arange(len(steps))
    width = 0.38
    triton_parts = ("model execution", "queue", "input/output", "other")
    bottoms = np.zeros(len(steps))
    for part, share_key in zip(
        triton_parts, ("model_execution_share", "queue_share", "input_output_share", "other_share"), strict=True
    ):
        values = []
        for s in steps:
            t = (s.get("triton") or {}).get("total", {})
            studies = max((s.get("gateway") or {}).get("studies_analysed") or s["succeeded"], 1)
            values.append((t.get("request_seconds") or 0) * (t.get(share_key) or 0) / studies)
        bx.bar(x - width / 2, values, width, bottom=bottoms, label=f"Triton {part}")
        bottoms += np.array(values)
    stages = sorted({k for s in steps for k in (s.get("gateway") or {}).get("stage_seconds_per_study", {})})
    bottoms = np.zeros(len(steps))
    for stage in stages:
        values = [((s.get("gateway") or {}).get("stage_seconds_per_study", {}).get(stage) or 0) for s in steps]
        bx.bar(x + width / 2, values, width, bottom=bottoms, label=f"gateway {stage}", hatch="//", alpha=0.8)
        bottoms += np.array(values)
    bx.margins(y=0.1)
    bx.set_xticks(x, [str(u) for u in users])
    bx.set_xlabel("concurrent users (left bar: Triton request time; right: gateway stages)")
    bx.set_ylabel("seconds per study (summed over calls)")
    bx.set_title("where a study's time goes")
    bx.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def compare_batching(on: dict, off: dict) -> dict:
    """Per concurrency, studies/s and p99 with Triton's dynamic batching on and off, and the batch sizes formed."""
    rows = []
    off_steps = {s["users"]: s for s in off["steps"]}
    for a in on["steps"]:
        b = off_steps.get(a["users"])
        if b is None:
            continue
        rows.append(
            {
                "users": a["users"],
                "studies_per_s": {"on": a["studies_per_s"], "off": b["studies_per_s"]},
                "gain": round(a["studies_per_s"] / b["studies_per_s"], 3) if b["studies_per_s"] else None,
                "p99_ms": {"on": a["p99_ms"], "off": b["p99_ms"]},
                "requests_per_execution": {
                    "on": _triton_total(a).get("requests_per_execution"),
                    "off": _triton_total(b).get("requests_per_execution"),
                },
                "model_execution_share": {
                    "on": _triton_total(a).get("model_execution_share"),
                    "off": _triton_total(b).get("model_execution_share"),
                },
                "errors": {"on": sum(a["errors"].values()), "off": sum(b["errors"].values())},
            }
        )
    return {"steps": rows, "best": {"on": on.get("best"), "off": off.get("best")}}


def _triton_total(step: dict) -> dict:
    return (step.get("triton") or {}).get("total") or {}


def batching_markdown(comparison: dict) -> str:
    lines = [
        "| users | studies/s on | off | gain | p99 s on | off | Triton requests/execution on | off "
        "| model exec share on | off | errors on | off |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in comparison["steps"]:
        p99, rpe, share = r["p99_ms"], r["requests_per_execution"], r["model_execution_share"]
        lines.append(
            f"| {r['users']} | {r['studies_per_s']['on']:.3f} | {r['studies_per_s']['off']:.3f} | "
            f"{r['gain'] if r['gain'] is not None else '–'}× | {_s(p99['on'])} | {_s(p99['off'])} | "
            f"{_num(rpe['on'], '{:.2f}')} | {_num(rpe['off'], '{:.2f}')} | "
            f"{_pct(share['on'])} | {_pct(share['off'])} | "
            f"{r['errors']['on']} | {r['errors']['off']} |"
        )
    return "\n".join(lines) + "\n"
