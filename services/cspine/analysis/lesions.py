"""Lesion masks: connected components, and the small specks a segmentation leaves that are not lesions."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_LESION_MM3 = 50.0  # smaller components are noise, not lesions (a 4.6 mm sphere)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (full connectivity) of a 2D or 3D mask."""
    return ndimage.label(mask, structure=np.ones((3,) * mask.ndim))


def remove_small_lesions(mask: np.ndarray, voxel_mm3: float, min_mm3: float = MIN_LESION_MM3) -> np.ndarray:
    """The mask without components smaller than ``min_mm3`` (for a 2D radiograph, pass mm² per pixel and
    an area)."""
    if not mask.any():
        return mask
    labels, count = components(mask)
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1)) * voxel_mm3
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = sizes >= min_mm3
    return keep[labels]


MIN_LESION_MM2 = 20.0  # on a radiograph (a projection), by area


def clean_tumor_labels(
    labels: np.ndarray, tumor: int, spacing_mm: tuple[float, float, float], projection: bool
) -> np.ndarray:
    """Label map [K, R, C] with tumor specks below the minimum lesion size set to background."""
    mask = labels == tumor
    if projection:
        kept = remove_small_lesions(mask[0], spacing_mm[1] * spacing_mm[2], MIN_LESION_MM2)[None]
    else:
        kept = remove_small_lesions(mask, float(np.prod(spacing_mm)), MIN_LESION_MM3)
    out = labels.copy()
    out[mask & ~kept] = 0
    return out
