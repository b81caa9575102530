"""Shape measurements on point sets in patient millimetres."""

from __future__ import annotations

import contextlib

import numpy as np
from scipy.spatial import ConvexHull, QhullError


def feret(points: np.ndarray) -> tuple[float, np.ndarray]:
    """Largest distance between two points of a set (mm) and its unit direction, found among the vertices
    of the set's convex hull."""
    points = np.asarray(points, dtype=float)
    if len(points) < 2:
        return 0.0, np.array([0.0, 0.0, 1.0])[: points.shape[-1]] if points.ndim == 2 else np.zeros(3)
    with contextlib.suppress(QhullError):  # flat or tiny sets: compare all points
        points = points[ConvexHull(points).vertices]
    best, pair = -1.0, (0, 0)
    for start in range(0, len(points), 512):  # in blocks: hulls of voxel sets can have thousands of vertices
        d = np.linalg.norm(points[start : start + 512, None, :] - points[None, :, :], axis=-1)
        flat = int(np.argmax(d))
        if d.flat[flat] > best:
            best = float(d.flat[flat])
            pair = (start + flat // d.shape[1], flat % d.shape[1])
    direction = points[pair[1]] - points[pair[0]]
    norm = float(np.linalg.norm(direction))
    return best, direction / norm if norm > 0 else direction


def feret_diameter(points: np.ndarray) -> float:
    """Largest distance between two points of a set (mm)."""
    return feret(points)[0]
