"""Binary masks: connected components, the masks of one label map as float volumes made once per set
of labels and reused (measurements sample them with linear interpolation, thresholded at one half), and
the points filling a 2D mask at a fixed pitch whatever its pixel size."""

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


POINT_STEP_MM = 0.25  # the pitch of mask_points: half the 0.5 mm strips the Cobb angle's edge lines use


def mask_points(mask: np.ndarray, volume: Volume, k: int, step_mm: float = POINT_STEP_MM) -> np.ndarray:
    """Patient points (N, 3) filling a 2D mask of slice ``k`` of ``volume``'s grid at ``step_mm``, the mask
    interpolated linearly and thresholded at one half (as the canal and disc lines are sampled): an outline
    fitted with lines comes out the same on a 1 mm model grid as on a 0.5 mm source grid, without the
    staircase of whole pixels."""
    if not mask.any():
        return np.empty((0, 3))
    rc = np.argwhere(mask)
    lo, hi = rc.min(axis=0), rc.max(axis=0) + 1
    box = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1]].astype(np.float32), 1)  # 0 one pixel beyond the box
    rows = np.arange(0.0, box.shape[0] - 1 + 1e-9, step_mm / volume.pixel_spacing[0])
    cols = np.arange(0.0, box.shape[1] - 1 + 1e-9, step_mm / volume.pixel_spacing[1])
    values = ndimage.map_coordinates(box, np.meshgrid(rows, cols, indexing="ij"), order=1, prefilter=False)
    r, c = np.nonzero(values >= 0.5)
    kij = np.column_stack([np.full(len(r), float(k)), lo[0] - 1 + rows[r], lo[1] - 1 + cols[c]])
    return volume.index_to_patient(kij)


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
