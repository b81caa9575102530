"""Shape measurements on point sets in patient millimetres."""

from __future__ import annotations

import numpy as np
from scipy.spatial import ConvexHull, QhullError


def feret_diameter(points: np.ndarray) -> float:
    """Largest distance between two points of a set (mm), found among the vertices of its convex hull."""
    points = np.asarray(points, dtype=float)
    if len(points) < 2:
        return 0.0
    try:
        points = points[ConvexHull(points).vertices]
    except QhullError:  # flat or tiny sets: compare all points
        pass
    best = 0.0
    for start in range(0, len(points), 512):  # in blocks: hulls of voxel sets can have thousands of vertices
        d = np.linalg.norm(points[start : start + 512, None, :] - points[None, :, :], axis=-1)
        best = max(best, float(d.max()))
    return best
