"""Segmentation inputs: a volume's slices resampled in-plane to the model's grid, normalised, with
neighbouring slices as channels (2.5D); and the model's label maps mapped back.

The model grid keeps the source's directions and slices (thin slices averaged in slabs, see
``SegGeometry.slab_mm``); only the in-plane spacing and extent change (a square of ``size`` pixels at
``spacing_mm`` around a centre). It is itself a ``Volume`` geometry, bounded in size whatever the source
matrix, on which the pipeline makes its measurements; labels go back to the source grid by nearest
neighbour only where the source grid is needed (DICOM SEG, overlays): ``SourceLabelMaps``.
A source much finer than the model grid (a 0.1 mm radiograph, a 0.35 mm CT) is averaged in blocks of
whole pixels before the interpolation, so every source pixel counts instead of the four nearest of some
fifty being read with all their noise.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cspine.domain import Modality, SeriesRole, Volume
from cspine.imaging.normalize import normalise
from cspine.inference.specs import SEG_GEOMETRY

# Values outside the source image: air in CT, no signal in MR; radiographs repeat their border.
_FILL = {Modality.CT: -1000.0, Modality.MR: 0.0, Modality.XR: None}
_BODY_HU = -400.0


@dataclass(frozen=True)
class SegGrid:
    """The model grid of one source volume: model pixel (i', j') lies at source pixel
    (row0 + i' * step_rows, col0 + j' * step_cols); model slice m is the mean of source slices
    m·slab … m·slab + slab − 1 (the source slice itself when ``slab`` is 1)."""

    source_shape: tuple[int, int, int]
    size: int
    spacing_mm: float
    row0: float
    col0: float
    step_rows: float
    step_cols: float
    slab: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (-(-self.source_shape[0] // self.slab), self.size, self.size)

    def slab_starts(self) -> np.ndarray:
        return np.arange(0, self.source_shape[0], self.slab)

    def volume(self, source: Volume, voxels: np.ndarray) -> Volume:
        """``voxels`` [slices, size, size] on this grid as a Volume in the source's patient space."""
        origin = source.origin + self.row0 * source.pixel_spacing[0] * source.column_direction
        origin = origin + self.col0 * source.pixel_spacing[1] * source.row_direction
        offsets, thickness = source.slice_offsets, source.slice_thickness
        if self.slab > 1:  # a slab lies at the mean position of its slices
            counts = np.diff(np.append(self.slab_starts(), self.source_shape[0]))
            offsets = np.add.reduceat(np.asarray(offsets, dtype=float), self.slab_starts()) / counts
            origin = origin + offsets[0] * source.slice_direction
            offsets = offsets - offsets[0]
            thickness = max(thickness or 0.0, self.slab * source.slice_spacing)
        return Volume(
            voxels=voxels,
            origin=origin,
            row_direction=source.row_direction,
            column_direction=source.column_direction,
            pixel_spacing=(self.spacing_mm, self.spacing_mm),
            slice_offsets=offsets,
            slice_thickness=thickness,
            projection=source.projection,
        )


def crop_centre(modality: Modality, volume: Volume) -> tuple[float, float]:
    """(row, column) of the source the model grid is centred on: the body's centroid for CT (the
    field of view may be off-centre), the image centre otherwise."""
    _, rows, cols = volume.shape
    if modality is Modality.CT:
        step = max(1, volume.shape[0] // 16)
        body = volume.voxels[::step] > _BODY_HU
        if body.any():
            _, r, c = np.nonzero(body)
            return float(r.mean()), float(c.mean())
    return (rows - 1) / 2.0, (cols - 1) / 2.0


def slab_of(modality: Modality, volume: Volume) -> int:
    """Source slices per model slice: as many as fit in ``SegGeometry.slab_mm`` (1 without one)."""
    g = SEG_GEOMETRY[modality]
    if g.slab_mm is None or volume.projection or volume.shape[0] <= 1 or volume.slice_spacing <= 0:
        return 1
    return int(np.clip(np.floor(g.slab_mm / volume.slice_spacing + 1e-6), 1, volume.shape[0]))


def seg_grid(modality: Modality, volume: Volume) -> SegGrid:
    g = SEG_GEOMETRY[modality]
    centre_r, centre_c = crop_centre(modality, volume)
    step_r = g.spacing_mm / volume.pixel_spacing[0]
    step_c = g.spacing_mm / volume.pixel_spacing[1]
    half = (g.size - 1) / 2.0
    slab = slab_of(modality, volume)
    return SegGrid(
        volume.shape, g.size, g.spacing_mm, centre_r - half * step_r, centre_c - half * step_c, step_r, step_c, slab
    )


def _slabs(voxels: np.ndarray, grid: SegGrid, order: int) -> np.ndarray:
    """Source slices [K, R, C] → one per slab: their mean (images) or the middle one (labels, order 0)."""
    if grid.slab == 1:
        return voxels
    starts = grid.slab_starts()
    if order == 0:
        counts = np.diff(np.append(starts, voxels.shape[0]))
        return voxels[starts + (counts - 1) // 2]
    full, n = voxels.shape[0] // grid.slab, grid.slab
    # whole slabs as one reshape-sum (np.add.reduceat along the slice axis is several times slower)
    out = voxels[: full * n].reshape(full, n, *voxels.shape[1:]).sum(axis=1, dtype=np.float32) / np.float32(n)
    if full < len(starts):
        out = np.concatenate([out, voxels[full * n :].mean(axis=0, dtype=np.float32)[None]])
    return out


def _reach(start: float, step: float, size: int, count: int) -> slice:
    """The source pixels within two of the model grid's extent along one axis (all when it covers none)."""
    lo = int(np.floor(min(start, start + (size - 1) * step))) - 2
    hi = int(np.ceil(max(start, start + (size - 1) * step))) + 3
    lo, hi = max(lo, 0), min(hi, count)
    return slice(lo, hi) if lo < hi else slice(0, count)


def _block_means(voxels: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """[K, R, C] → means of blocks of rows × cols pixels (edge pixels repeated to fill the last block)."""
    k, r, c = voxels.shape
    padded = np.pad(voxels, ((0, 0), (0, -r % rows), (0, -c % cols)), mode="edge")
    shape = (k, padded.shape[1] // rows, rows, padded.shape[2] // cols, cols)
    return padded.reshape(shape).mean(axis=(2, 4), dtype=np.float32)


def to_grid(voxels: np.ndarray, grid: SegGrid, order: int, fill: float | None) -> np.ndarray:
    """Resample [K, R, C] source voxels onto the model grid: [slices, size, size]. Images (order ≥ 1) of a
    source at least twice as fine as the grid are first averaged in blocks of whole source pixels."""
    mode, cval = ("nearest", 0.0) if fill is None else ("constant", fill)
    # only the source pixels the model grid reaches (a view), with a margin for the interpolation
    rows = _reach(grid.row0, grid.step_rows, grid.size, voxels.shape[1])
    cols = _reach(grid.col0, grid.step_cols, grid.size, voxels.shape[2])
    voxels = _slabs(voxels[:, rows, cols], grid, order)
    row0, col0 = grid.row0 - rows.start, grid.col0 - cols.start
    step_rows, step_cols = grid.step_rows, grid.step_cols
    block_r = int(step_rows) if order > 0 and step_rows >= 2.0 else 1
    block_c = int(step_cols) if order > 0 and step_cols >= 2.0 else 1
    if block_r > 1 or block_c > 1:
        voxels = _block_means(voxels, block_r, block_c)  # block b's mean lies at source pixel b·n + (n − 1)/2
        row0, step_rows = (row0 - (block_r - 1) / 2.0) / block_r, step_rows / block_r
        col0, step_cols = (col0 - (block_c - 1) / 2.0) / block_c, step_cols / block_c
    out = ndimage.affine_transform(
        voxels,
        matrix=np.array([1.0, step_rows, step_cols]),
        offset=np.array([0.0, row0, col0]),
        output_shape=(voxels.shape[0], grid.size, grid.size),
        order=order,
        mode=mode,
        cval=cval,
        prefilter=False,
    )
    return out


def _nearest(count: int, start: float, step: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``count`` source pixels, the nearest model pixel and whether it lies on the model grid."""
    index = np.floor((np.arange(count) - start) / step + 0.5).astype(np.intp)
    inside = (index >= 0) & (index < size)
    return np.clip(index, 0, size - 1), inside


def to_source(labels: np.ndarray, grid: SegGrid) -> np.ndarray:
    """Model-grid labels [slices, size, size] back on the source grid [K, R, C] (nearest; 0 outside): a
    gather, a fraction of a second for a 512² × 300 CT."""
    k, r, c = grid.source_shape
    rows, rows_in = _nearest(r, grid.row0, grid.step_rows, grid.size)
    cols, cols_in = _nearest(c, grid.col0, grid.step_cols, grid.size)
    out = labels[np.arange(k) // grid.slab].take(rows, axis=1).take(cols, axis=2)
    out[:, ~rows_in] = 0
    out[:, :, ~cols_in] = 0
    return out


class SourceLabelMaps(MutableMapping[SeriesRole, np.ndarray]):
    """Label maps per series role on each source grid, made from the model-grid labels the first time one
    is read (DICOM SEG, overlays) and kept; an analysis that returns no SEG never allocates them."""

    def __init__(self, grid_labels: dict[SeriesRole, tuple[np.ndarray, SegGrid]]) -> None:
        self._grid_labels = dict(grid_labels)
        self._made: dict[SeriesRole, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getitem__(self, role: SeriesRole) -> np.ndarray:
        with self._lock:
            if role not in self._made:
                labels, grid = self._grid_labels[role]  # KeyError for a role without labels
                self._made[role] = to_source(labels, grid)
            return self._made[role]

    def __setitem__(self, role: SeriesRole, labels: np.ndarray) -> None:
        with self._lock:
            self._grid_labels.pop(role, None)
            self._made[role] = labels

    def __delitem__(self, role: SeriesRole) -> None:
        with self._lock:
            if role not in self._made and role not in self._grid_labels:
                raise KeyError(role)
            self._made.pop(role, None)
            self._grid_labels.pop(role, None)

    def __iter__(self) -> Iterator[SeriesRole]:
        return iter([*self._made, *(r for r in self._grid_labels if r not in self._made)])

    def __len__(self) -> int:
        return len(set(self._made) | set(self._grid_labels))


def stack_context(normalised: np.ndarray, context: int) -> np.ndarray:
    """[K, H, W] → [K, 2·context + 1, H, W]: each slice with its neighbours (edges repeated)."""
    if context == 0:
        return normalised[:, None]
    k = normalised.shape[0]
    index = np.clip(np.arange(k)[:, None] + np.arange(-context, context + 1)[None, :], 0, k - 1)
    return normalised[index]


def seg_inputs(modality: Modality, volume: Volume) -> tuple[np.ndarray, SegGrid]:
    """Model inputs [K, C, size, size] float32 for every slice of ``volume``, and the grid they lie on."""
    grid = seg_grid(modality, volume)
    resampled = to_grid(volume.voxels, grid, order=1, fill=_FILL[modality])
    normalised = normalise(modality, resampled)
    return np.ascontiguousarray(stack_context(normalised, SEG_GEOMETRY[modality].context), dtype=np.float32), grid
