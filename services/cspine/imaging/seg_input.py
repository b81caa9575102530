"""Segmentation inputs: a volume's slices resampled in-plane to the model's grid, normalised, with
neighbouring slices as channels (2.5D); and the model's label maps mapped back.

The model grid keeps the source's slices and directions; only the in-plane spacing and extent change
(a square of ``size`` pixels at ``spacing_mm`` around a centre), so it is itself a ``Volume`` geometry on
which measurements can be made, and labels go back to the source grid by nearest neighbour.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cspine.domain import Modality, Volume
from cspine.imaging.normalize import normalise
from cspine.inference.specs import SEG_GEOMETRY

# Values outside the source image: air in CT, no signal in MR; radiographs repeat their border.
_FILL = {Modality.CT: -1000.0, Modality.MR: 0.0, Modality.XR: None}
_BODY_HU = -400.0


@dataclass(frozen=True)
class SegGrid:
    """The model grid of one source volume: model pixel (i', j') lies at source pixel
    (row0 + i' * step_rows, col0 + j' * step_cols) of the same slice."""

    source_shape: tuple[int, int, int]
    size: int
    spacing_mm: float
    row0: float
    col0: float
    step_rows: float
    step_cols: float

    def volume(self, source: Volume, voxels: np.ndarray) -> Volume:
        """``voxels`` [K, size, size] on this grid as a Volume in the source's patient space."""
        origin = source.origin + self.row0 * source.pixel_spacing[0] * source.column_direction
        origin = origin + self.col0 * source.pixel_spacing[1] * source.row_direction
        return Volume(
            voxels=voxels,
            origin=origin,
            row_direction=source.row_direction,
            column_direction=source.column_direction,
            pixel_spacing=(self.spacing_mm, self.spacing_mm),
            slice_offsets=source.slice_offsets,
            slice_thickness=source.slice_thickness,
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


def seg_grid(modality: Modality, volume: Volume) -> SegGrid:
    g = SEG_GEOMETRY[modality]
    centre_r, centre_c = crop_centre(modality, volume)
    step_r = g.spacing_mm / volume.pixel_spacing[0]
    step_c = g.spacing_mm / volume.pixel_spacing[1]
    half = (g.size - 1) / 2.0
    return SegGrid(
        volume.shape, g.size, g.spacing_mm, centre_r - half * step_r, centre_c - half * step_c, step_r, step_c
    )


def to_grid(voxels: np.ndarray, grid: SegGrid, order: int, fill: float | None) -> np.ndarray:
    """Resample [K, R, C] source voxels onto the model grid: [K, size, size]."""
    mode, cval = ("nearest", 0.0) if fill is None else ("constant", fill)
    out = ndimage.affine_transform(
        voxels,
        matrix=np.array([1.0, grid.step_rows, grid.step_cols]),
        offset=np.array([0.0, grid.row0, grid.col0]),
        output_shape=(voxels.shape[0], grid.size, grid.size),
        order=order,
        mode=mode,
        cval=cval,
        prefilter=False,
    )
    return out


def to_source(labels: np.ndarray, grid: SegGrid) -> np.ndarray:
    """Model-grid labels [K, size, size] back on the source grid [K, R, C] (nearest; 0 outside)."""
    return ndimage.affine_transform(
        labels,
        matrix=np.array([1.0, 1.0 / grid.step_rows, 1.0 / grid.step_cols]),
        offset=np.array([0.0, -grid.row0 / grid.step_rows, -grid.col0 / grid.step_cols]),
        output_shape=grid.source_shape,
        order=0,
        mode="constant",
        cval=0,
        prefilter=False,
    )


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
