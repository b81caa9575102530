"""The `cspine` command: phantom, inspect, train, export, calibrate, evaluate, serve, analyze, triton, bench,
demo, fuzz.

Configuration is read here, once, from flags and ``CSPINE_`` environment variables; the library modules
never read the environment themselves.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from cspine.config import IngestLimits
from cspine.errors import CspineError
from cspine.inference.local_triton import default_repository

logger = logging.getLogger(__name__)

DEMO_SEED = 2026


def _phantom_options(args: argparse.Namespace):
    from cspine.phantom.generate import PhantomOptions, parse_difficulty
    from cspine.phantom.scanner import Shift

    modalities = tuple(m.strip() for m in args.modalities.split(",") if m.strip())
    return PhantomOptions(
        modalities=modalities,
        tumor=args.tumor,
        difficulty=parse_difficulty(args.difficulty),
        shift=Shift.parse(args.shift),
        opll=args.opll,
        matrix=getattr(args, "matrix", "phantom"),
    )


def cmd_phantom(args: argparse.Namespace) -> int:
    from cspine.phantom.generate import generate_cohort

    options = _phantom_options(args)
    truths = generate_cohort(
        Path(args.out), args.cases, args.seed, options, workers=args.workers, progress=not args.quiet
    )
    counts: dict[str, int] = {}
    for t in truths:
        key = t["tumor"]["class"] if t["tumor"] else "none"
        counts[key] = counts.get(key, 0) + 1
    summary = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
    print(f"wrote {len(truths)} SYNTHETIC case(s) to {args.out} ({summary})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from cspine.dicom.inspect import format_inspect, inspect_paths

    report = inspect_paths([Path(p) for p in args.paths], limits=IngestLimits.from_env())
    print(json.dumps(report, indent=2) if args.json else format_inspect(report))
    refused = report["refused"] or any(study["error"] for study in report["studies"])
    return 1 if refused else 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from cspine.dicom.bench import bench_ingest, format_bench
    from cspine.phantom.generate import PhantomOptions, generate_case
    from cspine.phantom.scanner import Shift

    with tempfile.TemporaryDirectory(prefix="cspine-bench-") as tmp:
        # A 512 × 512 SYNTHETIC CT (half the usual pixel spacing), stored uncompressed.
        options = PhantomOptions(
            modalities=("ct",), tumor="none", shift=Shift(resolution=0.5, thickness=args.thickness)
        )
        truth = generate_case(Path(tmp) / "case", "bench", args.seed, 0, options)
        ct = truth["series"]["ct"]
        files = [Path(tmp) / "case" / f for f in ct["files"]]
        slices, rows, columns = ct["shape"]
        print(f"SYNTHETIC CT, {slices} slices of {rows}×{columns}, uncompressed ({ct['storage']})")
        print(format_bench(bench_ingest(files, repeats=args.repeats)))
    return 0


def cmd_bench_models(args: argparse.Namespace) -> int:
    from cspine.modeling.bench import bench_models, format_bench

    result = bench_models(Path(args.repository), repeats=args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def _split_names(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}")
    return names


def cmd_bench_triton(args: argparse.Namespace) -> int:
    from cspine.inference.bench import bench_triton, format_bench_triton

    delays = tuple(int(d) for d in args.queue_delays.split(",") if d.strip())
    result = bench_triton(Path(args.repository), args.seconds, args.repeats, args.ort_threads, delays)
    print(json.dumps(result, indent=2) if args.json else format_bench_triton(result))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cspine.modeling.recipes import MODEL_NAMES, PRESETS, train_models

    names = _split_names(args.models, MODEL_NAMES)
    overrides = {"tumor_labels": args.tumor_labels} if args.tumor_labels else {}
    if args.steps:
        overrides["steps"] = args.steps
    done = train_models(
        names,
        PRESETS[args.preset],
        Path(args.cache),
        Path(args.checkpoints),
        args.workers,
        not args.quiet,
        args.stop_after,
        **overrides,
    )
    for name, path in done.items():
        print(f"{name}: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cspine.modeling.recipes import export_models

    for path in export_models(Path(args.checkpoints), Path(args.repository)):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_evaluate_models(args: argparse.Namespace) -> int:
    from cspine.modeling.recipes import PRESETS, dump, evaluate_models
    from cspine.modeling.report import format_metrics, write_figures

    metrics = evaluate_models(
        Path(args.repository), Path(args.cache), PRESETS[args.preset], workers=args.workers, progress=not args.quiet
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(dump(metrics))
        write_figures(metrics, Path(args.repository), Path(args.cache), PRESETS[args.preset], out)
    print(dump(metrics) if args.json else format_metrics(metrics))
    return 0


def _cohort_run(args: argparse.Namespace, default_dir: str):
    from cspine.evaluation.pipeline import CohortRun

    return CohortRun(
        cohort=Path(args.cohort or default_dir),
        cases=args.cases,
        seed=args.seed,
        triton_url=args.triton_url,
        workers=args.workers,
        progress=not args.quiet,
    )


def cmd_evaluate_pipeline(args: argparse.Namespace) -> int:
    from cspine.evaluation.pipeline import evaluate, format_metrics, metrics

    records = evaluate(_cohort_run(args, f".cache/cspine/pipeline-eval/seed{args.seed}-{args.cases}"))
    result = metrics(records)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "records.json").write_text(json.dumps(records, indent=1) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_metrics(result))
    return 0


def cmd_evaluate_competence(args: argparse.Namespace) -> int:
    from cspine.evaluation.competence import evaluate_competence, format_competence

    run = _cohort_run(args, f".cache/cspine/pipeline-eval/seed{args.seed}-{args.cases}")
    result = evaluate_competence(run, args.triton_url, progress=not args.quiet)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "competence.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_competence(result))
    return 0


def cmd_evaluate_study(args: argparse.Namespace) -> int:
    from cspine.evaluation.study import Server, evaluate_cohort

    server = None
    if args.server:
        from cspine.client import ClientError, client_token

        try:
            server = Server(args.server, client_token(args), client_token(args, "curator"))
        except ClientError as exc:
            print(f"cspine: error: {exc}", file=sys.stderr)
            return 2
    metrics, paths = evaluate_cohort(
        Path(args.cohort), Path(args.out), args.support, server=server, n_boot=args.bootstrap, progress=not args.quiet
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_study_headline(metrics))
        print(f"report: {paths['report']}  metrics: {paths['metrics']}  predictions: {paths['predictions']}")
    return 0


def format_study_headline(m: dict) -> str:
    def f(figure) -> str:
        if not figure or figure.get("value") is None:
            return "n/a"
        lo, hi = figure["ci95"] or (None, None)
        return f"{figure['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")

    synthetic = " (SYNTHETIC data)" if m.get("synthetic") else ""
    lines = [f"{m['cases']} cases{synthetic}: accuracy {f(m['accuracy'])}, ECE {f(m['ece'])}"]
    for label, figures in m["per_class"].items():
        lines.append(
            f"  {label:<12} sensitivity {f(figures['sensitivity'])}  specificity {f(figures['specificity'])}  "
            f"AUC {f(figures['auc'])}"
        )
    d = m["detection"]
    lines.append(f"  detection    sensitivity {f(d['sensitivity'])}  specificity {f(d['specificity'])}")
    lines.append("  by modalities: " + ", ".join(f"{k} {f(v)}" for k, v in m["by_modalities"].items()))
    return "\n".join(lines)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cspine.analysis.fusion import Calibration
    from cspine.evaluation.calibrate import build_default_support, fit_calibration
    from cspine.evaluation.pipeline import evaluate
    from cspine.fewshot.prototypes import DEFAULT_SUPPORT, PrototypeSet

    repository = Path(args.repository)
    if args.competence_only:
        from cspine.evaluation.competence import fit_competence

        cohort = Path(args.cache) / "competence" / f"reference-seed{args.reference_seed}-{args.reference_cases}"
        reference = fit_competence(repository, cohort, args.reference_cases, args.reference_seed, args.workers)
        path = reference.save(repository)
        for modality, fitted in reference.references.items():
            print(f"{modality.value}: OOD threshold {fitted.threshold:.3f} — {fitted.fitted_on}")
        print(f"wrote {path}")
        return 0
    embed = repository / "lesion_embed" / "1" / "model.onnx"
    support = build_default_support(Path(args.cache), embed, args.per_subtype, args.workers)
    support.save(DEFAULT_SUPPORT)
    prototypes = PrototypeSet.from_support(support)
    print(f"default support set: {len(support.labels)} SYNTHETIC lesions, prototype set {prototypes.version}")
    run = _cohort_run(args, f".cache/cspine/pipeline-calibration/seed{args.seed}-{args.cases}")
    records = evaluate(run, Calibration.uniform(), prototypes)
    fitted = fit_calibration(records, embed, f"SYNTHETIC phantom cohort seed {args.seed}")
    path = fitted.save(repository)
    print(f"wrote {path}:\n{json.dumps(fitted.to_json(), indent=2)}")
    return 0


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from cspine.evaluation.bench import bench_pipeline, bench_pipeline_sizes, format_bench, format_sizes_bench

    if args.matrix == "real":
        result = bench_pipeline_sizes(args.triton_url, args.repeats)
        print(json.dumps(result, indent=2) if args.json else format_sizes_bench(result))
        return 0
    result = bench_pipeline(args.triton_url, args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_bench(result))
    return 0


def cmd_bench_gateway(args: argparse.Namespace) -> int:
    from cspine.evaluation.bench import bench_gateway, format_gateway_bench

    result = bench_gateway(args.triton_url, args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_gateway_bench(result))
    return 0


def cmd_bench_adapt(args: argparse.Namespace) -> int:
    from cspine.evaluation.bench import bench_adapt, format_adapt_bench

    result = bench_adapt(args.triton_url, args.repeats)
    print(json.dumps(result, indent=2) if args.json else format_adapt_bench(result))
    return 0


def _add_cohort_arguments(p: argparse.ArgumentParser, cases: int, seed: int) -> None:
    p.add_argument("--cases", type=int, default=cases, help=f"SYNTHETIC studies (default {cases})")
    p.add_argument("--seed", type=int, default=seed, help=f"phantom seed (default {seed})")
    p.add_argument("--cohort", default=None, help="folder for the cohort (default: under .cache/cspine)")
    p.add_argument(
        "--triton-url",
        default=os.environ.get("CSPINE_TRITON_URL"),
        help="an external Triton's gRPC address (env CSPINE_TRITON_URL; default: start the local Triton)",
    )
    p.add_argument("--workers", type=int, default=2, help="processes generating the cohort (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _triton(args: argparse.Namespace, **supervision):
    """The local Triton the flags describe; ``supervision``: ``supervise``, ``on_restart`` (see LocalTriton)."""
    from cspine.inference.local_triton import LocalTriton, TritonPorts

    ports = TritonPorts(http=args.triton_http_port, grpc=args.triton_grpc_port, metrics=args.triton_metrics_port)
    return LocalTriton(
        Path(args.repository),
        ports,
        model_config_name=args.model_config_name,
        ort_threads=args.ort_threads,
        log_verbose=args.log_verbose,
        **supervision,
    )


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_triton_start(args: argparse.Namespace) -> int:
    import signal
    import time

    logging.getLogger("cspine.triton").setLevel(logging.INFO)  # forward Triton's own log
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops Triton in order, as Ctrl-C does
    triton = _triton(args)
    try:
        triton.start()
        print(f"Triton ready: gRPC {triton.grpc_url}, HTTP {triton.http_url}, metrics {triton.metrics_url}", flush=True)
        while triton.process.poll() is None:
            time.sleep(0.5)
        print(f"cspine: error: tritonserver exited (code {triton.process.returncode})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping Triton", file=sys.stderr)
        return 0
    finally:
        triton.stop()


def cmd_triton_plan_commands(args: argparse.Namespace) -> int:
    from cspine.inference.model_config import config_path, load_config, opt_batch
    from cspine.inference.specs import MODELS
    from cspine.inference.tensorrt import format_commands, plan_commands

    local = Path(args.local_repository)
    batches = {name: opt_batch(load_config(config_path(local, name, "gpu"))) for name in MODELS}
    print(format_commands(plan_commands(args.repository, batches)))
    return 0


def cmd_k8s_status(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from cspine import k8s
    from cspine.inference.specs import SERVED

    api, namespace = k8s.connect(k8s.ClusterAccess.choose(args.kubeconfig, args.context, os.environ))
    with api:
        status = k8s.gather_status(
            api, args.namespace or namespace, args.release, tuple(SERVED), datetime.now(timezone.utc)
        )
    verdict = k8s.judge(status)
    print(json.dumps(k8s.status_json(status, verdict), indent=2) if args.json else k8s.format_status(status, verdict))
    for problem in verdict.problems:
        print(f"cspine k8s status: {problem}", file=sys.stderr)
    return 0 if verdict.healthy else 1


def cmd_loadtest(args: argparse.Namespace) -> int:
    from cspine.loadtest.command import run_command

    return run_command(args)


def cmd_demo(args: argparse.Namespace) -> int:
    import subprocess

    from cspine.embedded import EmbeddedServer
    from cspine.phantom.generate import PhantomOptions, generate_case

    out = Path(args.out)
    study = out / "study"
    print(f"cspine demo: a SYNTHETIC study with a tumor in {study}", flush=True)
    truth = generate_case(study, "demo", DEMO_SEED, 0, PhantomOptions(tumor="malignant"))
    lesion = truth["tumor"]
    print("starting cspine serve (local Triton on CPU, then the gateway) …", flush=True)
    with EmbeddedServer(out / "data", out / "serve.log") as server:
        print(
            f"\ntruth: {lesion['class']} ({lesion['subtype']}) at {lesion['primary_level']}, "
            f"{lesion['max_diameter_mm']:.1f} mm; C2–C7 Cobb {truth['cobb_angle_c2_c7_deg']:.1f}°\n",
            flush=True,
        )
        analyze = [sys.executable, "-m", "cspine", "analyze", str(study), "--server", server.address]
        analyze += ["--data-dir", str(out / "data")]  # where serve keeps the tokens it generated
        analyze += ["--seg", str(out / "seg.dcm"), "--sr", str(out / "sr.dcm"), "--overlay", str(out / "overlay.png")]
        code = subprocess.call(analyze)
    print(f"cspine serve stopped (its log: {out / 'serve.log'})")
    return code


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


def add_triton_arguments(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Flags of the local Triton, shared by ``cspine triton start`` and (with prefix ``triton-``) ``cspine serve``."""
    p.add_argument(
        "--repository",
        default=os.environ.get("CSPINE_MODEL_REPOSITORY", str(default_repository())),
        help="model repository (env CSPINE_MODEL_REPOSITORY; default: this checkout's model_repository)",
    )
    for name, port in (("http", 8000), ("grpc", 8001), ("metrics", 8002)):
        env = f"CSPINE_TRITON_{name.upper()}_PORT"
        p.add_argument(
            f"--{prefix}{name}-port",
            dest=f"triton_{name}_port",
            type=int,
            default=_env_int(env, port),
            help=f"Triton {name} port (env {env}, default {port})",
        )
    p.add_argument(
        "--model-config-name", default=None, help="use configs/<NAME>.pbtxt instead of config.pbtxt (e.g. gpu)"
    )
    p.add_argument(
        "--ort-threads",
        type=int,
        default=_env_int("CSPINE_ORT_THREADS", 0) or None,
        help="ONNX Runtime threads per model (env CSPINE_ORT_THREADS; default: each config.pbtxt's ort_threads)",
    )
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level (default 0)")


def cmd_serve(args: argparse.Namespace) -> int:
    import asyncio
    from contextlib import ExitStack

    from cspine.fewshot.prototypes import SupportSet
    from cspine.fewshot.store import SupportStore
    from cspine.gateway import auth, logs
    from cspine.gateway.metrics import Metrics
    from cspine.gateway.server import GatewayConfig, run_gateway
    from cspine.inference.client import TritonClient
    from cspine.service import AnalysisService

    logs.configure(args.log_level if args.log_level.upper() != "WARNING" else "INFO")
    auth.check_bind_address(args.host, tokens_configured=args.tokens is not None, tls=bool(args.tls_cert))
    config = GatewayConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port or None,
        grace_s=args.grace,
        upload_deadline_s=args.upload_deadline,
        idle_timeout_s=args.idle_timeout,
    )
    data_dir = Path(args.data_dir).expanduser()
    data_dir.mkdir(parents=True, exist_ok=True)
    if args.tokens:
        tokens, new_tokens = auth.TokenStore.from_file(Path(args.tokens)), None
    else:
        tokens, new_tokens = auth.ensure_default_tokens(data_dir)
    credentials = None
    if args.tls_cert or args.tls_key:
        credentials = auth.server_credentials(
            Path(args.tls_cert), Path(args.tls_key), args.tls_client_ca and Path(args.tls_client_ca)
        )
    store = SupportStore(args.store_url or f"sqlite:///{data_dir / 'support.db'}")
    store.migrate()
    if store.seed_defaults(SupportSet.load()):
        print("support set: seeded with cspine's SYNTHETIC default cases (version 1)", flush=True)
    metrics = Metrics()

    async def run(url: str) -> None:
        client = TritonClient(
            url,
            timeout_s=120.0,
            round_robin=args.triton_round_robin,
            reconnect_s=args.triton_reconnect,
            observer=metrics.observe_triton,
        )
        async with client:
            service = AnalysisService(
                client,
                Path(args.repository),
                limits=IngestLimits.from_env(),
                max_studies_in_flight=args.max_studies_in_flight,
                max_queued_studies=args.max_queued_studies,
                store=store,
            )
            watcher = asyncio.create_task(service.watch_store(args.store_poll))
            try:
                await run_gateway(service, config, metrics, tokens, credentials)
            finally:
                watcher.cancel()

    with ExitStack() as stack:
        stack.callback(store.close)
        url = args.triton_url
        if url is None:
            triton = _triton(args, supervise=True, on_restart=metrics.triton_restarts.inc)  # restarted if it crashes
            url = stack.enter_context(triton).grpc_url
        print(f"cspine serve: gRPC on {config.host}:{config.port}, Triton at {url}, data in {data_dir}", flush=True)
        if new_tokens:
            print(f"generated tokens (shown once; kept in {data_dir / auth.TOKENS_FILE}):", flush=True)
            for role, token in new_tokens.items():
                print(f"  {role.value}: {token}", flush=True)
        asyncio.run(run(url))
    return 0


def cmd_fuzz_ingest(args: argparse.Namespace) -> int:
    from cspine.dicom.fuzz import FuzzOptions, format_report, fuzz_ingest

    options = FuzzOptions(
        budget_s=args.budget_s,
        corpus=Path(args.corpus),
        work=Path(args.work),
        seed=args.seed,
        seeds=tuple(Path(s) for s in args.seeds),
        per_input_timeout_s=args.per_input_timeout_s,
    )
    report = fuzz_ingest(options, progress=lambda message: print(message, flush=True))
    print(format_report(report))
    return 1 if report.crashes else 0


def build_parser() -> argparse.ArgumentParser:
    from cspine.client import add_data_dir_argument
    from cspine.phantom.generate import OPLL_PROBABILITY, tumor_choices
    from cspine.phantom.scanner import MATRICES

    parser = argparse.ArgumentParser(
        prog="cspine",
        description="Few-shot, multi-modal cervical spine tumor assistant. Phantom data is SYNTHETIC.",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("CSPINE_LOG_LEVEL", "WARNING"),
        help="logging level (env CSPINE_LOG_LEVEL, default WARNING)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "phantom",
        help="generate SYNTHETIC cervical spine studies as DICOM with ground truth",
        description=(
            "Write DIR/<case>/{ct,mr,xr}/*.dcm, DIR/<case>/truth.json, DIR/<case>/labels.npz and DIR/cohort.json. "
            "With --tumor random, 25%% of cases have no tumor; the others get a subtype drawn with relative "
            "frequencies hemangioma 14, osteoid_osteoma 8, schwannoma 10, osteochondroma 6, giant_cell_tumor 10, "
            "aneurysmal_bone_cyst 8, osteoblastoma 7, metastasis 18, myeloma 10, chordoma 9."
        ),
    )
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--cases", type=int, default=1, help="number of cases (default 1)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed; case i is the same for the same seed")
    p.add_argument("--modalities", default="ct,mr,xr", help="comma-separated subset of ct,mr,xr (default all)")
    p.add_argument(
        "--tumor",
        default="random",
        choices=tumor_choices(),
        metavar="SUBTYPE|CLASS|none|random",
        help="tumor to draw: a subtype, a class (benign, borderline, malignant), none or random",
    )
    p.add_argument(
        "--difficulty",
        default="normal",
        help="easy, normal, hard or 0..1: higher blurs the subtypes' distinctive traits, adds noise",
    )
    p.add_argument(
        "--shift", default="", help="domain shift, e.g. noise=2,resolution=1.5,contrast=0.8,thickness=3 (mm)"
    )
    p.add_argument(
        "--opll",
        default="random",
        choices=list(OPLL_PROBABILITY),
        help="ossification of the posterior longitudinal ligament: random (12%%), yes, no",
    )
    p.add_argument(
        "--matrix",
        default="phantom",
        choices=list(MATRICES),
        help="image matrices: phantom (256² CT and MR, ~0.55 mm radiograph; fast) or real (512² CT with 0.5 mm "
        "slices, 512² MR, 3072 × 2614 radiograph at ~0.1 mm: for benchmarks, ~1 min and 200 MB per case)",
    )
    p.add_argument("--workers", type=int, default=1, help="processes generating cases in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser(
        "inspect",
        help="show what ingest makes of DICOM files or folders",
        description="Exit status 1 when ingest would refuse a file or a study, 0 otherwise.",
    )
    p.add_argument("paths", nargs="+", help="files or folders (searched recursively)")
    p.add_argument("--json", action="store_true", help="machine-readable output with stable keys")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", help="benchmarks that print figures")
    bench = p.add_subparsers(dest="bench", required=True)
    b = bench.add_parser("ingest", help="ingest slices/s beside bare pydicom on the same uncompressed CT")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--thickness", type=float, default=1.5, help="CT slice thickness in mm (default 1.5)")
    b.add_argument("--seed", type=int, default=7)
    b.set_defaults(func=cmd_bench_ingest)
    b = bench.add_parser("models", help="CPU latency of the exported ONNX models (ONNX Runtime, 2 threads)")
    b.add_argument("--repository", default="model_repository")
    b.add_argument("--repeats", type=int, default=20)
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_models)
    b = bench.add_parser(
        "triton",
        help="the local Triton: dynamic batching on/off, overhead vs in-process ORT, shared memory, ensemble",
    )
    b.add_argument("--repository", default=str(default_repository()))
    b.add_argument("--seconds", type=float, default=3.0, help="load time per model and concurrency (default 3)")
    b.add_argument("--repeats", type=int, default=30, help="calls per side-by-side comparison (default 30)")
    b.add_argument("--ort-threads", type=int, default=None, help="override every config's ort_threads")
    b.add_argument(
        "--queue-delays", default="", help="also measure batching with these max queue delays (µs, comma-separated)"
    )
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_triton)
    b = bench.add_parser(
        "pipeline",
        help="one SYNTHETIC CT + MR + radiograph study end to end on the local Triton, time per stage",
    )
    b.add_argument("--triton-url", default=None, help="an external Triton (default: start the local one)")
    b.add_argument("--repeats", type=int, default=5, help="timed analyses after one warm-up (default 5)")
    b.add_argument(
        "--matrix",
        default="phantom",
        choices=["phantom", "real"],
        help="real: the radiograph alone, the CT alone and the whole study at real matrix sizes (3072 × 2614 "
        "radiograph, 512² × 305-slice CT, 512² MR) beside the same case at the phantom's, against the budgets",
    )
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_pipeline)
    b = bench.add_parser(
        "gateway",
        help="the same SYNTHETIC study through gRPC and the gateway vs the pipeline in-process, side by side",
    )
    b.add_argument("--triton-url", default=None, help="an external Triton (default: start the local one)")
    b.add_argument("--repeats", type=int, default=5, help="alternating timed runs of each (default 5)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_gateway)
    b = bench.add_parser(
        "adapt",
        help="a new support case in use (AddCase → next analysis) vs fine-tuning the baseline on the same cases",
    )
    b.add_argument("--triton-url", default=None, help="an external Triton (default: start the local one)")
    b.add_argument("--repeats", type=int, default=5, help="timed store writes and fine-tunings (default 5)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench_adapt)

    p = sub.add_parser(
        "train",
        help="train models on SYNTHETIC phantom data (CPU, deterministic, checkpointed)",
        description="Checkpoints go to --checkpoints and runs resume from them. The full preset reproduces "
        "the shipped models (make train); smoke trains tiny models for seconds.",
    )
    p.add_argument(
        "--models",
        default="seg_ct,seg_mr,seg_xr,seg_ct_mask,lesion_embed,baseline",
        help="comma-separated: seg_ct, seg_mr, seg_xr, seg_ct_mask (CT with full lesion masks, for "
        "comparison), lesion_embed (episodic, with the prototype classifier), baseline",
    )
    p.add_argument("--preset", default="full", choices=["full", "smoke"])
    p.add_argument(
        "--tumor-labels",
        choices=["box", "mask"],
        default=None,
        help="lesion supervision of segmentation models: box (default; one box per lesion) or mask",
    )
    p.add_argument("--steps", type=int, default=None, help="override the preset's segmentation steps")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="checkpoint and stop at this step; the next call resumes (train in slices)",
    )
    p.add_argument("--cache", default=".cache/cspine", help="where generated training data is cached")
    p.add_argument("--checkpoints", default=".cache/cspine/checkpoints", help="checkpoint folder")
    p.add_argument("--workers", type=int, default=2, help="processes generating phantom data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("export", help="export trained checkpoints to ONNX in the model repository")
    p.add_argument("--checkpoints", default=".cache/cspine/checkpoints")
    p.add_argument("--repository", default="model_repository")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="evaluations that print figures")
    evaluate = p.add_subparsers(dest="evaluate", required=True)
    e = evaluate.add_parser(
        "models",
        help="segmentation Dice, lesion size error and few-shot accuracy on held-out SYNTHETIC data",
    )
    e.add_argument("--repository", default="model_repository")
    e.add_argument(
        "--preset",
        default="full",
        choices=["full", "smoke"],
        help="full: 24 studies, 200 episodes per K; smoke: a tiny run",
    )
    e.add_argument("--cache", default=".cache/cspine")
    e.add_argument("--out", default=None, help="also write metrics.json and PNG figures here")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate_models)
    e = evaluate.add_parser(
        "pipeline",
        help="the whole pipeline on held-out SYNTHETIC studies: detection, size, level, Cobb, canal, OPLL, times",
        description=(
            "Generate (once, cached) a held-out SYNTHETIC phantom cohort, analyse every study through Triton "
            "(the local one unless --triton-url) and compare with each case's truth.json."
        ),
    )
    _add_cohort_arguments(e, cases=60, seed=9300)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--out", default=None, help="also write metrics.json and per-study records.json here")
    e.set_defaults(func=cmd_evaluate_pipeline)
    e = evaluate.add_parser(
        "competence",
        help="what cspine can assess: in-domain pass rate, out-of-domain catch rate per layer, OOD score AUROC",
        description=(
            "Run the full pipeline (the local Triton unless --triton-url) on held-out SYNTHETIC phantom studies, "
            "on REAL out-of-domain DICOM files from installed packages (tests/data/real_ood/README.md) and on "
            "SYNTHETIC out-of-domain studies; print the in-domain assessable rate and detection figures, the share "
            "of out-of-domain studies given no tumor call and the layer that stopped them, and the ROC AUC of the "
            "out-of-distribution score (docs/competence.md)."
        ),
    )
    _add_cohort_arguments(e, cases=60, seed=9300)
    e.add_argument("--json", action="store_true", help="print the figures as JSON")
    e.add_argument("--out", default=None, help="also write competence.json here")
    e.set_defaults(func=cmd_evaluate_competence)

    e = evaluate.add_parser(
        "study",
        help="clinical validation on a labelled cohort through the API: sensitivity, specificity, AUC … with CIs",
        description=(
            "Add the first N cases per class to the support set (SupportSet.AddCase), analyse the rest "
            "(AnalyzeStudy: all modalities and each alone) and compare with each case's reference.json. Writes "
            "REPORT_DIR/report.html, metrics.json and predictions.csv; resumes an interrupted run. Without --server "
            "it starts the embedded default itself. The cohort format is in docs/evaluation.md."
        ),
    )
    e.add_argument("cohort", help="COHORT_DIR: one folder per case with its DICOM and reference.json")
    e.add_argument("--server", default=None, help="a running cspine server (default: start the embedded one)")
    e.add_argument("--token", default=os.environ.get("CSPINE_TOKEN"), help="a curator token for --server")
    add_data_dir_argument(e, "where to find the tokens of --server when no --token is given")
    e.add_argument("--support", type=int, default=5, help="cases per class added to the support set (default 5)")
    e.add_argument("--out", default="out/study", help="REPORT_DIR (default out/study)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    e.add_argument("--json", action="store_true", help="print metrics.json instead of the headline")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate_study)

    p = sub.add_parser(
        "calibrate",
        help="rebuild the default SYNTHETIC support set and fit the fusion weights (model_repository/calibration.json)",
    )
    _add_cohort_arguments(p, cases=48, seed=9400)
    p.add_argument("--repository", default=str(default_repository()))
    p.add_argument("--cache", default=".cache/cspine")
    p.add_argument("--per-subtype", type=int, default=12, help="support lesions per subtype (default 12)")
    p.add_argument(
        "--competence-only",
        action="store_true",
        help="only fit the competence reference (model_repository/competence.json): the segmentation models' "
        "feature statistics and out-of-distribution thresholds, on a SYNTHETIC reference cohort",
    )
    p.add_argument("--reference-cases", type=int, default=30, help="studies of that reference cohort (default 30)")
    p.add_argument("--reference-seed", type=int, default=9500, help="its phantom seed (default 9500)")
    p.set_defaults(func=cmd_calibrate)

    from cspine.client import add_analyze_command
    from cspine.support_cli import add_support_command

    add_analyze_command(sub)
    add_support_command(sub)

    p = sub.add_parser(
        "serve",
        help="the local Triton (CPU) and the gRPC gateway in one command, until Ctrl-C / SIGTERM",
        description=(
            "Start the local Triton over the model repository (or use --triton-url) and the cspine gRPC API "
            "(SpineAnalysis, grpc.health.v1.Health, reflection) with Prometheus metrics on their own port. "
            "SIGTERM stops taking studies and lets those in flight finish within --grace seconds."
        ),
    )
    p.add_argument(
        "--host",
        default=os.environ.get("CSPINE_HOST", "127.0.0.1"),
        help="listen address (env CSPINE_HOST, default 127.0.0.1)",
    )
    p.add_argument(
        "--port",
        type=int,
        default=_env_int("CSPINE_PORT", 50051),
        help="gateway gRPC port (env CSPINE_PORT, default 50051)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=_env_int("CSPINE_METRICS_PORT", 9464),
        help="gateway Prometheus port (env CSPINE_METRICS_PORT, default 9464; 0: off)",
    )
    add_data_dir_argument(p, "where cspine keeps its data: support store, generated tokens")
    p.add_argument(
        "--triton-url",
        default=os.environ.get("CSPINE_TRITON_URL"),
        help="an external Triton's gRPC address (env CSPINE_TRITON_URL); default: start the local Triton",
    )
    p.add_argument(
        "--triton-round-robin",
        action="store_true",
        default=os.environ.get("CSPINE_TRITON_ROUND_ROBIN", "") in ("1", "true"),
        help="spread Triton calls over every address --triton-url resolves to, e.g. dns:///triton-headless:8001 "
        "(env CSPINE_TRITON_ROUND_ROBIN=1)",
    )
    p.add_argument(
        "--triton-reconnect",
        type=float,
        default=float(os.environ.get("CSPINE_TRITON_RECONNECT_SECONDS", "0")) or None,
        help="open a fresh Triton channel (a fresh DNS lookup) this often, in seconds, so Triton pods added by an "
        "autoscaler get work (env CSPINE_TRITON_RECONNECT_SECONDS; default off)",
    )
    p.add_argument(
        "--max-studies-in-flight",
        type=int,
        default=_env_int("CSPINE_MAX_STUDIES_IN_FLIGHT", 2),
        help="studies analysed at once; more wait in the queue (env CSPINE_MAX_STUDIES_IN_FLIGHT, default 2)",
    )
    p.add_argument(
        "--max-queued-studies",
        type=int,
        default=_env_int("CSPINE_MAX_QUEUED_STUDIES", 2),
        help="studies that wait for a free slot, their upload unread; more get RESOURCE_EXHAUSTED at once "
        "(env CSPINE_MAX_QUEUED_STUDIES, default 2; 0: refuse as soon as every slot is taken)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=float(os.environ.get("CSPINE_GRACE_SECONDS", "30")),
        help="seconds in-flight studies get to finish on SIGTERM (env CSPINE_GRACE_SECONDS, default 30)",
    )
    p.add_argument(
        "--upload-deadline",
        type=float,
        default=float(os.environ.get("CSPINE_UPLOAD_DEADLINE_SECONDS", "600")),
        help="seconds a study's whole upload (AnalyzeStudy, AddCase) may take once its slot is taken; a slower one "
        "gets DEADLINE_EXCEEDED and frees the slot (env CSPINE_UPLOAD_DEADLINE_SECONDS, default 600: a study of the "
        "default 4 GiB limit at 57 Mbit/s or faster)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=float(os.environ.get("CSPINE_IDLE_TIMEOUT_SECONDS", "30")),
        help="seconds an upload may send nothing (before its first message or between two); a longer silence "
        "gets DEADLINE_EXCEEDED and frees the slot (env CSPINE_IDLE_TIMEOUT_SECONDS, default 30; at most "
        "--upload-deadline)",
    )
    p.add_argument(
        "--store-url",
        default=os.environ.get("CSPINE_STORE_URL"),
        help="support store: sqlite:///FILE or postgresql+psycopg://… shared by replicas (env CSPINE_STORE_URL; "
        "default sqlite:///DATA_DIR/support.db)",
    )
    p.add_argument(
        "--store-poll",
        type=float,
        default=float(os.environ.get("CSPINE_STORE_POLL_SECONDS", "5")),
        help="seconds between checks for changes made by other replicas (env CSPINE_STORE_POLL_SECONDS, default 5)",
    )
    p.add_argument(
        "--tokens",
        default=os.environ.get("CSPINE_TOKENS"),
        help="file of 'ROLE TOKEN' lines (roles analyst, curator) (env CSPINE_TOKENS); without it the server "
        "listens on loopback only and generates one token per role in DATA_DIR/tokens",
    )
    p.add_argument("--tls-cert", default=os.environ.get("CSPINE_TLS_CERT"), help="PEM certificate: serve TLS")
    p.add_argument("--tls-key", default=os.environ.get("CSPINE_TLS_KEY"), help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default=os.environ.get("CSPINE_TLS_CLIENT_CA"),
        help="PEM CA: require client certificates it signed",
    )
    add_triton_arguments(p, prefix="triton-")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("triton", help="the local Triton server and the GPU model-plan commands")
    triton = p.add_subparsers(dest="triton", required=True)
    t = triton.add_parser(
        "start",
        help="run the bundled tritonserver on CPU over the model repository until Ctrl-C / SIGTERM",
        description=(
            "Start the tritonserver binary of the nvidia-pytriton wheel with the Python backend, wait until every "
            "model is READY and forward Triton's log. Fails with the model's name and Triton's reason when a model "
            "does not load."
        ),
    )
    add_triton_arguments(t)
    t.set_defaults(func=cmd_triton_start)
    t = triton.add_parser(
        "plan-commands",
        help="print the trtexec commands that build each model.plan from model.onnx on the target GPU",
    )
    t.add_argument(
        "--repository", default="/models", help="model repository path where the commands will run (default /models)"
    )
    t.add_argument(
        "--local-repository",
        default=str(default_repository()),
        help="this checkout's model repository, whose configs/gpu.pbtxt give the batch sizes to optimise for",
    )
    t.set_defaults(func=cmd_triton_plan_commands)

    p = sub.add_parser("k8s", help="a cspine release on a Kubernetes cluster")
    kube = p.add_subparsers(dest="k8s", required=True)
    k = kube.add_parser(
        "status",
        help="Triton and gateway pods, each model's readiness on each Triton pod, and the autoscalers of a release",
        description=(
            "Read with the kubernetes client: the release's Triton and gateway pods (labels app.kubernetes.io/name="
            "cspine, app.kubernetes.io/instance=RELEASE, app.kubernetes.io/component=triton|gateway), each served "
            "model's readiness asked of Triton through the API server's pod proxy (GET /v2/models/MODEL/ready; needs "
            "get on pods/proxy), and the HorizontalPodAutoscalers' replicas, metrics and conditions. Exit status 0 "
            "when every pod and model is ready and no HPA has AbleToScale or ScalingActive False, 1 otherwise (the "
            "problems on stderr), 2 when the cluster cannot be reached or the kubeconfig cannot be used. Tested "
            "against fixtures in the API server's and Triton's recorded answer formats, not against a live cluster."
        ),
    )
    k.add_argument("--namespace", "-n", default=None, help="the release's namespace (default: the context's)")
    k.add_argument("--release", default="cspine", help="Helm release name (default cspine)")
    k.add_argument("--context", default=None, help="kubeconfig context (default: the current context)")
    k.add_argument(
        "--kubeconfig",
        default=None,
        help="kubeconfig file (default: $KUBECONFIG; else, when KUBERNETES_SERVICE_HOST is set, the pod's service "
        "account; else ~/.kube/config)",
    )
    k.add_argument("--json", action="store_true", help="machine-readable output with stable keys")
    k.set_defaults(func=cmd_k8s_status)

    from cspine.loadtest.command import DESCRIPTION, EPILOG, add_loadtest_arguments

    p = sub.add_parser(
        "loadtest",
        help="load-test a cspine server with Locust: throughput, latency percentiles, sweeps, overload",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_loadtest_arguments(p)
    p.set_defaults(func=cmd_loadtest)

    p = sub.add_parser("fuzz", help="fuzzing runs (atheris, from the dev extra)")
    fuzz = p.add_subparsers(dest="fuzz", required=True)
    f = fuzz.add_parser(
        "ingest",
        help="coverage-guided fuzzing of DICOM ingest for a CPU budget; exit status 1 when anything crashed",
    )
    f.add_argument("--budget-s", type=float, required=True, help="CPU seconds of fuzzing")
    f.add_argument("--corpus", default="tests/data/fuzz_corpus", help="kept corpus: read, then minimized in place")
    f.add_argument("--work", default="out/fuzz", help="seeds, new inputs, crashes/ and logs of the run")
    f.add_argument("--seed", type=int, default=1, help="libFuzzer's random seed")
    f.add_argument("--seeds", action="append", default=[], help="another folder of seed inputs (repeatable)")
    f.add_argument("--per-input-timeout-s", type=int, default=10, help="longer counts as a hang (default 10)")
    f.set_defaults(func=cmd_fuzz_ingest)

    p = sub.add_parser(
        "demo",
        help="start cspine serve, upload a SYNTHETIC study with `cspine analyze`, print the report, write "
        "SEG, SR and an overlay PNG, stop",
    )
    p.add_argument("--out", default="out/demo", help="folder for the demo's SYNTHETIC studies")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from cspine.gateway import logs

    # Every command logs redacted, with pydicom's and highdicom's warnings in the log (``serve`` then switches to
    # JSON lines). Like basicConfig, it leaves a host that configured logging itself (a test runner) alone.
    if not logging.getLogger().handlers:
        logs.configure(args.log_level, json_lines=False)
    try:
        return args.func(args)
    except (CspineError, ValueError) as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cspine: interrupted", file=sys.stderr)
        return 130
