"""``cspine loadtest``: its flags and what it does with them (one run, a sweep, an overload run, a pool, a summary
of a distributed run), driving the harness in cspine.loadtest. Cheap to import: the parser is built on every
``cspine`` call."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from cspine.config import Settings

if TYPE_CHECKING:
    from cspine.loadtest.runner import Load

DEFAULT_OUT = "out/loadtest"
DEFAULT_CACHE = ".cache/cspine/loadtest"
DEFAULT_DURATION_S = 60.0
DEFAULT_SWEEP = "1,2,4,8"
DEFAULT_P99_TARGET_MS = 10_000.0

DESCRIPTION = """\
Load-test a cspine server the way load testers work: Locust (headless, in a process of its own, with
load_tests/locustfile.py) sends AnalyzeStudy calls with SYNTHETIC studies from a pool of realistic sizes and
mixed modalities (CT + MR + X-ray, CT alone, MR + X-ray; made once, cached in --cache) for --duration seconds.
Without --target it starts `cspine serve` (local Triton on CPU) on free ports for the run and stops it after.

Load:
  closed loop (--users N): N users, each sending its next study as soon as the last one is answered, pausing
      about --backoff seconds after RESOURCE_EXHAUSTED or UNAVAILABLE, as a retrying client would.
  open loop (--rate R): studies arrive at R per second whatever is in flight: each of the --users Locust users
      (default 1) is an arrival process at R/users per second (--arrivals poisson: exponential gaps; uniform:
      even spacing) that starts every arrival in a greenlet of its own, so one user suffices for any rate.
      (Locust's constant_throughput would need users >= R x the slowest latency, by Little's law, and a slow
      answer would delay the next arrival.) At most --max-outstanding studies per user are in flight; arrivals
      past that are counted as CLIENT_BACKLOG failures, i.e. the load generator could not offer the load.

Writes to --out: Locust's CSV (locust_stats.csv, locust_failures.csv, locust_stats_history.csv) and HTML report
(report.html), the per-request log (requests-PID.csv), latency.png and summary.json: studies_per_s (successful
studies per second), p50_ms/p95_ms/p99_ms/max_ms (of successful studies), errors ({status code: count}),
requests (calls), rejected (latency of the failed calls by code), and the Triton-side (nv_inference_*) and
gateway (cspine_*) figures of the run.

--sweep 1,2,4,8 runs a closed-loop step per concurrency (DIR/users-NNN/), reports the highest throughput whose
p99 is under --p99-target-ms with no errors, saturation (the most studies/s) with the share of Triton-side time
spent in model execution, then an open-loop run at 80 % of saturation (DIR/headroom/) checking that no study
takes over 2x its p99; sweep.json, sweep.md (table) and sweep.png (throughput and p99 against load; per step
where a study's time goes in Triton and in the gateway's stages). --compare-batching runs the sweep twice, with
Triton's dynamic batching on and off (DIR/batching-on, DIR/batching-off, DIR/batching.md).

--overload runs more users than the server has places (2 x its study slots plus queue places, from
GetServiceInfo, unless --users): past saturation the gateway must answer RESOURCE_EXHAUSTED fast; then one
study must succeed again.

With --target, Triton's and the gateway's metrics are scraped only from --triton-metrics and --gateway-metrics
(e.g. http://triton:8002/metrics, http://cspine:9464/metrics); without them those figures are left out. A --target
that serves TLS needs --ca (and --client-cert and --client-key where it asks for a client certificate), or a
grpcs:// address for the system's CAs; Locust's users get the same files.
"""

EPILOG = """\
examples:
  cspine loadtest --users 2 --duration 60 --out out/loadtest
  cspine loadtest --rate 0.3 --duration 120 --out out/open
  cspine loadtest --sweep 1,2,4,8 --p99-target-ms 10000 --compare-batching --out out/sweep
  cspine loadtest --overload --max-studies-in-flight 1 --duration 20 --out out/overload
  cspine loadtest --target cspine.example.org:50051 --token-file analyst.token --users 8 \\
      --gateway-metrics http://cspine.example.org:9464/metrics --triton-metrics http://triton:8002/metrics

distributed (Locust master and workers, for loads one machine cannot generate): docs/performance.md"""


def _users_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated user counts, e.g. 1,2,4,8: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"user counts must be at least 1: {text!r}")
    return sorted(set(values))


def add_loadtest_arguments(p: argparse.ArgumentParser, settings: Settings) -> None:
    """The flags of ``cspine loadtest``; --locustfile and the client's flags (--token, --data-dir, TLS) default
    to ``settings`` (CSPINE_LOCUSTFILE, ``settings.client``)."""
    from cspine.commands.client_args import add_data_dir_argument, add_tls_arguments

    what = p.add_mutually_exclusive_group()
    what.add_argument("--sweep", type=_users_list, metavar="1,2,4,8", help="closed-loop steps at these concurrencies")
    what.add_argument("--overload", action="store_true", help="more users than study slots; then check recovery")
    what.add_argument(
        "--make-pool", action="store_true", help="only make the study pool (for Locust workers); print it"
    )
    what.add_argument(
        "--summarize",
        metavar="DIR",
        help="only write DIR/summary.json from the Locust CSV in DIR (DIR/locust_*.csv, e.g. of a distributed master)",
    )

    load = p.add_argument_group("load")
    load.add_argument(
        "--users", type=int, default=None, help="closed loop: concurrent users; open loop: arrival processes"
    )
    load.add_argument("--rate", type=float, default=None, help="open loop: studies/s offered in total")
    load.add_argument("--arrivals", choices=["poisson", "uniform"], default="poisson", help="open loop arrival spacing")
    load.add_argument(
        "--duration", type=float, default=DEFAULT_DURATION_S, metavar="SECONDS", help="per run or step (default 60)"
    )
    load.add_argument(
        "--timeout", type=float, default=120.0, metavar="SECONDS", help="deadline of one call (default 120)"
    )
    load.add_argument(
        "--backoff", type=float, default=1.0, metavar="SECONDS", help="closed loop pause after RESOURCE_EXHAUSTED (1)"
    )
    load.add_argument("--max-outstanding", type=int, default=64, help="open loop: studies in flight per user (64)")
    load.add_argument("--return-dicom", action="store_true", help="ask for DICOM SEG and SR with every study")
    load.add_argument(
        "--locust-processes", type=int, default=None, help="Locust --processes: load-generating processes"
    )
    load.add_argument(
        "--locustfile",
        default=None if settings.locustfile is None else str(settings.locustfile),
        help="(env CSPINE_LOCUSTFILE; default load_tests/locustfile.py here or in cspine's source checkout)",
    )

    sweep = p.add_argument_group("sweep")
    sweep.add_argument("--p99-target-ms", type=float, default=DEFAULT_P99_TARGET_MS, help="p99 target (default 10000)")
    sweep.add_argument(
        "--max-error-share", type=float, default=0.0, help="failed share of calls a qualifying step may have (0)"
    )
    sweep.add_argument("--no-headroom", action="store_true", help="skip the open-loop run at 80 %% of saturation")
    sweep.add_argument("--compare-batching", action="store_true", help="sweep with dynamic batching on, then off")

    target = p.add_argument_group("target")
    target.add_argument("--target", metavar="ADDR", default=None, help="a running cspine server (default: start one)")
    target.add_argument("--token", default=settings.client.token, help="analyst token (env CSPINE_TOKEN)")
    target.add_argument("--token-file", default=None, help="read the analyst token from this file")
    add_data_dir_argument(target, settings.client, "where to find the tokens of --target when no --token is given")
    target.add_argument("--gateway-metrics", metavar="URL", default=None, help="--target's /metrics (cspine_*)")
    target.add_argument("--triton-metrics", metavar="URL", default=None, help="its Triton's /metrics (nv_inference_*)")
    add_tls_arguments(p, settings.client, server="--target", note="Only for --target.")

    server = p.add_argument_group("the server started for the run (without --target)")
    server.add_argument(
        "--max-studies-in-flight", type=int, default=None, help="cspine serve's limit (default: its own)"
    )
    server.add_argument("--no-batching", action="store_true", help="serve without Triton's dynamic batching")
    server.add_argument("--triton-url", default=None, help="use this Triton instead of starting one")
    server.add_argument("--repository", default=None, help="model repository (default: cspine's)")

    pool = p.add_argument_group("study pool")
    pool.add_argument("--pool", choices=["realistic", "small"], default="realistic", help="pool preset (realistic)")
    pool.add_argument("--pool-size", type=int, default=None, help="studies in the pool (realistic 8, small 2)")
    pool.add_argument("--pool-seed", type=int, default=0)
    pool.add_argument("--cache", default=DEFAULT_CACHE, help=f"where pools are kept (default {DEFAULT_CACHE})")

    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")


def _print(text: str) -> None:
    print(text, flush=True)


def _line(summary: dict) -> str:
    s = summary
    load = (
        f"{s['users']} user{'s' * (s['users'] != 1)}" if s["mode"] == "closed" else f"{s['rate']:g} studies/s offered"
    )
    errors = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "none"
    p = {k: "–" if s[k] is None else f"{s[k] / 1000:.2f}" for k in ("p50_ms", "p99_ms", "max_ms")}
    line = (
        f"{load}: {s['requests']} calls, {s['studies_per_s']:.3f} studies/s ({s['studies_per_min']:.1f}/min), "
        f"p50 {p['p50_ms']} s, p99 {p['p99_ms']} s, max {p['max_ms']} s, errors: {errors}"
    )
    t = (s.get("triton") or {}).get("total")
    if t and t.get("model_execution_share") is not None:
        line += (
            f"; Triton: model execution {100 * t['model_execution_share']:.0f} % of its time, "
            f"queue {t['queue_ms_per_request']:.0f} ms/request, batch {t['avg_batch']}"
        )
    return line


def _token(args: argparse.Namespace) -> str | None:
    from cspine.commands.client_args import client_token

    if args.token_file:
        return Path(args.token_file).read_text().strip()
    return client_token(args, required=False)


def _load(args: argparse.Namespace, users: int) -> Load:
    from cspine.loadtest.runner import Load

    return Load(
        users=users,
        duration_s=args.duration,
        rate=args.rate,
        arrivals=args.arrivals,
        timeout_s=args.timeout,
        backoff_s=args.backoff,
        max_outstanding=args.max_outstanding,
        return_dicom=args.return_dicom,
        processes=args.locust_processes,
    )


def _check(args: argparse.Namespace) -> None:
    own = ("--max-studies-in-flight", "--no-batching", "--compare-batching", "--triton-url", "--repository")
    if args.target:
        given = [f for f in own if getattr(args, f[2:].replace("-", "_"))]
        if given:
            raise ValueError(f"{', '.join(given)}: only for the server cspine loadtest starts (drop --target)")
    if (args.sweep or args.overload) and args.rate:
        raise ValueError("--rate is an open-loop single run: not with --sweep or --overload")
    if args.compare_batching and not args.sweep:
        raise ValueError("--compare-batching compares sweeps: give --sweep too")
    if not (args.sweep or args.overload or args.make_pool or args.summarize) and not (args.users or args.rate):
        raise ValueError("give --users N (closed loop) or --rate R (open loop), or --sweep / --overload")


def run_command(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from cspine.commands.client_args import tls_of
    from cspine.inference.local_triton import default_repository
    from cspine.loadtest import results, runner
    from cspine.loadtest.pool import ensure_pool

    _check(args)
    if args.summarize:
        folder = Path(args.summarize)
        logs = folder if any(folder.glob("requests-*.csv")) else None
        summary = results.summarize(folder / "locust", logs, {"mode": "external"})
        _print(f"wrote {results.write_json(folder / 'summary.json', summary)}")
        return 0
    pool = ensure_pool(Path(args.cache), args.pool, args.pool_size, args.pool_seed)
    if args.make_pool:
        _print(str(pool.resolve()))
        return 0
    locustfile = runner.find_locustfile(args.locustfile)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    repository = Path(args.repository) if args.repository else default_repository()

    def server(batching: bool):
        if args.target:
            return nullcontext(
                runner.Target(
                    address=args.target,
                    token=_token(args),
                    tls=tls_of(args),
                    gateway_metrics=args.gateway_metrics,
                    triton_metrics=args.triton_metrics,
                    ensembles=runner.ensemble_models(repository),
                    description=f"--target {args.target}",
                )
            )
        _print("starting cspine serve for the run (local Triton on CPU unless --triton-url) …")
        return runner.own_server(
            out,
            repository,
            batching=batching,
            max_studies_in_flight=args.max_studies_in_flight,
            triton_url=args.triton_url,
            triton_metrics=args.triton_metrics,
        )

    def on_step(step: dict) -> None:
        _print("  " + _line(step))

    if args.sweep:
        runs = {}
        for batching in (True, False) if args.compare_batching else (not args.no_batching,):
            folder = out / f"batching-{'on' if batching else 'off'}" if args.compare_batching else out
            with server(batching) as target:
                _print(f"sweep {args.sweep} users, {args.duration:g} s each, against {target.address}")
                runner.warm_up(target, pool, args.timeout)
                body = runner.sweep(
                    target,
                    _load(args, 1),
                    args.sweep,
                    pool,
                    folder,
                    locustfile,
                    args.p99_target_ms,
                    max_error_share=args.max_error_share,
                    headroom=not args.no_headroom,
                    on_step=on_step,
                )
            runs[batching] = body
            _print((folder / "sweep.md").read_text())
            _print(f"wrote {folder / 'sweep.json'}, {folder / 'sweep.md'}, {folder / 'sweep.png'}")
        if args.compare_batching:
            comparison = results.compare_batching(runs[True], runs[False])
            results.write_json(out / "batching.json", comparison)
            (out / "batching.md").write_text(results.batching_markdown(comparison))
            _print("dynamic batching on vs off:\n" + results.batching_markdown(comparison))
        return 0

    with server(not args.no_batching) as target:
        runner.warm_up(target, pool, args.timeout)
        if args.overload:
            summary = runner.overload(target, _load(args, 1), pool, out, locustfile, args.users)
            o = summary["overload"]
            _print(_line(summary))
            rejected = o["rejection_ms"] or {}
            _print(
                f"overload: {o['users']} users on {o['max_studies_in_flight']} study slot(s) and "
                f"{o['max_queued_studies']} queue place(s): "
                f"{o['resource_exhausted']} RESOURCE_EXHAUSTED, answered in p50 {rejected.get('p50_ms')} ms, "
                f"p99 {rejected.get('p99_ms')} ms; recovered: {o['recovered']}"
            )
            code = 0 if o["recovered"] else 1
        else:
            summary = runner.run_step(target, _load(args, args.users or 1), pool, out, locustfile)
            _print(_line(summary))
            code = 0
    _print(f"report: {out / 'report.html'}  summary: {out / 'summary.json'}")
    return code


def cmd_loadtest(args: argparse.Namespace) -> int:
    return run_command(args)


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "loadtest",
        help="load-test a cspine server with Locust: throughput, latency percentiles, sweeps, overload",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loadtest_arguments(p, settings)
    p.set_defaults(func=cmd_loadtest)
