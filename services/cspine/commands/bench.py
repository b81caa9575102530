"""``cspine bench``: benchmarks that print figures (ingest, models, triton, pipeline, gateway, adapt, dicomnet)."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

from cspine.config import Settings
from cspine.inference.local_triton import default_repository


def _print(result: dict, as_json: bool, text: Callable[[dict], str]) -> int:
    print(json.dumps(result, indent=2) if as_json else text(result))
    return 0


def cmd_bench_ingest(args: argparse.Namespace) -> int:
    from cspine.bench.ingest import bench_ingest, format_bench
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
    from cspine.bench.models import bench_models, format_bench

    return _print(bench_models(Path(args.repository), repeats=args.repeats), args.json, format_bench)


def cmd_bench_triton(args: argparse.Namespace) -> int:
    from cspine.bench.triton import bench_triton, format_bench_triton

    delays = tuple(int(d) for d in args.queue_delays.split(",") if d.strip())
    result = bench_triton(Path(args.repository), args.seconds, args.repeats, args.ort_threads, delays)
    return _print(result, args.json, format_bench_triton)


def cmd_bench_pipeline(args: argparse.Namespace) -> int:
    from cspine.bench.end_to_end import bench_pipeline, bench_pipeline_sizes, format_bench, format_sizes_bench

    if args.matrix == "real":
        return _print(bench_pipeline_sizes(args.triton_url, args.repeats), args.json, format_sizes_bench)
    return _print(bench_pipeline(args.triton_url, args.repeats), args.json, format_bench)


def cmd_bench_gateway(args: argparse.Namespace) -> int:
    from cspine.bench.end_to_end import bench_gateway, format_gateway_bench

    return _print(bench_gateway(args.triton_url, args.repeats), args.json, format_gateway_bench)


def cmd_bench_adapt(args: argparse.Namespace) -> int:
    from cspine.bench.end_to_end import bench_adapt, format_adapt_bench

    return _print(bench_adapt(args.triton_url, args.repeats), args.json, format_adapt_bench)


def cmd_bench_dicomnet(args: argparse.Namespace) -> int:
    from cspine.bench.dicomnet import bench_dicomnet, format_bench

    return _print(bench_dicomnet(args.triton_url, args.repeats), args.json, format_bench)


def _add_triton_bench(
    bench: argparse._SubParsersAction, name: str, help: str, repeats: str, func: Callable[[argparse.Namespace], int]
) -> argparse.ArgumentParser:
    """A benchmark that runs the pipeline on a Triton (the local one unless --triton-url): its flags."""
    b = bench.add_parser(name, help=help)
    b.add_argument("--triton-url", default=None, help="an external Triton (default: start the local one)")
    b.add_argument("--repeats", type=int, default=5, help=f"{repeats} (default 5)")
    b.set_defaults(func=func)
    return b


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser("bench", help="benchmarks that print figures")
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
    b = _add_triton_bench(
        bench,
        "pipeline",
        "one SYNTHETIC CT + MR + radiograph study end to end on the local Triton, time per stage",
        "timed analyses after one warm-up",
        cmd_bench_pipeline,
    )
    b.add_argument(
        "--matrix",
        default="phantom",
        choices=["phantom", "real"],
        help="real: the radiograph alone, the CT alone and the whole study at real matrix sizes (3072 × 2614 "
        "radiograph, 512² × 305-slice CT, 512² MR) beside the same case at the phantom's, against the budgets",
    )
    b.add_argument("--json", action="store_true")
    b = _add_triton_bench(
        bench,
        "gateway",
        "the same SYNTHETIC study through gRPC and the gateway vs the pipeline in-process, side by side",
        "alternating timed runs of each",
        cmd_bench_gateway,
    )
    b.add_argument("--json", action="store_true")
    b = _add_triton_bench(
        bench,
        "adapt",
        "a new support case in use (AddCase → next analysis) vs fine-tuning the baseline on the same cases",
        "timed store writes and fine-tunings",
        cmd_bench_adapt,
    )
    b.add_argument("--json", action="store_true")
    b = _add_triton_bench(
        bench,
        "dicomnet",
        "the DICOM node: instances/s over C-STORE and STOW-RS beside dcmtk to dcmtk, and Orthanc → SEG + SR "
        "back in Orthanc, end to end (needs orthanc, orthanc-dicomweb, dcmtk: make sysdeps)",
        "interleaved receiving rounds",
        cmd_bench_dicomnet,
    )
    b.add_argument("--json", action="store_true")
