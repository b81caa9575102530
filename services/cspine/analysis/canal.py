"""Canal, cord and OPLL at each level, on the plane through the level's body centre perpendicular to its
axis (the plane the phantom's truth uses), sampled from the label map at 0.2 mm.

Masks are sampled by linear interpolation of the binary mask and thresholded at one half, so a sagittal
MR with 3 mm slices still gives a smooth left–right edge instead of a 3 mm staircase.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from cspine.analysis.levels import LevelFrame
from cspine.analysis.masks import LabelMasks
from cspine.domain import Volume
from cspine.imaging.sampling import sample

STEP_MM = 0.2
HALF_WIDTH_MM = 20.0  # the plane reaches this far to each side of the canal's expected centre
CANAL_OFFSET_MM = 17.0  # a canal centre lies about this far behind the body centre (body half AP + canal half AP)
_POSTERIOR = np.array([0.0, 1.0, 0.0])


@dataclass(frozen=True)
class Plane:
    """A square grid of points on the plane through a level's body centre: ``u`` toward the patient's left,
    ``v`` toward posterior, both perpendicular to the level's axis; centred behind the body, on the canal."""

    points: np.ndarray  # [N, N, 3]
    u: np.ndarray
    v: np.ndarray
    origin: np.ndarray  # patient point of the grid centre

    @staticmethod
    def through(level: LevelFrame) -> Plane:
        w = level.axis
        v = _POSTERIOR - (_POSTERIOR @ w) * w
        v = v / np.linalg.norm(v)
        u = np.cross(v, w)
        origin = level.centre + CANAL_OFFSET_MM * v
        offsets = np.arange(-HALF_WIDTH_MM, HALF_WIDTH_MM + 1e-9, STEP_MM)
        points = origin + offsets[:, None, None] * u + offsets[None, :, None] * v
        return Plane(points, u, v, origin)

    def mask(self, masks: LabelMasks, values: tuple[int, ...]) -> np.ndarray:
        """Where the label map holds one of ``values`` on this plane: [N (along u), N (along v)] bool."""
        return sample(masks.of(values), self.points, order=1, cval=0.0) >= 0.5

    def image(self, volume: Volume, cval: float) -> np.ndarray:
        return sample(volume, self.points, order=1, cval=cval)


def canal_component(free: np.ndarray) -> np.ndarray:
    """The connected region of free canal closest to the plane's centre (where the canal should be)."""
    if not free.any():
        return free
    parts, count = ndimage.label(free)
    centre = np.array(free.shape) / 2.0
    best, best_distance = 0, np.inf
    for index in range(1, count + 1):
        pixels = np.argwhere(parts == index)
        if len(pixels) * STEP_MM**2 < 20.0:  # specks are not a canal
            continue
        distance = float(np.min(np.linalg.norm(pixels - centre, axis=1)))
        if distance < best_distance:
            best, best_distance = index, distance
    return parts == best if best else np.zeros_like(free)


@dataclass(frozen=True)
class CanalSection:
    canal_area_mm2: float
    cord_area_mm2: float | None
    cord_compression_ratio: float | None


def canal_section(
    masks: LabelMasks, level: LevelFrame, canal: tuple[int, ...], cord: int | None
) -> CanalSection | None:
    """Free canal area (CSF + cord) and, when the map has a cord label, cord area and AP/LR ratio."""
    plane = Plane.through(level)
    region = canal_component(plane.mask(masks, canal))
    if not region.any():
        return None
    pixel = STEP_MM**2
    if cord is None:
        return CanalSection(round(float(region.sum() * pixel), 1), None, None)
    cord_mask = region & plane.mask(masks, (cord,))
    if not cord_mask.any():
        return CanalSection(round(float(region.sum() * pixel), 1), None, None)
    iu, iv = np.nonzero(cord_mask)
    lr = (iu.max() - iu.min() + 1) * STEP_MM
    ap = (iv.max() - iv.min() + 1) * STEP_MM
    return CanalSection(
        round(float(region.sum() * pixel), 1), round(float(cord_mask.sum() * pixel), 1), round(ap / lr, 3)
    )


# OPLL on CT is measured from the CT numbers (the model's OPLL mask is kept only where they find it:
# ``spine.opll_where_measured``). Along the midline, the dense bone in front of the free canal is the body's
# posterior cortex alone (about CORTEX_RUN_MM on these images) or cortex plus an ossified ligament.
DENSE_HU = 500.0
CORTEX_RUN_MM = 1.8
OPLL_MIN_MM = 1.0
MIDLINE_HALF_MM = 1.0


@dataclass(frozen=True)
class OpllSection:
    thickness_mm: float
    occupying_ratio: float  # thickness over the bony canal AP (free canal AP + thickness)


def opll_section(masks: LabelMasks, ct: Volume, level: LevelFrame, canal: int) -> OpllSection | None:
    """OPLL thickness at a level: the dense run in front of the free canal on the midline, less the cortex."""
    plane = Plane.through(level)
    region = canal_component(plane.mask(masks, (canal,)))
    if not region.any():
        return None
    hu = plane.image(ct, cval=-1000.0)
    # the canal's midline: the column of u through the region's centroid
    u0 = int(round(np.argwhere(region)[:, 0].mean()))
    half = int(round(MIDLINE_HALF_MM / STEP_MM))
    thickness: list[float] = []
    free_ap: list[float] = []
    for iu in range(max(0, u0 - half), min(region.shape[0], u0 + half + 1)):
        column = np.nonzero(region[iu])[0]
        if not len(column):
            continue
        front, back = column.min(), column.max()
        dense = hu[iu, :front][::-1] > DENSE_HU  # walking forward from the canal's front edge
        run = np.argmin(dense) if not dense.all() else len(dense)
        thickness.append(float(run * STEP_MM))
        free_ap.append((back - front + 1) * STEP_MM)
    if not thickness:
        return None
    t = max(0.0, float(np.median(thickness)) - CORTEX_RUN_MM)
    ap = float(np.median(free_ap))
    return OpllSection(round(t, 2), round(t / (ap + t), 3) if ap + t > 0 else 0.0)
