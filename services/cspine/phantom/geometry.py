"""Sampling grids in patient space and the canvas that anatomy is painted on.

A :class:`Grid` is an axis-aligned lattice of points (the voxel centres of a CT, MR or radiograph
volume, or a fine reference lattice for ground truth). A :class:`Canvas` holds, for every point, the
tissue, the structure label and the vertebral level painted there; structures paint only inside their
bounding box, so a scene of thirty structures costs little more than the voxels they cover.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Grid:
    """Points ``origin + n0 * steps[0] + n1 * steps[1] + n2 * steps[2]`` for ``n < shape``.

    Each row of ``steps`` moves along exactly one patient axis (the grid is axis-aligned), which lets a
    bounding box be turned into index ranges without looking at every point.
    """

    origin: np.ndarray  # (3,) patient mm of index (0, 0, 0)
    steps: np.ndarray  # (3, 3): steps[a] is the patient displacement of one step along array axis a
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        nonzero = np.count_nonzero(np.abs(self.steps) > 1e-9, axis=1)
        if not np.all(nonzero == 1) or len({int(np.argmax(np.abs(s))) for s in self.steps}) != 3:
            raise ValueError("Grid steps must each move along a different patient axis")

    def index_ranges(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        """Index slices covering the patient box [lo, hi], or None when the box misses the grid."""
        out = []
        for axis in range(3):
            c = int(np.argmax(np.abs(self.steps[axis])))
            step = self.steps[axis, c]
            a = (lo[c] - self.origin[c]) / step
            b = (hi[c] - self.origin[c]) / step
            first = int(np.ceil(np.clip(min(a, b), 0, self.shape[axis])))
            last = int(np.floor(np.clip(max(a, b), -1, self.shape[axis] - 1)))
            if first > last:
                return None
            out.append(slice(first, last + 1))
        return tuple(out)  # type: ignore[return-value]

    def crop(self, lo: np.ndarray, hi: np.ndarray) -> Grid:
        """The part of this grid inside the patient box [lo, hi] (same spacing); the whole grid when the
        box misses it."""
        index = self.index_ranges(np.asarray(lo, dtype=float), np.asarray(hi, dtype=float))
        if index is None:
            return self
        starts = np.array([s.start for s in index], dtype=float)
        return Grid(self.origin + starts @ self.steps, self.steps, tuple(s.stop - s.start for s in index))

    def resample(self, values: np.ndarray, target: Grid, order: int, mode: str = "nearest") -> np.ndarray:
        """``values`` on this grid read at ``target``'s points (each array axis along the same patient axis
        on both grids): linear (order 1) or nearest (order 0); outside, the edge value (mode "nearest") or 0
        (mode "constant"). Axis by axis, as both grids are axis-aligned: a 512² × 300 volume takes a second."""
        out = values
        for axis in range(3):
            c = int(np.argmax(np.abs(self.steps[axis])))
            step = self.steps[axis, c]
            coords = (target.origin[c] - self.origin[c] + np.arange(target.shape[axis]) * target.steps[axis, c]) / step
            out = _resample_axis(out, axis, coords, order, mode == "constant")
        return out

    def points(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        """Patient coordinates (n0, n1, n2, 3), float32, of the points in ``index``."""
        sizes = tuple(s.stop - s.start for s in index)
        p = np.empty((*sizes, 3), dtype=np.float32)
        for axis, s in enumerate(index):
            c = int(np.argmax(np.abs(self.steps[axis])))  # the one patient coordinate this axis moves
            values = (self.origin[c] + np.arange(s.start, s.stop) * self.steps[axis, c]).astype(np.float32)
            shape = [1, 1, 1]
            shape[axis] = sizes[axis]
            p[..., c] = values.reshape(shape)
        return p


@dataclass(frozen=True)
class PointCloud:
    """Arbitrary points (n0, n1, n2, 3) painted like a grid: an oblique plane for a ground-truth area."""

    coords: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.coords.shape[:3])  # type: ignore[return-value]

    def index_ranges(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        inside = np.all((self.coords >= lo) & (self.coords <= hi), axis=-1)
        if not inside.any():
            return None
        found = np.nonzero(inside)
        return tuple(slice(int(f.min()), int(f.max()) + 1) for f in found)  # type: ignore[return-value]

    def points(self, index: tuple[slice, slice, slice]) -> np.ndarray:
        return self.coords[index].astype(np.float32)


# A shape function takes points (..., 3) and returns a bool mask (...) of the points inside it, or an
# int array of tissue codes with 0 meaning outside (for structures made of several tissues).
ShapeFn = Callable[[np.ndarray], np.ndarray]

_CHUNK_POINTS = 1_500_000


class Canvas:
    """Tissue, label and level arrays over a :class:`Grid`, painted structure by structure."""

    def __init__(self, grid: Grid | PointCloud) -> None:
        self.grid = grid
        self.tissue = np.zeros(grid.shape, dtype=np.uint8)
        self.label = np.zeros(grid.shape, dtype=np.uint8)
        self.level = np.zeros(grid.shape, dtype=np.uint8)

    def paint(
        self,
        lo: np.ndarray,
        hi: np.ndarray,
        shape: ShapeFn,
        tissue: int | None,
        label: int | None = None,
        level: int | ShapeFn | None = None,
        only_labels: tuple[int, ...] | None = None,
        only_tissues: tuple[int, ...] | None = None,
        keep_label: bool = False,
    ) -> None:
        """Paint ``shape`` inside the patient box [lo, hi].

        ``tissue`` None means the shape function returns tissue codes itself. ``only_labels`` and
        ``only_tissues`` restrict painting to points whose current label / tissue is one of them (a lesion
        confined to the marrow of a body); ``keep_label`` changes tissue only (oedema stays "bone").
        ``level`` is a level code, or a function giving each point's level code.
        """
        index = self.grid.index_ranges(np.asarray(lo), np.asarray(hi))
        if index is None:
            return
        # Large boxes go in chunks along the first axis so temporary point arrays stay small.
        per_plane = (index[1].stop - index[1].start) * (index[2].stop - index[2].start)
        step = max(1, _CHUNK_POINTS // max(per_plane, 1))
        for start in range(index[0].start, index[0].stop, step):
            chunk = (slice(start, min(start + step, index[0].stop)), index[1], index[2])
            self._paint_block(chunk, shape, tissue, label, level, only_labels, only_tissues, keep_label)

    def _paint_block(self, index, shape, tissue, label, level, only_labels, only_tissues, keep_label) -> None:
        points = self.grid.points(index)
        result = shape(points)
        if result.dtype == bool:
            mask = result
            codes = None
        else:
            mask = result > 0
            codes = result
        if only_labels is not None:
            mask &= np.isin(self.label[index], only_labels)
        if only_tissues is not None:
            mask &= np.isin(self.tissue[index], only_tissues)
        if not mask.any():
            return
        t = self.tissue[index]
        t[mask] = codes[mask] if codes is not None else tissue
        if not keep_label:
            if label is not None:
                self.label[index][mask] = label
            if callable(level):
                self.level[index][mask] = level(points[mask])
            elif level is not None:
                self.level[index][mask] = level


def _resample_axis(values: np.ndarray, axis: int, coords: np.ndarray, order: int, constant: bool) -> np.ndarray:
    """``values`` read at fractional indices ``coords`` along one axis."""
    n = values.shape[axis]
    if len(coords) == n and np.allclose(coords, np.arange(n), atol=1e-9):
        return values
    shape = [1] * values.ndim
    shape[axis] = len(coords)
    inside = ((coords > -0.5) & (coords < n - 0.5)) if order == 0 else ((coords >= -1e-9) & (coords <= n - 1 + 1e-9))
    if order == 0:
        out = np.take(values, np.clip(np.floor(coords + 0.5), 0, n - 1).astype(np.intp), axis=axis)
    else:
        clipped = np.clip(coords, 0, n - 1)
        lo = np.minimum(np.floor(clipped).astype(np.intp), max(n - 2, 0))
        weight = (clipped - lo).astype(values.dtype if values.dtype.kind == "f" else np.float32).reshape(shape)
        below = np.take(values, lo, axis=axis)
        out = below + (np.take(values, np.minimum(lo + 1, n - 1), axis=axis) - below) * weight
    if constant and not inside.all():
        out = out * inside.reshape(shape).astype(out.dtype)
    return out


def rotation(tilt_sagittal: float, tilt_coronal: float = 0.0, axial_rotation: float = 0.0) -> np.ndarray:
    """Columns (u, v, w) of a vertebra's frame in patient space, angles in radians.

    With no rotation u = +x (patient left), v = +y (posterior), w = +z (superior). ``tilt_sagittal``
    turns w toward anterior (−y), so a positive value leans the vertebra forward.
    """
    cs, ss = np.cos(tilt_sagittal), np.sin(tilt_sagittal)
    sagittal = np.array([[1, 0, 0], [0, cs, -ss], [0, ss, cs]])  # about x: w → (0, -sin, cos)
    cc, sc = np.cos(tilt_coronal), np.sin(tilt_coronal)
    coronal = np.array([[cc, 0, sc], [0, 1, 0], [-sc, 0, cc]])  # about y
    ca, sa = np.cos(axial_rotation), np.sin(axial_rotation)
    axial = np.array([[ca, -sa, 0], [sa, ca, 0], [0, 0, 1]])  # about the vertebra's own w
    return coronal @ sagittal @ axial


def local(points: np.ndarray, centre: np.ndarray, frame: np.ndarray) -> np.ndarray:
    """Coordinates of patient points in the frame (columns u, v, w) placed at ``centre``."""
    return (points - centre.astype(np.float32)) @ frame.astype(np.float32)


def box_around(centre: np.ndarray, frame: np.ndarray, half: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patient-axis bounding box of the oriented box ``centre ± half`` (half-extents along u, v, w)."""
    reach = np.abs(frame) @ np.asarray(half, dtype=float)
    return centre - reach, centre + reach
