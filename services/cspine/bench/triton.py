"""``cspine bench triton``: figures for the CPU Triton repository, measured side by side in one run.

- Dynamic batching on vs off: the same repository served twice (the second time with every
  ``dynamic_batching`` block removed); per model, single-item requests from 1 and from 8 concurrent callers
  for a fixed time; throughput (items/s) and p50/p99 latency.
- Triton over gRPC vs in-process ONNX Runtime with the same thread count, on the same inputs (one study's
  typical batch), alternating calls; the overhead ratio of medians.
- System shared memory for the largest tensor (a CT batch) vs sending it in the gRPC message.
- The ``lesion_classify`` ensemble vs ``lesion_embed`` then ``proto_classify`` as two calls.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cspine.bench.models import BATCH, PROTOTYPES
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts
from cspine.inference.model_config import config_path, load_config
from cspine.inference.runner import OnnxRunner
from cspine.inference.specs import EMBEDDING_TENSOR, IMAGE_TENSOR, MODELS, PROTOTYPES_TENSOR, ModelSpec

CONCURRENCY = (1, 8)
_BATCHING = re.compile(r"^dynamic_batching \{.*?^\}\n", re.MULTILINE | re.DOTALL)
_DELAY = re.compile(r"max_queue_delay_microseconds: \d+")


def inputs_for(spec: ModelSpec, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    out = {}
    for t in spec.inputs:
        if spec.max_batch_size > 0:
            shape = (batch, *t.shape)
        else:
            shape = (PROTOTYPES if t.name == PROTOTYPES_TENSOR else batch, *t.shape[1:])
        out[t.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def variant(repository: Path, into: Path, queue_delay_us: int | None) -> Path:
    """A copy of ``repository`` whose CPU configs have no ``dynamic_batching`` block (``None``) or the given
    maximum queue delay."""
    shutil.copytree(repository, into, symlinks=True)
    for config in into.glob("*/config.pbtxt"):
        text = config.read_text()
        if queue_delay_us is None:
            text = _BATCHING.sub("", text)
        else:
            text = _DELAY.sub(f"max_queue_delay_microseconds: {queue_delay_us}", text)
        config.write_text(text)
    return into


def _summary(latencies: list[float], items: int, seconds: float) -> dict:
    ms = np.array(latencies) * 1000
    return {
        "items_per_s": round(items / seconds, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "requests": len(latencies),
    }


async def _load(client: TritonClient, name: str, concurrency: int, seconds: float) -> dict:
    spec = MODELS[name]
    request = inputs_for(spec, 1, np.random.default_rng(0))
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            start = time.perf_counter()
            await client.infer(spec, request)
            latencies.append(time.perf_counter() - start)

    await client.infer(spec, request)  # warm-up
    began = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    return _summary(latencies, len(latencies), time.perf_counter() - began)


async def _batching_figures(url: str, seconds: float) -> dict:
    async with TritonClient(url) as client:
        await client.check_ready(tuple(MODELS))
        return {
            name: {str(c): await _load(client, name, c, seconds) for c in CONCURRENCY}
            for name in MODELS
            if MODELS[name].max_batch_size > 0
        }


async def _overhead(url: str, repository: Path, repeats: int, ort_threads: int | None) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    async with TritonClient(url) as client:
        for name, spec in MODELS.items():
            config = load_config(config_path(repository, name))
            threads = ort_threads or int(config.parameters["ort_threads"].string_value)
            runner = OnnxRunner(spec, repository / name / "1" / "model.onnx", threads)
            feeds = inputs_for(spec, BATCH[name], rng)
            runner.run(feeds)
            await client.infer(spec, feeds)
            local, remote = [], []
            for _ in range(repeats):  # alternate, so drift in machine load hits both alike
                start = time.perf_counter()
                runner.run(feeds)
                local.append(time.perf_counter() - start)
                start = time.perf_counter()
                await client.infer(spec, feeds)
                remote.append(time.perf_counter() - start)
            ort_ms, triton_ms = np.median(local) * 1000, np.median(remote) * 1000
            out[name] = {
                "batch": BATCH[name],
                "ort_threads": threads,
                "ort_ms": round(float(ort_ms), 2),
                "triton_ms": round(float(triton_ms), 2),
                "ratio": round(float(triton_ms / ort_ms), 2),
            }
    return out


def _shared_memory(url: str, repeats: int) -> dict:
    """seg_ct, one series' batch: the input sent in the gRPC message vs placed in system shared memory."""
    import tritonclient.grpc as grpcclient
    import tritonclient.utils.shared_memory as shm

    spec = MODELS["seg_ct"]
    image = inputs_for(spec, BATCH["seg_ct"], np.random.default_rng(2))[IMAGE_TENSOR]
    client = grpcclient.InferenceServerClient(url)
    region = f"cspine-bench-{id(image)}"
    handle = shm.create_shared_memory_region(region, f"/{region}", image.nbytes)
    try:
        client.register_system_shared_memory(region, f"/{region}", image.nbytes)

        def in_message() -> None:
            tensor = grpcclient.InferInput(IMAGE_TENSOR, list(image.shape), "FP32")
            tensor.set_data_from_numpy(image)
            client.infer("seg_ct", [tensor])

        def in_shm() -> None:
            shm.set_shared_memory_region(handle, [image])
            tensor = grpcclient.InferInput(IMAGE_TENSOR, list(image.shape), "FP32")
            tensor.set_shared_memory(region, image.nbytes)
            client.infer("seg_ct", [tensor])

        times: dict[str, list[float]] = {"message": [], "shared_memory": []}
        in_message()  # warm both paths
        in_shm()
        for _ in range(repeats):
            for key, call in (("message", in_message), ("shared_memory", in_shm)):
                start = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - start)
        client.unregister_system_shared_memory(region)
    finally:
        shm.destroy_shared_memory_region(handle)
    medians = {k: float(np.median(v) * 1000) for k, v in times.items()}
    return {
        "model": "seg_ct",
        "batch": BATCH["seg_ct"],
        "megabytes": round(image.nbytes / 1e6, 1),
        "message_ms": round(medians["message"], 2),
        "shared_memory_ms": round(medians["shared_memory"], 2),
        "ratio": round(medians["shared_memory"] / medians["message"], 2),
    }


async def _ensemble(url: str, repeats: int) -> dict:
    rng = np.random.default_rng(3)
    lesions = BATCH["lesion_embed"]
    feeds = inputs_for(MODELS["lesion_embed"], lesions, rng)
    prototypes = rng.standard_normal((PROTOTYPES, 64)).astype(np.float32)
    async with TritonClient(url) as client:

        async def two_calls() -> None:
            embedding = (await client.infer("lesion_embed", feeds))[EMBEDDING_TENSOR]
            await client.infer("proto_classify", {EMBEDDING_TENSOR: embedding, PROTOTYPES_TENSOR: prototypes})

        async def ensemble() -> None:
            await client.infer("lesion_classify", {**feeds, PROTOTYPES_TENSOR: prototypes})

        times: dict[str, list[float]] = {"two_calls": [], "ensemble": []}
        await two_calls()
        await ensemble()
        for _ in range(repeats):
            for key, call in (("two_calls", two_calls), ("ensemble", ensemble)):
                start = time.perf_counter()
                await call()
                times[key].append(time.perf_counter() - start)
    medians = {k: float(np.median(v) * 1000) for k, v in times.items()}
    return {
        "lesions": lesions,
        "two_calls_ms": round(medians["two_calls"], 2),
        "ensemble_ms": round(medians["ensemble"], 2),
        "ratio": round(medians["ensemble"] / medians["two_calls"], 2),
    }


def bench_triton(
    repository: Path,
    seconds: float = 3.0,
    repeats: int = 30,
    ort_threads: int | None = None,
    queue_delays_us: tuple[int, ...] = (),
) -> dict:
    """All figures of the module docstring; ``queue_delays_us`` adds the batching figures of the repository
    served with each of these maximum queue delays instead of its own (how the shipped delay was chosen)."""
    repository = Path(repository).resolve()
    result: dict = {"seconds_per_cell": seconds, "repeats": repeats, "ort_threads": ort_threads}
    with LocalTriton(repository, TritonPorts.free(), ort_threads=ort_threads) as triton:
        on = asyncio.run(_batching_figures(triton.grpc_url, seconds))
        result["overhead"] = asyncio.run(_overhead(triton.grpc_url, repository, repeats, ort_threads))
        result["shared_memory"] = _shared_memory(triton.grpc_url, repeats)
        result["ensemble"] = asyncio.run(_ensemble(triton.grpc_url, repeats))
    with tempfile.TemporaryDirectory(prefix="cspine-bench-") as scratch:
        with LocalTriton(
            variant(repository, Path(scratch) / "off", None), TritonPorts.free(), ort_threads=ort_threads
        ) as t:
            off = asyncio.run(_batching_figures(t.grpc_url, seconds))
        by_delay = {}
        for delay in queue_delays_us:
            served = variant(repository, Path(scratch) / f"delay-{delay}", delay)
            with LocalTriton(served, TritonPorts.free(), ort_threads=ort_threads) as t:
                by_delay[str(delay)] = asyncio.run(_batching_figures(t.grpc_url, seconds))
    if by_delay:
        result["queue_delay_us"] = by_delay
    result["batching"] = {
        name: {
            c: {
                "on": on[name][c],
                "off": off[name][c],
                "gain": round(on[name][c]["items_per_s"] / off[name][c]["items_per_s"], 2),
            }
            for c in on[name]
        }
        for name in on
    }
    return result


def format_bench_triton(r: dict) -> str:
    lines = ["Dynamic batching, single-item requests (items/s, p50/p99 ms), on vs off:"]
    for name, by_c in r["batching"].items():
        for c, cell in by_c.items():
            on, off = cell["on"], cell["off"]
            lines.append(
                f"  {name:13s} concurrency {c:>2s}: on {on['items_per_s']:7.1f}/s"
                f" {on['p50_ms']:7.1f}/{on['p99_ms']:7.1f}  off {off['items_per_s']:7.1f}/s"
                f" {off['p50_ms']:7.1f}/{off['p99_ms']:7.1f}  gain {cell['gain']:.2f}x"
            )
    lines.append("Triton over gRPC vs in-process ONNX Runtime (same threads, same inputs, median ms):")
    for name, o in r["overhead"].items():
        lines.append(
            f"  {name:15s} batch {o['batch']:3d}: ORT {o['ort_ms']:8.2f}  Triton {o['triton_ms']:8.2f}"
            f"  ratio {o['ratio']:.2f}"
        )
    s = r["shared_memory"]
    lines.append(
        f"System shared memory, {s['model']} batch {s['batch']} ({s['megabytes']} MB):"
        f" in message {s['message_ms']:.2f} ms, shared memory {s['shared_memory_ms']:.2f} ms, ratio {s['ratio']:.2f}"
    )
    for delay, figures in r.get("queue_delay_us", {}).items():
        cells = ", ".join(
            f"{n} c{c} {v['items_per_s']:.0f}/s p99 {v['p99_ms']:.0f}"
            for n, by in figures.items()
            for c, v in by.items()
        )
        lines.append(f"max_queue_delay {delay} us: {cells}")
    e = r["ensemble"]
    lines.append(
        f"lesion_classify ensemble vs two calls ({e['lesions']} lesions): {e['ensemble_ms']:.2f} vs"
        f" {e['two_calls_ms']:.2f} ms, ratio {e['ratio']:.2f}"
    )
    return "\n".join(lines)
