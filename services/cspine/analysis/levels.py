"""Vertebral levels from a segmentation: where each level's body is, and which level a point lies in.

CT and MR models do not name levels, so levels are counted from the discs: the uppermost disc found is
C2–C3 (C1 has no disc), each further disc one level lower, and a level's slab lies between the planes
through its discs, as in the phantom's truth. A disc the model lost (a collapsed or invaded level) shows
as a gap twice the usual spacing and is put back in the middle. The radiograph model names C2–C7 itself;
its slabs are bounded half-way between neighbouring bodies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cspine.analysis.masks import component_voxels, components, largest_component
from cspine.domain import VERTEBRAL_LEVELS, Volume

# Disc components smaller than this share of the median of the largest ones (as many as the discs below C2 … C7)
# are specks: the median of all of them would be a speck's size where specks outnumber the discs.
MIN_DISC_SHARE = 0.25
MAX_END_GAP = 2.5  # usual spacings from an end component to the next: half-way between one lost disc and two
BODY_RADIUS_MM = 22.0  # body voxels farther than this from the disc line belong to something else
LEVELS_BELOW_C1 = VERTEBRAL_LEVELS[1:]  # C2 … T1, top to bottom


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v


@dataclass(frozen=True)
class LevelFrame:
    """A level's body centre and its axis (unit vector toward the head), in patient mm."""

    name: str
    centre: np.ndarray
    axis: np.ndarray


@dataclass(frozen=True)
class DiscFrame:
    """The disc below level ``upper``: its centre and axis."""

    upper: str
    centre: np.ndarray
    axis: np.ndarray
    found: bool = True  # False when put back in a gap


@dataclass
class SpineFrame:
    """The levels found in one series, top to bottom, and the planes between them."""

    levels: dict[str, LevelFrame]
    discs: dict[str, DiscFrame] = field(default_factory=dict)
    boundaries: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # (point, normal ↑)
    top: str = "C2"  # the level above the first boundary

    def level_index(self, points: np.ndarray) -> np.ndarray:
        """Index into ``VERTEBRAL_LEVELS`` of the slab each point (N, 3) lies in."""
        points = np.asarray(points, dtype=float).reshape(-1, 3)
        index = np.full(len(points), VERTEBRAL_LEVELS.index(self.top), dtype=int)
        for point, normal in self.boundaries:
            index += ((points - point) @ normal < 0).astype(int)
        return np.minimum(index, len(VERTEBRAL_LEVELS) - 1)

    def height_above_top(self, point: np.ndarray) -> float:
        """How far (mm) a point lies above the uppermost boundary (the C2–C3 disc when counted from discs)."""
        if not self.boundaries:
            return 0.0
        origin, normal = self.boundaries[0]
        return float((np.asarray(point, dtype=float) - origin) @ normal)

    def levels_of(self, points: np.ndarray) -> tuple[str, tuple[str, ...]]:
        """The level holding most of ``points`` and every level holding at least 10 % of them."""
        counts = np.bincount(self.level_index(points), minlength=len(VERTEBRAL_LEVELS))
        share = counts / max(1, counts.sum())
        main = VERTEBRAL_LEVELS[int(np.argmax(counts))]
        return main, tuple(VERTEBRAL_LEVELS[i] for i in np.nonzero(share >= 0.1)[0])


def _component_centres(mask: np.ndarray, volume: Volume) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """(centre mm, voxel points mm, voxel count) of each 3D component of ``mask``."""
    out = []
    for kij in component_voxels(components(mask)[0]):
        points = volume.index_to_patient(kij)
        out.append((points.mean(axis=0), points, len(kij)))
    return out


def _usual_spacing(parts: list[tuple[np.ndarray, np.ndarray, int]]) -> float:
    return float(np.median(np.linalg.norm(np.diff(np.array([p[0] for p in parts]), axis=0), axis=1)))


def _gap(a: tuple[np.ndarray, np.ndarray, int], b: tuple[np.ndarray, np.ndarray, int], usual: float) -> float:
    """The distance between two disc components' centres, in usual spacings."""
    return float(np.linalg.norm(a[0] - b[0])) / usual


def _disc_axis(points: np.ndarray, along: np.ndarray) -> np.ndarray:
    """A disc's axis: the direction of its least extent, turned toward ``along``."""
    if len(points) < 10:
        return _unit(along)
    centred = points - points.mean(axis=0)
    _, vectors = np.linalg.eigh(centred.T @ centred)
    axis = vectors[:, 0]
    return axis if axis @ along >= 0 else -axis


def frame_from_discs(labels: np.ndarray, volume: Volume, disc: int, body: int) -> SpineFrame | None:
    """Levels of a CT or MR label map [K, R, C] on ``volume``'s grid, counted from its discs; None when
    fewer than two discs are found."""
    parts = _component_centres(labels == disc, volume)
    if len(parts) < 2:
        return None
    largest = sorted(p[2] for p in parts)[-(len(LEVELS_BELOW_C1) - 1) :]
    parts = [p for p in parts if p[2] >= MIN_DISC_SHARE * np.median(largest)]
    parts.sort(key=lambda p: -p[0][2])  # superior first (patient +z)
    if len(parts) < 2:
        return None
    usual = _usual_spacing(parts)
    # An end of the stack farther from the next disc than one lost disc explains is not a disc: the models' false
    # discs lie at the ends (the skull base, the upper thorax), where two discs lost in a row are far less likely.
    while len(parts) > 2 and _gap(parts[0], parts[1], usual) > MAX_END_GAP:
        parts = parts[1:]
    while len(parts) > 2 and _gap(parts[-1], parts[-2], usual) > MAX_END_GAP:
        parts = parts[:-1]
    usual = _usual_spacing(parts)
    # Put back discs the model lost: a gap of about twice the usual spacing holds one.
    centres: list[np.ndarray] = []
    points: list[np.ndarray] = []
    found: list[bool] = []
    for centre, pts, _ in parts:
        if centres:
            missing = int(round(float(np.linalg.norm(centre - centres[-1])) / usual)) - 1
            previous = centres[-1]
            for m in range(1, missing + 1):
                t = m / (missing + 1)
                centres.append(previous * (1 - t) + centre * t)
                points.append(np.empty((0, 3)))
                found.append(False)
        centres.append(centre)
        points.append(pts)
        found.append(True)
    count = min(len(centres), len(LEVELS_BELOW_C1) - 1)
    centres, points, found = centres[:count], points[:count], found[:count]
    line = [_unit(centres[max(i - 1, 0)] - centres[min(i + 1, count - 1)]) for i in range(count)]
    discs = {}
    for i in range(count):
        upper = LEVELS_BELOW_C1[i]
        axis = _disc_axis(points[i], line[i]) if found[i] else line[i]
        discs[upper] = DiscFrame(upper, centres[i], axis, found[i])
    body_points = volume.index_to_patient(np.argwhere(labels == body)) if (labels == body).any() else np.empty((0, 3))
    frame = SpineFrame(levels={}, discs=discs, boundaries=[(d.centre, d.axis) for d in discs.values()], top="C2")
    frame.levels.update(_body_frames(frame, body_points, centres, line, usual))
    return frame


def _body_frames(frame, body_points, centres, line, usual) -> dict[str, LevelFrame]:
    """Body centre of each level between or next to the discs: the centroid of its body voxels near the disc
    line (only the lower part of C2, without the dens), else the point half-way between its discs."""
    count = len(centres)
    slabs = frame.level_index(body_points) if len(body_points) else np.empty(0, dtype=int)
    out = {}
    for j in range(count + 1):  # level j sits above disc j (C2 above the first, T1 below the last)
        name = LEVELS_BELOW_C1[j]
        if j == 0:
            guess, axis = centres[0] + line[0] * usual / 2, line[0]
        elif j == count:
            guess, axis = centres[-1] - line[-1] * usual / 2, line[-1]
        else:
            guess, axis = (centres[j - 1] + centres[j]) / 2, _unit(centres[j - 1] - centres[j])
        mine = body_points[slabs == VERTEBRAL_LEVELS.index(name)] if len(slabs) else body_points
        if len(mine):
            along = (mine - guess) @ axis
            radial = np.linalg.norm((mine - guess) - along[:, None] * axis, axis=1)
            mine = mine[(radial < BODY_RADIUS_MM) & (np.abs(along) < usual * 0.6)]
        centre = mine.mean(axis=0) if len(mine) > 20 else guess
        out[name] = LevelFrame(name, centre, axis)
    return out


XR_BODY_LABELS = {"C2": 1, "C3": 2, "C4": 3, "C5": 4, "C6": 5, "C7": 6}  # seg_xr label values


def frame_from_radiograph(labels: np.ndarray, volume: Volume) -> SpineFrame | None:
    """Levels of a radiograph label map [1, R, C], from its individually labelled C2–C7 bodies (in the
    radiograph's own image plane); None when fewer than two bodies are found."""
    centres = {}
    for name, value in XR_BODY_LABELS.items():
        mask = labels[0] == value
        if mask.sum() < 20:
            continue
        rc = np.argwhere(largest_component(mask)).mean(axis=0)
        centres[name] = volume.index_to_patient(np.array([[0.0, rc[0], rc[1]]]))[0]
    names = [n for n in XR_BODY_LABELS if n in centres]
    if len(names) < 2:
        return None
    levels, boundaries = {}, []
    for i, name in enumerate(names):
        up = centres[names[max(i - 1, 0)]] - centres[names[min(i + 1, len(names) - 1)]]
        levels[name] = LevelFrame(name, centres[name], _unit(up))
    for upper, lower in zip(names, names[1:], strict=False):
        boundaries.append(((centres[upper] + centres[lower]) / 2, _unit(centres[upper] - centres[lower])))
    last = levels[names[-1]]
    step = float(np.linalg.norm(centres[names[-2]] - centres[names[-1]]))
    below = VERTEBRAL_LEVELS[VERTEBRAL_LEVELS.index(names[-1]) + 1]
    boundaries.append((last.centre - last.axis * step / 2, last.axis))
    levels[below] = LevelFrame(below, last.centre - last.axis * step, last.axis)
    return SpineFrame(levels=levels, boundaries=boundaries, top=names[0])
