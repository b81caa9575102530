"""Load runs of a cspine server: Locust in a subprocess of its own (it monkey-patches on import, so never in
this process), Prometheus scraped around each run, ``summary.json`` written; the concurrency sweep with its
80 %-of-saturation tail check, the overload run with its recovery check, and ``cspine serve`` started for the
run when no target is given (optionally with Triton's dynamic batching removed)."""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import cspine
from cspine.client import ClientError, Tls, analyze_paths, service_info
from cspine.errors import CspineError
from cspine.loadtest import prom, results

logger = logging.getLogger(__name__)

LOCUSTFILE = Path("load_tests") / "locustfile.py"
KNOWN_ENSEMBLES = frozenset({"lesion_classify"})
ARRIVALS = ("poisson", "uniform")
HEADROOM_LOAD = 0.8  # the tail check runs at this fraction of the saturation throughput
# The locustfile's environment variables: Locust gets the target's token and TLS files, never the caller's.
LOCUST_ENV = frozenset({"CSPINE_TOKEN", "CSPINE_CA", "CSPINE_CLIENT_CERT", "CSPINE_CLIENT_KEY"})


class LoadTestError(CspineError):
    """A load run could not be made or read back (Locust failed, no server, no pool …)."""


@dataclass(frozen=True)
class Target:
    """The server under load: its gRPC address, an analyst token, the files of a TLS channel to it and where its
    metrics are (None: not scraped)."""

    address: str
    token: str | None = None
    tls: Tls = Tls()
    gateway_metrics: str | None = None
    triton_metrics: str | None = None
    ensembles: frozenset[str] = KNOWN_ENSEMBLES
    description: str = ""


@dataclass(frozen=True)
class Load:
    """One Locust run. Closed loop: ``users`` each send a study when their last one is answered (pausing about
    ``backoff_s`` after RESOURCE_EXHAUSTED or UNAVAILABLE). Open loop (``rate`` studies/s in total): each user is an
    arrival process at rate/users (Poisson or evenly spaced), each arrival a greenlet of its own, at most
    ``max_outstanding`` in flight per user; further arrivals are counted as CLIENT_BACKLOG failures."""

    users: int
    duration_s: float
    rate: float | None = None
    arrivals: str = "poisson"
    timeout_s: float = 120.0
    backoff_s: float = 1.0
    max_outstanding: int = 64
    return_dicom: bool = False
    processes: int | None = None

    def __post_init__(self) -> None:
        if self.users < 1:
            raise ValueError(f"users must be at least 1, got {self.users}")
        if self.duration_s < 1:
            raise ValueError(f"duration must be at least 1 s, got {self.duration_s:g}")
        if self.rate is not None and self.rate <= 0:
            raise ValueError(f"rate must be above 0 studies/s, got {self.rate:g}")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, got {self.arrivals!r}")
        if self.timeout_s <= 0 or self.backoff_s < 0 or self.max_outstanding < 1:
            raise ValueError("timeout must be > 0, backoff >= 0 and max_outstanding >= 1")

    @property
    def mode(self) -> str:
        return "open" if self.rate else "closed"

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "users": self.users,
            "rate": self.rate,
            "arrivals": self.arrivals if self.rate else None,
            "duration_s": self.duration_s,
            "timeout_s": self.timeout_s,
            "backoff_s": self.backoff_s,
        }


# --------------------------------------------------------------------------------------------------------
# Locust in a subprocess


def find_locustfile(given: str | Path | None = None) -> Path:
    """``given``, else ``load_tests/locustfile.py`` in the current folder, else the one of the source checkout cspine
    runs from (an editable install). The locustfile is not part of the installed package."""
    candidates = [Path(given)] if given else [LOCUSTFILE, Path(cspine.__file__).resolve().parents[2] / LOCUSTFILE]
    for path in candidates:
        if path.is_file():
            return path.resolve()
    raise LoadTestError(
        f"no locustfile at {' or '.join(str(c) for c in candidates)}: pass --locustfile "
        "(it is load_tests/locustfile.py of the cspine source checkout)"
    )


def locust_command(locustfile: Path, address: str, load: Load, pool: Path, out: Path, tls: Tls = Tls()) -> list[str]:
    """The headless Locust command of one run writing its CSV (``out/locust_*.csv``), HTML report and
    per-request logs into ``out``; ``tls``'s files as the locustfile's options. The token goes in the environment
    (CSPINE_TOKEN), not on the command line."""
    command = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "--only-summary"]
    command += ["-u", str(load.users), "-r", str(load.users), "-t", f"{math.ceil(load.duration_s)}s"]
    # Users stop after their call in flight, so the run's last answers are counted, not cut off.
    command += ["--stop-timeout", str(math.ceil(load.timeout_s)), "-H", address, "--exit-code-on-error", "0"]
    command += ["--csv", str(out / "locust"), "--html", str(out / "report.html")]
    command += ["--cspine-pool", str(pool), "--cspine-requests-log", str(out)]
    command += ["--cspine-timeout", f"{load.timeout_s:g}", "--cspine-backoff", f"{load.backoff_s:g}"]
    command += ["--cspine-arrival-rate", f"{(load.rate or 0.0) / load.users:.6g}", "--cspine-arrivals", load.arrivals]
    command += ["--cspine-max-outstanding", str(load.max_outstanding)]
    if load.return_dicom:
        command += ["--cspine-return-dicom", "1"]
    if load.processes:
        command += ["--processes", str(load.processes)]
    files = {"--cspine-ca": tls.ca, "--cspine-client-cert": tls.client_cert, "--cspine-client-key": tls.client_key}
    for option, path in files.items():
        if path is not None:
            command += [option, str(path)]
    return command


def run_locust(target: Target, load: Load, pool: Path, out: Path, locustfile: Path) -> dict:
    """Run Locust against ``target`` and summarise its CSV (results.summarize)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("requests-*.csv"):  # a rerun into the same folder must not count the last run's calls
        old.unlink()
    env = {k: v for k, v in os.environ.items() if k not in LOCUST_ENV}
    if target.token:
        env["CSPINE_TOKEN"] = target.token
    command = locust_command(locustfile, target.address, load, pool, out, target.tls)
    log = out / "locust.log"
    logger.info("running %s", " ".join(command))
    with log.open("w") as f:
        try:
            code = subprocess.run(
                command, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=load.duration_s + load.timeout_s + 180
            ).returncode
        except FileNotFoundError as error:
            raise LoadTestError(f"cannot run Locust: {error}") from None
        except subprocess.TimeoutExpired:
            raise LoadTestError(f"Locust did not finish in time; see {log}") from None
    if code != 0 or not (out / "locust_stats.csv").is_file():
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        hint = " (is Locust installed? pip install 'cspine[load]')" if "No module named locust" in tail else ""
        raise LoadTestError(f"Locust exited with code {code}{hint}; the end of {log}:\n{tail}")
    return results.summarize(out / "locust", out, load.describe())


def _scrape(url: str | None) -> prom.Snapshot | None:
    if not url:
        return None
    try:
        return prom.scrape(url)
    except OSError as error:
        logger.warning("metrics at %s not scraped: %s", url, error)
        return None


def run_step(target: Target, load: Load, pool: Path, out: Path, locustfile: Path) -> dict:
    """One run with Triton's and the gateway's metrics scraped before and after: ``summary.json`` gets the
    figures of results.summarize plus ``triton`` and ``gateway`` (prom.triton_figures, prom.gateway_figures), and a
    latency-over-time PNG is written beside it."""
    before = (_scrape(target.triton_metrics), _scrape(target.gateway_metrics))
    summary = run_locust(target, load, pool, out, locustfile)
    after = (_scrape(target.triton_metrics), _scrape(target.gateway_metrics))
    rps = summary["locust"]["requests_per_s"]
    wall_s = summary["requests"] / rps if rps else None  # Locust's own run time, startup excluded
    summary["wall_s"] = round(wall_s, 2) if wall_s else None
    summary["target"] = target.address
    summary["triton"] = (
        prom.triton_figures(prom.diff(after[0], before[0]), target.ensembles, wall_s)
        if before[0] is not None and after[0] is not None
        else None
    )
    summary["gateway"] = (
        prom.gateway_figures(prom.diff(after[1], before[1])) if before[1] is not None and after[1] is not None else None
    )
    summary["time_split"] = prom.time_split(summary["triton"], summary["gateway"])
    title = f"{load.mode} loop, " + (f"{load.rate:g} studies/s" if load.rate else f"{load.users} users")
    results.plot_latency(results.read_request_logs(out), out / "latency.png", f"AnalyzeStudy latency ({title})")
    results.write_json(out / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------------------------------------
# Warm-up, sweep, overload


def first_study_of_each_profile(pool: Path) -> list[Path]:
    from cspine.loadtest.pool import read_manifest

    seen: dict[str, Path] = {}
    for entry in read_manifest(pool)["studies"]:
        seen.setdefault(entry["profile"], pool / entry["name"])
    return list(seen.values())


def analyze_once(target: Target, study: Path, timeout_s: float) -> float:
    """Seconds one AnalyzeStudy of ``study`` took; ClientError when it failed."""
    start = time.perf_counter()
    analyze_paths(target.address, [study], timeout_s=timeout_s, token=target.token, tls=target.tls)
    return time.perf_counter() - start


def warm_up(target: Target, pool: Path, timeout_s: float = 120.0) -> None:
    """One study of each kind, before anything is measured: the first calls of each model are slower, and a wrong
    address or token is better said now than as a run full of errors."""
    for study in first_study_of_each_profile(pool):
        try:
            analyze_once(target, study, timeout_s)
        except ClientError as error:
            raise LoadTestError(f"warm-up study {study.name} on {target.address} failed: {error}") from None


def sweep(
    target: Target,
    load: Load,
    users: list[int],
    pool: Path,
    out: Path,
    locustfile: Path,
    p99_target_ms: float,
    *,
    max_error_share: float = 0.0,
    headroom: bool = True,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Closed-loop steps at each concurrency in ``users`` (``out/users-NNN/``), the best step under the p99 target
    (results.best_step), saturation (the most studies/s) and, with ``headroom``, an open-loop run at 80 % of the
    saturation throughput checking that no study takes more than 2× that run's p99 (``out/headroom/``). Writes
    ``sweep.json``, ``sweep.md`` and ``sweep.png``."""
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now().astimezone().isoformat(timespec="seconds")
    steps = []
    for n in users:
        step = run_step(target, replace(load, users=n, rate=None), pool, out / f"users-{n:03d}", locustfile)
        steps.append(step)
        if on_step:
            on_step(step)
    best = results.best_step(steps, p99_target_ms, max_error_share)
    saturation = results.saturation_step(steps)
    tail = None
    if headroom and saturation:
        rate = round(HEADROOM_LOAD * saturation["studies_per_s"], 4)
        tail = run_step(target, replace(load, users=1, rate=rate), pool, out / "headroom", locustfile)
        tail["tail"] = results.tail_check(tail)
        results.write_json(out / "headroom" / "summary.json", tail)
        if on_step:
            on_step(tail)
    body = {
        "synthetic": True,
        "started": started,
        "target": target.address,
        "server": target.description,
        "pool": pool.name,
        "duration_s": load.duration_s,
        "p99_target_ms": p99_target_ms,
        "max_error_share": max_error_share,
        "steps": steps,
        "best": _headline(best),
        "saturation": _headline(saturation, with_triton=True),
        "headroom": tail,
    }
    results.write_json(out / "sweep.json", body)
    (out / "sweep.md").write_text(results.sweep_markdown(body))
    results.plot_sweep(body, out / "sweep.png")
    return body


def _headline(step: dict | None, with_triton: bool = False) -> dict | None:
    if step is None:
        return None
    keys = ("users", "studies_per_s", "p50_ms", "p95_ms", "p99_ms", "max_ms", "errors", "requests")
    out = {k: step[k] for k in keys}
    if with_triton:
        out["triton"] = step.get("triton")
        out["gateway"] = step.get("gateway")
        out["time_split"] = step.get("time_split")
    return out


def overload(target: Target, load: Load, pool: Path, out: Path, locustfile: Path, users: int | None = None) -> dict:
    """More closed-loop users than the server has places (study slots and its queue): the extra studies must be
    refused with RESOURCE_EXHAUSTED, fast, while the admitted ones keep their latency; afterwards one study must
    succeed again. ``summary.json`` gets an ``overload`` section saying so."""
    try:
        limits = service_info(target.address, 10.0, token=target.token, tls=target.tls).limits
    except ClientError as failure:
        raise LoadTestError(f"GetServiceInfo on {target.address} failed: {failure}") from None
    slots = limits.max_studies_in_flight
    users = users or max(4, 2 * (slots + limits.max_queued_studies))
    summary = run_step(target, replace(load, users=users, rate=None), pool, out, locustfile)
    rejected = (summary.get("rejected") or {}).get("RESOURCE_EXHAUSTED")
    study = first_study_of_each_profile(pool)[0]
    try:
        seconds, error = analyze_once(target, study, load.timeout_s), None
    except ClientError as failure:
        seconds, error = None, failure.code
    summary["overload"] = {
        "max_studies_in_flight": slots,
        "max_queued_studies": limits.max_queued_studies,
        "users": users,
        "resource_exhausted": summary["errors"].get("RESOURCE_EXHAUSTED", 0),
        "rejection_ms": rejected,
        "success_ms": {k: summary[k] for k in ("p50_ms", "p99_ms", "max_ms")},
        "recovered": error is None,
        "recovery_study_ms": round(seconds * 1000, 1) if seconds is not None else None,
        "recovery_error": error,
    }
    results.write_json(out / "summary.json", summary)
    return summary


# --------------------------------------------------------------------------------------------------------
# The server under load, started for the run


def ensemble_models(repository: Path) -> frozenset[str]:
    """Models of ``repository`` whose platform is ``ensemble`` (their Triton time is their members' time)."""
    from cspine.inference.local_triton import repository_models
    from cspine.inference.model_config import config_path, load_config

    try:
        names = repository_models(Path(repository))
        return frozenset(n for n in names if load_config(config_path(Path(repository), n)).platform == "ensemble")
    except (CspineError, OSError):
        return KNOWN_ENSEMBLES


@contextmanager
def own_server(
    out: Path,
    repository: Path,
    *,
    batching: bool = True,
    max_studies_in_flight: int | None = None,
    triton_url: str | None = None,
    triton_metrics: str | None = None,
) -> Iterator[Target]:
    """``cspine serve`` on free ports for the run (data and log in ``out/server…``), its analyst token and both
    metrics endpoints. ``batching=False`` serves a copy of the repository without ``dynamic_batching`` blocks;
    ``triton_url`` uses that Triton instead of starting one (its metrics then come from ``triton_metrics``)."""
    from cspine.gateway.tokens import Role, find_client_token
    from cspine.ops.embedded import EmbeddedServer

    folder = out / ("server" if batching else "server-no-batching")
    extra = []
    if max_studies_in_flight:
        extra += ["--max-studies-in-flight", str(max_studies_in_flight)]
    if not batching:
        if triton_url:
            raise LoadTestError("batching off needs the Triton cspine starts itself: leave out --triton-url")
        from cspine.bench.triton import variant

        shutil.rmtree(folder / "repository", ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        repository = variant(Path(repository), folder / "repository", None)
    extra += ["--repository", str(repository)]
    if triton_url:
        extra += ["--triton-url", triton_url]
    with EmbeddedServer(folder / "data", folder / "serve.log", extra) as server:
        assert server.triton_ports is not None  # chosen when the server starts
        local_triton = f"http://127.0.0.1:{server.triton_ports.metrics}/metrics"
        description = "cspine serve started for the run" + (
            f", Triton at {triton_url}" if triton_url else ", local Triton on CPU"
        )
        description += f", dynamic batching {'on' if batching else 'off'}"
        if max_studies_in_flight:
            description += f", --max-studies-in-flight {max_studies_in_flight}"
        yield Target(
            address=server.address,
            token=find_client_token(folder / "data", Role.ANALYST),
            gateway_metrics=f"http://127.0.0.1:{server.metrics_port}/metrics",
            triton_metrics=triton_metrics if triton_url else local_triton,
            ensembles=ensemble_models(repository),
            description=description,
        )
