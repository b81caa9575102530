"""Spine measurements: what each modality measures from its label map (levels; canal, cord and disc per
level; the C2–C7 Cobb angle; OPLL), and, as one table, which modality's value the study reports for each
measurement when several measured it.

Each modality measures what its images show (``measure_spine``, one measuring function per modality);
``combine`` then takes every measurement from the first modality in ``SOURCES`` that measured it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
from scipy import ndimage

from cspine.analysis import alignment
from cspine.analysis.canal import OPLL_MIN_MM, canal_section, opll_section
from cspine.analysis.discs import disc_height
from cspine.analysis.levels import SpineFrame, frame_from_discs, frame_from_radiograph
from cspine.analysis.masks import LabelMasks, largest_component, mask_points
from cspine.domain import (
    MEASURED_LEVELS,
    VERTEBRAL_LEVELS,
    LevelMeasurement,
    Modality,
    Notice,
    NoticeCode,
    OpllMeasurement,
    SpineMeasurements,
    Volume,
)
from cspine.inference.specs import SEG_LABELS


class Measurement(enum.Enum):
    """What cspine measures of the spine."""

    CANAL = "canal"  # free canal area, per level
    CORD = "cord"  # cord area and compression ratio, per level
    DISC = "disc"  # disc height, per level
    COBB = "cobb"  # the C2–C7 Cobb angle
    OPLL = "opll"  # ossification of the posterior longitudinal ligament


# Which modality measures what best, in order of preference: the study reports the first one's value.
SOURCES: dict[Measurement, tuple[Modality, ...]] = {
    Measurement.CANAL: (Modality.CT, Modality.MR),  # CT: the bony canal's edge is sharp; MR: 3 mm sagittal slices
    Measurement.CORD: (Modality.MR,),  # only MR tells cord from CSF
    Measurement.DISC: (Modality.MR, Modality.CT, Modality.XR),  # MR: the disc axis lies in its fine sagittal plane
    Measurement.COBB: (Modality.XR, Modality.MR),  # XR: C2 … C7 labelled one by one; MR: its mid-sagittal slice
    Measurement.OPLL: (Modality.CT,),  # read from the CT numbers (``opll_where_measured``)
}

# The per-level measurements and the ``LevelMeasurement`` fields each fills, the value that must be present
# first (the rest come from the same modality).
LEVEL_FIELDS: dict[Measurement, tuple[str, ...]] = {
    Measurement.CANAL: ("canal_area_mm2", "canal_source"),
    Measurement.CORD: ("cord_area_mm2", "cord_compression_ratio", "cord_source"),
    Measurement.DISC: ("disc_height_mm", "disc_source"),
}

# A study measurement whose absence is told in a notice when a modality that measures it was assessed.
UNAVAILABLE: dict[Measurement, str] = {Measurement.COBB: "the C2–C7 Cobb angle could not be measured"}

# The labels of a sectional model that make the free canal a section measures, and the cord.
_CANAL_LABELS = {Modality.CT: ("canal",), Modality.MR: ("csf", "cord")}
_CORD_LABEL = {Modality.MR: "cord"}


@dataclass(frozen=True)
class ModalitySpine:
    """What one modality measured of the spine: its levels (None when none could be named), the values per
    level with their source, and the study-wide values it measures (None when it does not or could not)."""

    frame: SpineFrame | None = None
    levels: dict[str, LevelMeasurement] = field(default_factory=dict)
    cobb_angle_deg: float | None = None
    opll: OpllMeasurement | None = None


def measure_spine(modality: Modality, labels: np.ndarray, volume: Volume, image: Volume | None = None) -> ModalitySpine:
    """Levels, canal/cord/disc per level, Cobb angle and OPLL from ``labels`` on ``volume``'s grid (the model
    grid in the pipeline), with the source series ``image``: OPLL reads its CT numbers (default ``volume``'s),
    and the radiograph's Cobb angle snaps the body outlines to its edges (without it, as labelled)."""
    return _MEASURE[modality](labels, volume, image)


def combine(measured: Mapping[Modality, ModalitySpine]) -> SpineMeasurements:
    """The study's spine measurements: each one from its preferred modality among those ``measured``."""
    levels = []
    for name in MEASURED_LEVELS:
        values: dict[str, Any] = {}  # LevelMeasurement's fields: values (float) and their sources (Modality)
        for measurement, fields in LEVEL_FIELDS.items():
            found = preferred(measurement, measured, _at_level(name, fields[0]))
            if found is not None:
                level = measured[found[0]].levels[name]
                values.update({f: getattr(level, f) for f in fields})
        levels.append(LevelMeasurement(level=name, **values))
    cobb = preferred(Measurement.COBB, measured, lambda s: s.cobb_angle_deg)
    opll = preferred(Measurement.OPLL, measured, lambda s: s.opll)
    return SpineMeasurements(
        levels=levels,
        cobb_angle_deg=cobb[1] if cobb else None,
        cobb_source=cobb[0] if cobb else None,
        opll=opll[1] if opll else None,
    )


def unavailable_notices(measured: Mapping[Modality, ModalitySpine], spine: SpineMeasurements) -> list[Notice]:
    """A notice per study measurement that no assessed modality able to make it could make."""
    values = {Measurement.COBB: spine.cobb_angle_deg}
    return [
        Notice(NoticeCode.MEASUREMENT_UNAVAILABLE, message)
        for measurement, message in UNAVAILABLE.items()
        if values[measurement] is None and any(m in measured for m in SOURCES[measurement])
    ]


T = TypeVar("T")


def preferred(
    measurement: Measurement, measured: Mapping[Modality, ModalitySpine], value: Callable[[ModalitySpine], T | None]
) -> tuple[Modality, T] | None:
    """The first modality in ``SOURCES[measurement]`` that measured a ``value``, and that value."""
    for modality in SOURCES[measurement]:
        found = measured.get(modality)
        if found is not None and (v := value(found)) is not None:
            return modality, v
    return None


def _at_level(name: str, field_name: str) -> Callable[[ModalitySpine], object]:
    return lambda spine: getattr(spine.levels.get(name), field_name, None)


# -- per modality --------------------------------------------------------------------------------------


def _measure_radiograph(labels: np.ndarray, volume: Volume, image: Volume | None) -> ModalitySpine:
    frame = frame_from_radiograph(labels, volume)
    if frame is None:
        return ModalitySpine()
    return ModalitySpine(frame, _xr_discs(labels, volume, frame), cobb_angle_deg=_xr_cobb(labels, volume, image))


def _measure_ct(labels: np.ndarray, volume: Volume, image: Volume | None) -> ModalitySpine:
    frame, masks, levels = _sectional(Modality.CT, labels, volume)
    if frame is None:
        return ModalitySpine()
    canal = SEG_LABELS[Modality.CT].index("canal")
    return ModalitySpine(frame, levels, opll=_opll(masks, volume if image is None else image, frame, canal))


def _measure_mr(labels: np.ndarray, volume: Volume, image: Volume | None) -> ModalitySpine:
    frame, _, levels = _sectional(Modality.MR, labels, volume)
    if frame is None:
        return ModalitySpine()
    return ModalitySpine(frame, levels, cobb_angle_deg=_mr_cobb(labels, volume, frame))


_MEASURE: dict[Modality, Callable[[np.ndarray, Volume, Volume | None], ModalitySpine]] = {
    Modality.CT: _measure_ct,
    Modality.MR: _measure_mr,
    Modality.XR: _measure_radiograph,
}


def _sectional(
    modality: Modality, labels: np.ndarray, volume: Volume
) -> tuple[SpineFrame | None, LabelMasks, dict[str, LevelMeasurement]]:
    """A CT's or MR's levels counted from the discs, and the canal, cord and disc below each level."""
    names = SEG_LABELS[modality]
    masks = LabelMasks(labels, volume)
    frame = frame_from_discs(labels, volume, names.index("disc"), names.index("vertebral_body"))
    if frame is None:
        return None, masks, {}
    canal = tuple(names.index(n) for n in _CANAL_LABELS[modality])
    cord = names.index(_CORD_LABEL[modality]) if modality in _CORD_LABEL else None
    levels: dict[str, LevelMeasurement] = {}
    for name in MEASURED_LEVELS:
        level = frame.levels.get(name)
        if level is None:
            continue
        section = canal_section(masks, level, canal, cord)
        disc = frame.discs.get(name)
        height = None
        if disc is not None and disc.found:
            across = np.cross(disc.axis, np.array([0.0, 1.0, 0.0]))
            across = across / max(np.linalg.norm(across), 1e-9)
            height = disc_height(masks, disc.centre, disc.axis, names.index("disc"), across)
        levels[name] = LevelMeasurement(
            level=name,
            canal_area_mm2=section.canal_area_mm2 if section else None,
            cord_area_mm2=section.cord_area_mm2 if section else None,
            cord_compression_ratio=section.cord_compression_ratio if section else None,
            disc_height_mm=height,
            canal_source=modality if section else None,
            cord_source=modality if section and section.cord_area_mm2 is not None else None,
            disc_source=modality if height is not None else None,
        )
    return frame, masks, levels


def _opll(masks: LabelMasks, ct: Volume, frame: SpineFrame, canal: int) -> OpllMeasurement | None:
    """OPLL from the CT numbers at each level: its worst level's thickness and share of the canal."""
    thickness: dict[str, float] = {}
    ratio: dict[str, float] = {}
    for name in MEASURED_LEVELS:
        level = frame.levels.get(name)
        found = opll_section(masks, ct, level, canal) if level is not None else None
        if found is not None:
            thickness[name], ratio[name] = found.thickness_mm, found.occupying_ratio
    if not thickness:
        return None
    worst = max(thickness, key=thickness.__getitem__)
    present = thickness[worst] >= OPLL_MIN_MM
    return OpllMeasurement(
        present=present,
        occupying_ratio=ratio[worst] if present else 0.0,
        max_thickness_mm=thickness[worst] if present else 0.0,
        levels=tuple(n for n in MEASURED_LEVELS if thickness.get(n, 0.0) >= OPLL_MIN_MM),
    )


def opll_where_measured(labels: np.ndarray, opll: OpllMeasurement | None) -> np.ndarray:
    """A CT label map whose OPLL the CT numbers confirm: the model's OPLL mask is kept where they find OPLL and
    otherwise given, voxel by voxel, the label of the nearest other voxel. The model marks a little OPLL in CTs
    without it; the measurement is right far more often (model_repository/README.md)."""
    index = SEG_LABELS[Modality.CT].index("opll")
    marked = labels == index
    if (opll is not None and opll.present) or not marked.any():
        return labels
    nearest = ndimage.distance_transform_edt(marked, return_distances=False, return_indices=True)
    return labels[tuple(nearest)]


def _xr_cobb(labels: np.ndarray, volume: Volume, image: Volume | None) -> float | None:
    """Cobb angle on the radiograph, from its individually labelled C2 and C7 bodies (snapped to the edges of
    ``image``, the source radiograph, when there is one)."""
    names = SEG_LABELS[Modality.XR]
    points = {}
    for level in ("c2", "c7"):
        body = largest_component(labels[0] == names.index(f"{level}_body"))
        if body.sum() < 30:
            return None
        points[level] = mask_points(body, volume, 0)[:, 1:3]  # at 0.25 mm, whatever the grid's pixels
    around = np.concatenate([points["c2"], points["c7"]])
    sampler = alignment.projection_sampler(image, around) if image is not None else None
    return alignment.cobb_angle(points["c2"], points["c7"], sampler)


def _mr_cobb(labels: np.ndarray, volume: Volume, frame: SpineFrame) -> float | None:
    """Cobb angle on the mid-sagittal MR slice: the one crossing the most cord."""
    names = SEG_LABELS[Modality.MR]
    cord = labels == names.index("cord")
    if not cord.any():
        return None
    k = int(np.argmax(cord.sum(axis=(1, 2))))
    pts = mask_points(labels[k] == names.index("vertebral_body"), volume, k)
    if not len(pts):
        return None
    slab = frame.level_index(pts)
    c2 = pts[slab == VERTEBRAL_LEVELS.index("C2")][:, 1:3]
    c7 = pts[slab == VERTEBRAL_LEVELS.index("C7")][:, 1:3]
    return alignment.cobb_angle(c2, c7)


def _xr_discs(labels: np.ndarray, volume: Volume, frame: SpineFrame) -> dict[str, LevelMeasurement]:
    """Disc heights on the radiograph: along the line between neighbouring body centres."""
    disc = SEG_LABELS[Modality.XR].index("disc")
    masks = LabelMasks(labels, volume)
    out = {}
    names = [n for n in MEASURED_LEVELS if n in frame.levels]
    normal = np.cross(volume.row_direction, volume.column_direction)
    for upper, lower in zip(names, names[1:], strict=False):
        a, b = frame.levels[upper].centre, frame.levels[lower].centre
        axis = (a - b) / np.linalg.norm(a - b)
        across = np.cross(normal, axis)
        height = disc_height(masks, (a + b) / 2, axis, disc, across)
        if height is not None:
            out[upper] = LevelMeasurement(level=upper, disc_height_mm=height, disc_source=Modality.XR)
    return out
