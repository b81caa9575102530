"""Disc height: the length of disc along the disc's axis through its centre (the distance between the
endplate centres, as the phantom's truth defines it), as the median over a few parallel lines near the
centre so one ragged edge does not decide it."""

from __future__ import annotations

import numpy as np

from cspine.analysis.masks import LabelMasks
from cspine.imaging.sampling import sample

STEP_MM = 0.1
REACH_MM = 10.0  # the line reaches this far up and down from the centre
SPREAD_MM = (-2.0, 0.0, 2.0)  # offsets of the parallel lines in the disc plane


def _run_through_middle(inside: np.ndarray) -> int:
    """Length of the run of True samples that holds the middle sample (0 when it is False)."""
    lo = hi = len(inside) // 2
    if not inside[lo]:
        return 0
    while lo > 0 and inside[lo - 1]:
        lo -= 1
    while hi < len(inside) - 1 and inside[hi + 1]:
        hi += 1
    return hi - lo + 1


def disc_height(masks: LabelMasks, centre: np.ndarray, axis: np.ndarray, disc: int, across: np.ndarray) -> float | None:
    """Disc height (mm) at ``centre`` along unit ``axis``; ``across`` is a unit direction in the disc plane
    to spread the lines along (left–right on CT/MR, anterior–posterior on a radiograph)."""
    binary = masks.of((disc,))
    t = np.arange(-REACH_MM, REACH_MM + 1e-9, STEP_MM)
    heights = []
    for offset in SPREAD_MM:
        line = centre + offset * across + t[:, None] * axis
        inside = sample(binary, line, order=1, cval=0.0) >= 0.5
        run = _run_through_middle(inside)
        if run:
            heights.append(run * STEP_MM)
    return round(float(np.median(heights)), 2) if heights else None
