"""Intensity normalisation per modality: CT by a fixed HU window, MR and radiographs by percentiles
(their units are arbitrary), so the models see comparable values whatever the scanner stored."""

from __future__ import annotations

import numpy as np

from cspine.domain import Modality

CT_WINDOW_HU = (-1000.0, 2000.0)


def ct_normalise(hu: np.ndarray) -> np.ndarray:
    """HU clipped to [-1000, 2000], divided by 1000: air −1, water 0, dense bone up to 2."""
    lo, hi = CT_WINDOW_HU
    return (np.clip(hu, lo, hi) / 1000.0).astype(np.float32)


def mr_normalise(signal: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Signal over the 99th percentile of ``reference`` (default: itself), clipped to [0, 2]."""
    ref = signal if reference is None else reference
    scale = float(np.percentile(ref, 99.0)) if ref.size else 0.0
    if scale <= 0:
        return np.zeros_like(signal, dtype=np.float32)
    return np.clip(signal / scale, 0.0, 2.0).astype(np.float32)


def xr_normalise(image: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    """Radiograph values mapped so the 1st and 99th percentiles of ``reference`` become 0 and 1."""
    ref = image if reference is None else reference
    lo, hi = np.percentile(ref, [1.0, 99.0]) if ref.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros_like(image, dtype=np.float32)
    return np.clip((image - lo) / (hi - lo), -0.5, 1.5).astype(np.float32)


def normalise(modality: Modality, values: np.ndarray, reference: np.ndarray | None = None) -> np.ndarray:
    return _NORMALISERS[modality](values, reference)


_NORMALISERS = {
    Modality.CT: lambda values, reference: ct_normalise(values),
    Modality.MR: mr_normalise,
    Modality.XR: xr_normalise,
}
