"""Sagittal alignment: the C2–C7 Cobb angle between the inferior endplates of C2 and C7 on a lateral view
(positive = lordosis), from the radiograph's individually labelled bodies, or from a sagittal MR slice
when there is no radiograph.

A body's edges are robust lines: the line through the most of the body's extreme points, one per 0.5 mm
strip, so strips where a rounded corner, the side of a tilted body or a stray pixel sticks out do not
count. C7's tilt is the mean of its inferior and superior endplates (a body's endplates are parallel).
C2's inferior endplate is where the segmentation errs most (it meets the C2–C3 disc and C3's top), so its
tilt comes from the anterior and posterior walls of its body, below the dens, which are perpendicular to
the endplates. The method was chosen on the 60 SYNTHETIC studies of the evaluation's tuning cohort (seed
9300: C2–C7 error 4.0° against 7.0° with the C2 endplate); on the held-out cohort (seed 9800) the error is
4.7° (docs/pipeline.md).
"""

from __future__ import annotations

import numpy as np

STRIP_MM = 0.5
MIDDLE = (15.0, 85.0)  # percentiles of the body's AP extent the fit uses
INLIER_MM = 0.8
C2_BODY_MM = 16.0  # C2's walls are fitted over its lowest 16 mm, below the dens
MAX_SLOPE = np.tan(np.radians(45.0))  # an endplate leaning more than this is not an endplate


def endplate_tilt(points_yz: np.ndarray, inferior: bool = True) -> float | None:
    """Forward lean (deg) of a body's inferior (or superior) endplate, from its points (N, 2) as
    (posterior mm, superior mm) on a lateral view."""
    if len(points_yz) < 30:
        return None
    y, z = points_yz[:, 0], points_yz[:, 1] if inferior else -points_yz[:, 1]
    lo, hi = np.percentile(y, MIDDLE)
    strips = np.floor((y - lo) / STRIP_MM).astype(int)
    keep = (y >= lo) & (y <= hi)
    ys, zs = [], []
    for s in np.unique(strips[keep]):
        member = keep & (strips == s)
        ys.append(y[member].mean())
        zs.append(z[member].min())
    if len(ys) < 5:
        return None
    slope = _robust_slope(np.array(ys), np.array(zs))
    return float(np.degrees(np.arctan(slope if inferior else -slope)))


def _robust_slope(ys: np.ndarray, zs: np.ndarray) -> float:
    """Slope of the line through the most strip bottoms (within INLIER_MM), refitted on them: strips where
    a neighbour's stray pixels or the body's side are lowest do not pull the line (exhaustive RANSAC)."""
    best, best_count = (0.0, float(np.median(zs))), -1
    for i in range(len(ys)):
        for j in range(i + 1, len(ys)):
            dy = ys[j] - ys[i]
            if abs(dy) < 3.0:
                continue
            slope = (zs[j] - zs[i]) / dy
            if abs(slope) > MAX_SLOPE:
                continue
            count = int((np.abs(zs - (zs[i] + slope * (ys - ys[i]))) < INLIER_MM).sum())
            if count > best_count:
                best, best_count = (slope, zs[i] - slope * ys[i]), count
    slope, intercept = best
    inliers = np.abs(zs - (slope * ys + intercept)) < INLIER_MM
    return float(np.polyfit(ys[inliers], zs[inliers], 1)[0]) if inliers.sum() >= 3 else slope


def wall_tilt(points_yz: np.ndarray, anterior: bool, height_mm: float | None = None) -> float | None:
    """Forward lean (deg) of a body's anterior (or posterior) wall, from its points (N, 2) as (posterior mm,
    superior mm) on a lateral view, over the middle 70 % of its height (of its lowest ``height_mm``). Fitted
    twice: the second time in the frame of the first estimate, so the window clears a tilted body's corners."""
    if len(points_yz) < 30:
        return None
    tilt = 0.0
    for _ in range(2):
        found = _wall_tilt_upright(_rotate(points_yz, -tilt), anterior, height_mm)
        if found is None:
            return None
        tilt += found
    return tilt


def _rotate(points_yz: np.ndarray, lean_deg: float) -> np.ndarray:
    """The points turned so that a body leaning forward by ``-lean_deg`` more stands as it would then."""
    t = np.radians(lean_deg)
    y, z = points_yz[:, 0], points_yz[:, 1]
    # leaning forward moves the top anterior (−y): rotate (y, z) by +t in the y–z plane toward −y
    return np.column_stack([y * np.cos(t) - z * np.sin(t), y * np.sin(t) + z * np.cos(t)])


def _wall_tilt_upright(points_yz: np.ndarray, anterior: bool, height_mm: float | None) -> float | None:
    y, z = points_yz[:, 0], points_yz[:, 1]
    bottom = z.min()
    top = bottom + height_mm if height_mm else z.max()
    lo, hi = bottom + 0.15 * (top - bottom), bottom + 0.85 * (top - bottom)
    keep = (z >= lo) & (z <= hi)
    strips = np.floor((z - lo) / STRIP_MM).astype(int)
    zs, ys = [], []
    for s in np.unique(strips[keep]):
        member = keep & (strips == s)
        zs.append(z[member].mean())
        ys.append(y[member].min() if anterior else y[member].max())
    if len(zs) < 5:
        return None
    # a wall leaning forward by t runs y = -tan(t) · z + c
    return float(-np.degrees(np.arctan(_robust_slope(np.array(zs), np.array(ys)))))


def _mean(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.mean(found)) if found else None


def cobb_angle(c2_yz: np.ndarray, c7_yz: np.ndarray) -> float | None:
    """C2–C7 Cobb angle (deg) from the two bodies' points on a lateral view (posterior, superior mm)."""
    c2 = _mean([wall_tilt(c2_yz, True, C2_BODY_MM), wall_tilt(c2_yz, False, C2_BODY_MM)])
    c7 = _mean([endplate_tilt(c7_yz, True), endplate_tilt(c7_yz, False)])
    if c2 is None or c7 is None:
        return None
    return round(c7 - c2, 2)
