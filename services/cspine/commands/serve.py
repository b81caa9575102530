"""``cspine serve`` (the local Triton and the gRPC gateway in one process) and ``cspine triton`` (start the local
Triton, print the GPU model-plan commands). Flags default to ``Settings.serve``; ``serve_config`` turns the
parsed flags back into the ServeConfig the server runs with."""

from __future__ import annotations

import argparse
import logging
import sys
from functools import partial
from pathlib import Path

from cspine.config import (
    DEFAULT_DATA_DIR,
    AnalysisConfig,
    DicomNodeConfig,
    GatewayConfig,
    IngestLimits,
    ServeConfig,
    Settings,
    TritonClientConfig,
    TritonConfig,
)
from cspine.inference.local_triton import default_repository


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def triton_config(args: argparse.Namespace) -> TritonConfig:
    """The local Triton add_triton_arguments' flags describe."""
    return TritonConfig(
        repository=Path(args.repository),
        http_port=args.triton_http_port,
        grpc_port=args.triton_grpc_port,
        metrics_port=args.triton_metrics_port,
        model_config_name=args.model_config_name,
        ort_threads=args.ort_threads or None,
        log_verbose=args.log_verbose,
    )


def serve_config(args: argparse.Namespace, limits: IngestLimits) -> ServeConfig:
    """``cspine serve``'s flags (whose defaults came from the environment) as one validated ServeConfig."""
    gateway = GatewayConfig(
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port or None,
        grace_s=args.grace,
        upload_deadline_s=args.upload_deadline,
        idle_timeout_s=args.idle_timeout,
    )
    analysis = AnalysisConfig(
        limits=limits, max_studies_in_flight=args.max_studies_in_flight, max_queued_studies=args.max_queued_studies
    )
    return ServeConfig(
        gateway=gateway,
        triton=triton_config(args),
        analysis=analysis,
        triton_client=TritonClientConfig(
            round_robin=args.triton_round_robin,
            reconnect_s=args.triton_reconnect or None,
            pin_versions=args.triton_pin_versions,
        ),
        data_dir=Path(args.data_dir).expanduser(),
        triton_url=args.triton_url or None,
        dicom=dicom_config(args),
        store_url=args.store_url or None,
        store_poll_s=args.store_poll,
        prototype_adaptation=args.prototype_adaptation,
        tokens=_path(args.tokens),
        tls_cert=_path(args.tls_cert),
        tls_key=_path(args.tls_key),
        tls_client_ca=_path(args.tls_client_ca),
    )


def local_triton(config: TritonConfig, **supervision):
    """The LocalTriton ``config`` describes; ``supervision``: ``supervise``, ``on_restart`` (see LocalTriton)."""
    from cspine.inference.local_triton import LocalTriton, TritonPorts

    ports = TritonPorts(http=config.http_port, grpc=config.grpc_port, metrics=config.metrics_port)
    return LocalTriton(
        config.repository or default_repository(),
        ports,
        model_config_name=config.model_config_name,
        ort_threads=config.ort_threads,
        log_verbose=config.log_verbose,
        **supervision,
    )


def dicom_node(config: ServeConfig, service, metrics, tokens):
    """The DicomNode ``config.dicom`` describes, on the gateway's host, TLS from the gateway's files."""
    from cspine.dicomnet.node import DicomNode, tls_context

    tls = None
    if config.dicom.tls and config.tls_cert and config.tls_key:
        tls = tls_context(config.tls_cert, config.tls_key, config.tls_client_ca)
    return DicomNode(service, config.dicom, config.gateway.host, config.data_dir, metrics, tokens, tls)


def cmd_serve(args: argparse.Namespace, limits: IngestLimits) -> int:
    import asyncio
    from contextlib import AsyncExitStack, ExitStack

    from cspine.fewshot.prototypes import Adaptation, default_support, embedding_key
    from cspine.fewshot.store import SupportStore
    from cspine.gateway import auth, logs
    from cspine.gateway.metrics import Metrics
    from cspine.gateway.server import run_gateway
    from cspine.gateway.tokens import TOKENS_FILE, TokenStore, ensure_default_tokens
    from cspine.inference.client import TritonClient
    from cspine.service import AnalysisService

    logs.configure(args.log_level if args.log_level.upper() != "WARNING" else "INFO")
    config = serve_config(args, limits)
    gateway, data_dir = config.gateway, config.data_dir
    auth.check_bind_address(gateway.host, tokens_configured=config.tokens is not None, tls=config.tls_cert is not None)
    if config.dicom.port is not None and not config.dicom.allowed_aes and not auth.is_loopback(gateway.host):
        raise ValueError(
            f"the DICOM node on {gateway.host} needs --dicom-allowed-aes: only a node on loopback accepts any caller"
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    if config.tokens:
        tokens, new_tokens = TokenStore.from_file(config.tokens), None
    else:
        tokens, new_tokens = ensure_default_tokens(data_dir)
    credentials = None
    if config.tls_cert and config.tls_key:
        credentials = auth.server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)
    repository = config.triton.repository or default_repository()
    store = SupportStore(
        config.store,
        adaptation=Adaptation.of_repository(config.prototype_adaptation, repository),
        embedding=embedding_key(repository),
    )
    store.migrate()
    defaults = default_support(repository)
    if store.seed_defaults(defaults):
        synthetic = "SYNTHETIC " if defaults.synthetic else ""
        kind = f"the served version set's own cases from its {synthetic}cohort" if defaults.site else None
        kind = kind or "cspine's SYNTHETIC default cases"
        print(f"support set: seeded with {kind} (version {store.current_version()})", flush=True)
    metrics = Metrics()

    async def run(url: str) -> None:
        async with TritonClient(url, config.triton_client, observer=metrics.observe_triton) as client:
            service = AnalysisService(client, repository, config.analysis, store=store)
            watchers = [
                asyncio.create_task(service.watch_store(config.store_poll_s)),
                asyncio.create_task(service.watch_models(config.store_poll_s)),
            ]
            try:
                async with AsyncExitStack() as nodes:
                    if config.dicom.enabled:
                        node = await nodes.enter_async_context(dicom_node(config, service, metrics, tokens))
                        print(node.describe(), flush=True)
                    await run_gateway(service, gateway, metrics, tokens, credentials)
            finally:
                for watcher in watchers:
                    watcher.cancel()

    with ExitStack() as stack:
        stack.callback(store.close)
        url = config.triton_url
        if url is None:
            # Restarted if it crashes.
            triton = local_triton(config.triton, supervise=True, on_restart=metrics.triton_restarts.inc)
            url = stack.enter_context(triton).grpc_url
        print(f"cspine serve: gRPC on {gateway.host}:{gateway.port}, Triton at {url}, data in {data_dir}", flush=True)
        if new_tokens:
            print(f"generated tokens (shown once; kept in {data_dir / TOKENS_FILE}):", flush=True)
            for role, token in new_tokens.items():
                print(f"  {role.value}: {token}", flush=True)
        asyncio.run(run(url))
    return 0


def _raise_interrupt(*_) -> None:
    raise KeyboardInterrupt


def cmd_triton_start(args: argparse.Namespace) -> int:
    import signal
    import time

    logging.getLogger("cspine.triton").setLevel(logging.INFO)  # forward Triton's own log
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops Triton in order, as Ctrl-C does
    triton = local_triton(triton_config(args))
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
    from cspine.inference.model_config import available_sets, config_path, load_config, opt_batch
    from cspine.inference.specs import MODELS
    from cspine.inference.tensorrt import format_commands, plan_commands

    local = Path(args.local_repository)
    batches = {name: opt_batch(load_config(config_path(local, name, "gpu"))) for name in MODELS}
    print(format_commands(plan_commands(args.repository, batches, tuple(available_sets(local)))))
    return 0


def add_triton_arguments(p: argparse.ArgumentParser, triton: TritonConfig, prefix: str = "") -> None:
    """Flags of the local Triton, defaults from ``triton``; shared by ``cspine triton start`` and (with prefix
    ``triton-``) ``cspine serve``."""
    p.add_argument(
        "--repository",
        default=str(triton.repository or default_repository()),
        help="model repository (env CSPINE_MODEL_REPOSITORY; default: this checkout's model_repository)",
    )
    for name, port in (("http", triton.http_port), ("grpc", triton.grpc_port), ("metrics", triton.metrics_port)):
        env, default = f"CSPINE_TRITON_{name.upper()}_PORT", getattr(TritonConfig, f"{name}_port")
        p.add_argument(
            f"--{prefix}{name}-port",
            dest=f"triton_{name}_port",
            type=int,
            default=port,
            help=f"Triton {name} port (env {env}, default {default})",
        )
    p.add_argument(
        "--model-config-name", default=None, help="use configs/<NAME>.pbtxt instead of config.pbtxt (e.g. gpu)"
    )
    p.add_argument(
        "--ort-threads",
        type=int,
        default=triton.ort_threads,
        help="ONNX Runtime threads per model (env CSPINE_ORT_THREADS; default: each config.pbtxt's ort_threads)",
    )
    p.add_argument("--log-verbose", type=int, default=0, help="Triton's --log-verbose level (default 0)")


def _add_serve_parser(subparsers: argparse._SubParsersAction, serve: ServeConfig) -> None:
    gateway = serve.gateway
    p = subparsers.add_parser(
        "serve",
        help="the local Triton (CPU) and the gRPC gateway in one command, until Ctrl-C / SIGTERM",
        description=(
            "Start the local Triton over the model repository (or use --triton-url) and the cspine gRPC API "
            "(SpineAnalysis, grpc.health.v1.Health, reflection) with Prometheus metrics on their own port. "
            "SIGTERM stops taking studies and lets those in flight finish within --grace seconds."
        ),
    )
    p.add_argument("--host", default=gateway.host, help="listen address (env CSPINE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, default=gateway.port, help="gateway gRPC port (env CSPINE_PORT, default 50051)")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=gateway.metrics_port or 0,
        help="gateway Prometheus port (env CSPINE_METRICS_PORT, default 9464; 0: off)",
    )
    p.add_argument(
        "--data-dir",
        default=str(serve.data_dir),
        help=f"where cspine keeps its data: support store, generated tokens (env CSPINE_DATA_DIR, default "
        f"{DEFAULT_DATA_DIR})",
    )
    p.add_argument(
        "--triton-url",
        default=serve.triton_url,
        help="an external Triton's gRPC address (env CSPINE_TRITON_URL); default: start the local Triton",
    )
    p.add_argument(
        "--triton-round-robin",
        action="store_true",
        default=serve.triton_client.round_robin,
        help="spread Triton calls over every address --triton-url resolves to, e.g. dns:///triton-headless:8001 "
        "(env CSPINE_TRITON_ROUND_ROBIN=1)",
    )
    p.add_argument(
        "--triton-reconnect",
        type=float,
        default=serve.triton_client.reconnect_s,
        help="open a fresh Triton channel (a fresh DNS lookup) this often, in seconds, so Triton pods added by an "
        "autoscaler get work (env CSPINE_TRITON_RECONNECT_SECONDS; default off)",
    )
    p.add_argument(
        "--triton-pin-versions",
        action="store_true",
        default=serve.triton_client.pin_versions,
        help="name the served version set in every model call, for a Triton that loads every set (cspine models "
        "use all; the Helm chart's Triton pods) (env CSPINE_TRITON_PIN_VERSIONS=1)",
    )
    p.add_argument(
        "--max-studies-in-flight",
        type=int,
        default=serve.analysis.max_studies_in_flight,
        help="studies analysed at once; more wait in the queue (env CSPINE_MAX_STUDIES_IN_FLIGHT, default 2)",
    )
    p.add_argument(
        "--max-queued-studies",
        type=int,
        default=serve.analysis.max_queued_studies,
        help="studies that wait for a free slot, their upload unread; more get RESOURCE_EXHAUSTED at once "
        "(env CSPINE_MAX_QUEUED_STUDIES, default 2; 0: refuse as soon as every slot is taken)",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=gateway.grace_s,
        help="seconds in-flight studies get to finish on SIGTERM (env CSPINE_GRACE_SECONDS, default 30)",
    )
    p.add_argument(
        "--upload-deadline",
        type=float,
        default=gateway.upload_deadline_s,
        help="seconds a study's whole upload (AnalyzeStudy, AddCase) may take once its slot is taken; a slower one "
        "gets DEADLINE_EXCEEDED and frees the slot (env CSPINE_UPLOAD_DEADLINE_SECONDS, default 600: a study of the "
        "default 4 GiB limit at 57 Mbit/s or faster)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=gateway.idle_timeout_s,
        help="seconds an upload may send nothing (before its first message or between two); a longer silence "
        "gets DEADLINE_EXCEEDED and frees the slot (env CSPINE_IDLE_TIMEOUT_SECONDS, default 30; at most "
        "--upload-deadline)",
    )
    p.add_argument(
        "--store-url",
        default=serve.store_url,
        help="support store: sqlite:///FILE or postgresql+psycopg://… shared by replicas (env CSPINE_STORE_URL; "
        "default sqlite:///DATA_DIR/support.db)",
    )
    p.add_argument(
        "--store-poll",
        type=float,
        default=serve.store_poll_s,
        help="seconds between checks for support-set changes made by other replicas and for the model version set "
        "the repository names (cspine models use N) (env CSPINE_STORE_POLL_SECONDS, default 5)",
    )
    p.add_argument(
        "--prototype-adaptation",
        choices=["plain", "fitted"],
        default=serve.prototype_adaptation,
        help="what a site's support cases do beyond the support rule: fitted (from 5 site cases per class fit the "
        "prototypes to them, about 1 ms per change, and from 10 refit the fusion weights too; chosen on a tuning "
        "seed, docs/support.md) or plain (the rule alone) (env CSPINE_PROTOTYPE_ADAPTATION, default fitted)",
    )
    p.add_argument(
        "--tokens",
        default=_str(serve.tokens),
        help="file of 'ROLE TOKEN' lines (roles analyst, curator) (env CSPINE_TOKENS); without it the server "
        "listens on loopback only and generates one token per role in DATA_DIR/tokens",
    )
    p.add_argument("--tls-cert", default=_str(serve.tls_cert), help="PEM certificate: serve TLS")
    p.add_argument("--tls-key", default=_str(serve.tls_key), help="PEM private key of --tls-cert")
    p.add_argument(
        "--tls-client-ca",
        default=_str(serve.tls_client_ca),
        help="PEM CA: require client certificates it signed",
    )
    _add_dicom_arguments(p, serve.dicom)
    add_triton_arguments(p, serve.triton, prefix="triton-")
    p.set_defaults(func=partial(cmd_serve, limits=serve.analysis.limits))


def _add_dicom_arguments(p: argparse.ArgumentParser, dicom: DicomNodeConfig) -> None:
    """The DICOM node's flags (docs/dicom-node.md)."""
    g = p.add_argument_group("DICOM node", "studies from a PACS over DICOM, results back to it (off without a port)")
    g.add_argument(
        "--dicom-port",
        type=int,
        default=dicom.port,
        help="C-ECHO and C-STORE on this port (env CSPINE_DICOM_PORT; default off)",
    )
    g.add_argument(
        "--dicomweb-port",
        type=int,
        default=dicom.dicomweb_port,
        help="DICOMweb STOW-RS (POST /studies) on this port, with the bearer tokens (env CSPINE_DICOMWEB_PORT; "
        "default off)",
    )
    g.add_argument(
        "--ae-title", default=dicom.ae_title, help="the node's AE title (env CSPINE_AE_TITLE, default CSPINE)"
    )
    g.add_argument(
        "--dicom-allowed-aes",
        default=",".join(dicom.allowed_aes),
        help="comma-separated calling AE titles allowed to associate; others are rejected (env "
        "CSPINE_DICOM_ALLOWED_AES; required unless the node listens on loopback)",
    )
    g.add_argument(
        "--dicom-allowed-peers",
        default=",".join(dicom.allowed_peers),
        help="comma-separated addresses or networks allowed to connect (env CSPINE_DICOM_ALLOWED_PEERS; default any)",
    )
    g.add_argument(
        "--dicom-destination",
        action="append",
        dest="dicom_destinations",
        default=None,
        metavar="NAME=URL",
        help="where SEG and SR go, repeatable: NAME=dimse://AE_TITLE@HOST:PORT or NAME=https://HOST/dicom-web "
        "(env CSPINE_DICOM_DESTINATIONS, comma-separated)",
    )
    g.add_argument(
        "--dicom-quiet",
        type=float,
        default=dicom.quiet_s,
        help="seconds without a new instance after which a study is complete and analysed (env "
        "CSPINE_DICOM_QUIET_SECONDS, default 10)",
    )
    g.add_argument(
        "--dicom-retain",
        type=float,
        default=dicom.retain_s,
        help="seconds received instances are kept after their analysis (env CSPINE_DICOM_RETAIN_SECONDS, default 3600)",
    )
    g.add_argument(
        "--dicom-tls",
        action="store_true",
        default=dicom.tls,
        help="DICOM TLS and HTTPS on the node's ports with --tls-cert/--tls-key (and --tls-client-ca) (env "
        "CSPINE_DICOM_TLS=1)",
    )
    p.set_defaults(dicom_default_destinations=dicom.destinations)


def dicom_config(args: argparse.Namespace) -> DicomNodeConfig:
    """The DICOM node the flags describe (0 switches a port off, as in the variables)."""
    return DicomNodeConfig(
        port=args.dicom_port if args.dicom_port else None,
        dicomweb_port=args.dicomweb_port if args.dicomweb_port else None,
        ae_title=args.ae_title,
        allowed_aes=_list(args.dicom_allowed_aes),
        allowed_peers=_list(args.dicom_allowed_peers),
        destinations=tuple(args.dicom_destinations or args.dicom_default_destinations),
        quiet_s=args.dicom_quiet,
        retain_s=args.dicom_retain,
        tls=args.dicom_tls,
    )


def _list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    _add_serve_parser(subparsers, settings.serve)

    p = subparsers.add_parser("triton", help="the local Triton server and the GPU model-plan commands")
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
    add_triton_arguments(t, settings.serve.triton)
    t.set_defaults(func=cmd_triton_start)
    t = triton.add_parser(
        "plan-commands",
        help="print the trtexec commands that build each model.plan from model.onnx on the target GPU, for every "
        "version set the local repository holds",
    )
    t.add_argument(
        "--repository", default="/models", help="model repository path where the commands will run (default /models)"
    )
    t.add_argument(
        "--local-repository",
        default=str(default_repository()),
        help="the model repository to read: its configs/gpu.pbtxt give the batch sizes to optimise for, its version "
        "folders the sets to build (default: this checkout's)",
    )
    t.set_defaults(func=cmd_triton_plan_commands)
