"""Binary masks: connected components, and the masks of one label map as float volumes made once per set
of labels and reused (measurements sample them with linear interpolation, thresholded at one half)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
from scipy import ndimage

from cspine.domain import Volume


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (full connectivity) of a 2D or 3D mask, labelled within the mask's bounding box
    only (a lesion is a small part of a volume)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    if not mask.any():
        return labels, 0
    box = tuple(slice(int(np.flatnonzero(a)[0]), int(np.flatnonzero(a)[-1]) + 1) for a in _projections(mask))
    labels[box], count = ndimage.label(mask[box], structure=np.ones((3,) * mask.ndim))
    return labels, count


def component_voxels(labels: np.ndarray) -> Iterator[np.ndarray]:
    """The voxel indices (N, ndim) of each component of a label array from ``components``, in label order."""
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is not None:
            yield np.argwhere(labels[box] == index) + np.array([s.start for s in box])


def _projections(mask: np.ndarray) -> list[np.ndarray]:
    """Per axis, whether any voxel of each index is set."""
    axes = range(mask.ndim)
    return [mask.any(axis=tuple(a for a in axes if a != axis)) for axis in axes]


def component_sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Voxels in each component 1 … count (a bincount: ndimage.sum_labels is ten times slower on volumes)."""
    return np.bincount(labels.ravel(), minlength=count + 1)[1 : count + 1]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a 2D or 3D mask (empty when the mask is)."""
    if not mask.any():
        return mask
    labels, count = components(mask)
    return labels == 1 + int(np.argmax(component_sizes(labels, count)))


class LabelMasks:
    def __init__(self, labels: np.ndarray, volume: Volume) -> None:
        self.labels = labels
        self.volume = volume
        self._made: dict[tuple[int, ...], Volume] = {}

    def of(self, values: tuple[int, ...]) -> Volume:
        """Where the label map holds one of ``values``: 1.0, else 0.0, on the label map's geometry."""
        key = tuple(sorted(values))
        if key not in self._made:
            mask = np.isin(self.labels, key).astype(np.float32)
            self._made[key] = dataclasses.replace(self.volume, voxels=mask)
        return self._made[key]
