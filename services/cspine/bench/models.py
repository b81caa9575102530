"""CPU latency of the exported models in ONNX Runtime (2 threads), at the batch sizes a study brings."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cspine.inference.runner import onnx_session
from cspine.inference.specs import MODELS
from cspine.modeling.export import model_path

# Typical batches: the slices of one series, the lesions of one study, one prototype set.
BATCH = {"seg_ct": 16, "seg_mr": 13, "seg_xr": 1, "lesion_embed": 6, "proto_classify": 6}
PROTOTYPES = 3


def _feeds(name: str, rng: np.random.Generator) -> dict[str, np.ndarray]:
    spec = MODELS[name]
    feeds = {}
    for t in spec.inputs:
        if spec.max_batch_size > 0:
            shape = (BATCH[name], *t.shape)
        else:
            shape = (BATCH[name] if t.name == "embedding" else PROTOTYPES, *t.shape[1:])
        feeds[t.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def bench_models(repository: Path, repeats: int = 20) -> dict[str, dict]:
    """Median latency per call (ms) and per batch item, and the file size, for each model."""
    rng = np.random.default_rng(0)
    out = {}
    for name in MODELS:
        path = model_path(repository, name)
        session = onnx_session(path)
        feeds = _feeds(name, rng)
        session.run(None, feeds)  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, feeds)
            times.append(time.perf_counter() - start)
        median = float(np.median(times)) * 1000
        out[name] = {
            "batch": BATCH[name],
            "ms_per_call": round(median, 2),
            "ms_per_item": round(median / BATCH[name], 2),
            "size_mb": round(path.stat().st_size / 1e6, 2),
        }
    return out


def format_bench(result: dict[str, dict]) -> str:
    lines = ["ONNX Runtime on this CPU (2 threads), median of repeated calls:"]
    for name, r in result.items():
        lines.append(
            f"  {name:15s} batch {r['batch']:3d}: {r['ms_per_call']:8.2f} ms/call, {r['ms_per_item']:7.2f} ms/item, "
            f"{r['size_mb']:.2f} MB"
        )
    return "\n".join(lines)
