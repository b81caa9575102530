"""Ingest benchmark: slices per second of ``ingest_paths`` against bare ``pydicom.dcmread(f).pixel_array``.

Both read the same files from disk (warm page cache: every file is read once before timing), in the same
process, interleaved — bare, ingest, ingest, bare, … — because a shared machine is noisy; each side reports
its best run. Ingest does more (geometry, rescale to float32, one volume), so a ratio near 1 means the
bookkeeping is nearly free.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom

from cspine.dicom.ingest import ingest_paths

logger = logging.getLogger(__name__)

__all__ = ["bench_ingest", "format_bench"]


def _bare(files: list[Path]) -> int:
    frames = 0
    for path in files:
        pixels = pydicom.dcmread(path).pixel_array
        frames += pixels.shape[0] if pixels.ndim == 3 else 1
    return frames


def _ingest(files: list[Path]) -> int:
    study = ingest_paths(files)
    return sum(s.volume.shape[0] for s in study.series if s.volume is not None)


def _timed(run: Callable[[list[Path]], int], files: list[Path]) -> tuple[float, int]:
    gc.collect()
    start = time.perf_counter()
    slices = run(files)
    return time.perf_counter() - start, slices


def bench_ingest(files: list[Path], repeats: int = 3) -> dict[str, Any]:
    """Time both readers ``repeats`` times each, alternating which goes first; report the best of each.

    Returns ``files``, ``slices`` (frames bare pydicom decoded), ``ingest_slices`` (slices in ingest's
    volumes — fewer when files are duplicates or not analysed), ``repeats``, ``bare_seconds``,
    ``ingest_seconds`` (best runs), ``bare_slices_per_s``, ``ingest_slices_per_s`` and ``ratio``
    (ingest / bare; the goal is ≥ 0.8).
    """
    files = [Path(f) for f in files]
    if not files:
        raise ValueError("bench_ingest needs at least one file")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for path in files:  # warm the page cache so that neither side pays for the disk
        path.read_bytes()
    bare_times: list[float] = []
    ingest_times: list[float] = []
    slices = ingest_slices = 0
    for repeat in range(repeats):
        order = ((_bare, bare_times), (_ingest, ingest_times))
        for run, times in order if repeat % 2 == 0 else reversed(order):
            seconds, count = _timed(run, files)
            times.append(seconds)
            if run is _bare:
                slices = count
            else:
                ingest_slices = count
        logger.debug("bench repeat %d: bare %.3f s, ingest %.3f s", repeat, bare_times[-1], ingest_times[-1])
    bare_best, ingest_best = min(bare_times), min(ingest_times)
    bare_rate = slices / bare_best
    ingest_rate = ingest_slices / ingest_best
    return {
        "files": len(files),
        "slices": slices,
        "ingest_slices": ingest_slices,
        "repeats": repeats,
        "bare_seconds": bare_best,
        "ingest_seconds": ingest_best,
        "bare_slices_per_s": bare_rate,
        "ingest_slices_per_s": ingest_rate,
        "ratio": ingest_rate / bare_rate if bare_rate else 0.0,
    }


def format_bench(result: dict[str, Any]) -> str:
    """A few human-readable lines."""
    return "\n".join(
        [
            f"ingest benchmark: {result['files']} files, {result['slices']} slices, "
            f"best of {result['repeats']} interleaved runs",
            f"  bare pydicom dcmread().pixel_array  {result['bare_slices_per_s']:9.1f} slices/s"
            f"  ({result['bare_seconds']:.3f} s)",
            f"  cspine ingest_paths (whole study)   {result['ingest_slices_per_s']:9.1f} slices/s"
            f"  ({result['ingest_seconds']:.3f} s)",
            f"  ratio ingest / bare                 {result['ratio']:9.2f}  (goal ≥ 0.80)",
        ]
    )
