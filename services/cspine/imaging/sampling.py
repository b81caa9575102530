"""Sampling a volume at patient coordinates: the inverse of ``Volume.index_to_patient``."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cspine.domain import Volume


def patient_to_index(volume: Volume, points: np.ndarray) -> np.ndarray:
    """Fractional (k, i, j) indices (..., 3) of patient points (..., 3), honouring real slice offsets."""
    d = np.asarray(points, dtype=float) - volume.origin
    i = d @ volume.column_direction / volume.pixel_spacing[0]
    j = d @ volume.row_direction / volume.pixel_spacing[1]
    offsets = volume.slice_offsets
    s = d @ volume.slice_direction
    if len(offsets) == 1:
        k = np.zeros_like(s)
    else:  # linear inside, extrapolated at the median spacing outside
        k = np.interp(s, offsets, np.arange(len(offsets), dtype=float))
        step = volume.slice_spacing
        k = np.where(s < offsets[0], (s - offsets[0]) / step, k)
        k = np.where(s > offsets[-1], len(offsets) - 1 + (s - offsets[-1]) / step, k)
    return np.stack([k, i, j], axis=-1)


def sample(volume: Volume, points: np.ndarray, order: int = 1, cval: float = 0.0, mode: str = "constant") -> np.ndarray:
    """Values of ``volume`` at patient points (..., 3), interpolated (order 1) or nearest (order 0)."""
    kij = patient_to_index(volume, points)
    flat = kij.reshape(-1, 3).T
    values = ndimage.map_coordinates(volume.voxels, flat, order=order, mode=mode, cval=cval, prefilter=False)
    return values.reshape(kij.shape[:-1])
