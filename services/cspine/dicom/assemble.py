"""Series assembly for ingest: the instances of one series become a Series; CT/MR frames ordered along the
slice normal, repeated positions dropped, gaps and irregular spacing noticed, the volume decoded; one
radiograph chosen per projection series."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from cspine.dicom.attributes import attribute_values, first_item, float_value, int_value, safe, text
from cspine.dicom.classify import MODALITY_BY_DICOM
from cspine.dicom.geometry import orientation_of, patient_orientation_directions, row_column_directions
from cspine.dicom.pixels import decode, decode_all, transform
from cspine.dicom.records import Frame, Image, Instance, Kind
from cspine.dicom.selection import RadiographView, radiograph_view, series_name
from cspine.domain import (
    InstanceRef,
    Modality,
    Notice,
    NoticeCode,
    Orientation,
    Series,
    Volume,
)
from cspine.errors import InconsistentSeriesError

# Tolerances, in millimetres unless said otherwise.
_SAME_POSITION_MM = 0.01  # two slices this close are one position
_GAP_FACTOR = 1.5  # a step larger than this × the median spacing is a gap
_IRREGULAR_FRACTION = 0.05  # a step this far off the median is irregular
_IRREGULAR_MIN_MM = 0.01
_ORIENTATION_TOLERANCE = 0.01  # largest difference of direction cosines inside one series
_SPACING_TOLERANCE = 0.001  # largest relative difference of pixel spacing inside one series

# A radiograph without PatientOrientation is shown as an AP view: row toward the patient's left, column down.
_NOMINAL_RADIOGRAPH_DIRECTIONS = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]))


def _image(inst: Instance) -> Image:
    """The Image Pixel description of an image instance (ingest reads one for every Kind.IMAGE instance)."""
    assert inst.image is not None
    return inst.image


def build_series(uid: str, instances: list[Instance], notices: list[Notice]) -> Series:
    images = [i for i in instances if i.kind is Kind.IMAGE]
    for other in (i for i in instances if i.kind is not Kind.IMAGE and images):
        notices.append(Notice(NoticeCode.NOT_AN_IMAGE, f"{other.label} is not an image; skipped", uid))
    members = images or instances
    first = members[0]
    series = Series(
        series_instance_uid=uid,
        dicom_modality=first.dicom_modality,
        modality=MODALITY_BY_DICOM.get(first.dicom_modality) if images else None,
        sop_class_uid=first.sop_class_uid,
        series_number=safe(lambda: int_value(first.ds, "SeriesNumber")),
        description=safe(lambda: text(first.ds, "SeriesDescription")) or "",
        instances=tuple(InstanceRef(i.sop_class_uid, i.sop_instance_uid) for i in members),
        frame_of_reference_uid=safe(lambda: text(first.ds, "FrameOfReferenceUID")),
        headers=tuple(i.ds for i in members),
    )
    name = series_name(series)
    if not images:
        notices.append(
            Notice(NoticeCode.NOT_AN_IMAGE, f"{name} is not an image ({len(members)} object(s)); skipped", uid)
        )
        return series
    reference = _majority(images, lambda i: (i.dicom_modality, i.image.rows, i.image.columns))
    for inst in images:
        _check_same_series(reference, inst)
    _mr_timing(series, first.ds)
    if series.modality is None:
        notices.append(
            Notice(
                NoticeCode.UNSUPPORTED_IMAGE,
                f"{name}: modality {first.dicom_modality or 'unknown'} is not analysed",
                uid,
            )
        )
        return series
    colour = next((i for i in images if not _image(i).greyscale), None)
    if colour is not None:
        notices.append(
            Notice(
                NoticeCode.UNSUPPORTED_IMAGE,
                f"{name}: {_image(colour).photometric} colour images are not analysed",
                uid,
            )
        )
        return series
    _SERIES_BUILDERS[series.modality](series, name, images, notices)
    return series


def _check_same_series(first: Instance, inst: Instance) -> None:
    a, b = _image(first), _image(inst)
    if inst.dicom_modality != first.dicom_modality:
        raise InconsistentSeriesError(
            inst.label, f"modality {inst.dicom_modality} differs from its series' {first.dicom_modality}"
        )
    if (b.rows, b.columns) != (a.rows, a.columns):
        raise InconsistentSeriesError(
            inst.label, f"{b.rows}×{b.columns} pixels differ from its series' {a.rows}×{a.columns}"
        )


def _build_cross_sectional(series: Series, name: str, images: list[Instance], notices: list[Notice]) -> None:
    uid = series.series_instance_uid
    frames: list[tuple[Instance, Frame]] = []
    for inst in images:
        image = _image(inst)
        if image.frames is None:
            notices.append(Notice(NoticeCode.UNSUPPORTED_IMAGE, f"{name}: {image.geometry_problem}", uid))
            return
        frames += [(inst, frame) for frame in image.frames]
    reference_inst, reference = _majority(frames, lambda pair: _plane_key(pair[1]))
    directions = row_column_directions(reference.orientation)
    if directions is None:
        notices.append(Notice(NoticeCode.UNSUPPORTED_IMAGE, f"{name}: ImageOrientationPatient is not usable", uid))
        return
    row, column = directions
    for inst, frame in frames:
        _check_same_plane(inst, frame, reference)
    normal = np.cross(row, column)
    positions = np.array([frame.position for _, frame in frames], dtype=float)
    projections = positions @ normal
    order = sorted(range(len(frames)), key=lambda n: (projections[n], frames[n][0].order, frames[n][1].index))
    kept = _drop_same_positions(order, projections, frames, name, uid, notices)
    offsets = projections[kept] - projections[kept[0]]
    _spacing_notices(offsets, name, uid, notices)

    shape = (len(kept), reference_inst.image.rows, reference_inst.image.columns)
    voxels = np.empty(shape, dtype=np.float32)
    slots: dict[int, list[tuple[int, Frame]]] = defaultdict(list)  # instance → [(slice k, frame)]
    instance_of = {}
    for k, n in enumerate(kept):
        inst, frame = frames[n]
        slots[id(inst)].append((k, frame))
        instance_of[id(inst)] = inst
    decode_all([(instance_of[key], targets) for key, targets in slots.items()], voxels)
    for inst in images:
        inst.pixels = None

    slice_order = [frames[n] for n in kept]
    series.volume = Volume(
        voxels=voxels,
        origin=positions[kept[0]].copy(),
        row_direction=row,
        column_direction=column,
        pixel_spacing=(float(reference.spacing[0]), float(reference.spacing[1])),
        slice_offsets=offsets,
        slice_thickness=reference.thickness,
    )
    series.orientation = orientation_of(normal)
    multi_frame = any(_image(inst).frame_count > 1 for inst in images)
    series.instances = tuple(
        InstanceRef(inst.sop_class_uid, inst.sop_instance_uid, frame.index + 1 if multi_frame else None)
        for inst, frame in slice_order
    )
    seen: dict[int, Dataset] = {}
    for inst, _ in slice_order:
        seen.setdefault(id(inst), inst.ds)
    series.headers = tuple(seen.values())


def _majority(items: list[Any], key: Callable[[Any], Any]) -> Any:
    """The first item of the most common kind: a series is judged by its majority, so that the odd
    instance out is the one an error names."""
    counts: dict[Any, int] = defaultdict(int)
    for item in items:
        counts[key(item)] += 1
    best = max(counts.values())
    return next(item for item in items if counts[key(item)] == best)


def _plane_key(frame: Frame) -> tuple:
    assert frame.orientation is not None and frame.spacing is not None  # a CT/MR frame has both (geometry)
    return (
        tuple(round(v / _ORIENTATION_TOLERANCE) for v in frame.orientation),
        tuple(round(v, 3) for v in frame.spacing),
    )


def _check_same_plane(inst: Instance, frame: Frame, reference: Frame) -> None:
    # CT/MR frames: geometry gives every one an orientation and a pixel spacing (or the instance no frames).
    assert frame.orientation is not None and frame.spacing is not None
    assert reference.orientation is not None and reference.spacing is not None
    difference = np.max(np.abs(np.subtract(frame.orientation, reference.orientation)))
    if difference > _ORIENTATION_TOLERANCE:
        raise InconsistentSeriesError(inst.label, "its ImageOrientationPatient differs from the rest of its series")
    a, b = reference.spacing, frame.spacing
    if any(abs(x - y) > _SPACING_TOLERANCE * max(x, y) for x, y in zip(a, b, strict=True)):
        raise InconsistentSeriesError(
            inst.label, f"its PixelSpacing {b[0]:g}\\{b[1]:g} differs from its series' {a[0]:g}\\{a[1]:g}"
        )


def _drop_same_positions(
    order: list[int],
    projections: np.ndarray,
    frames: list[tuple[Instance, Frame]],
    name: str,
    uid: str,
    notices: list[Notice],
) -> list[int]:
    """Keep one frame per slice position: the first by InstanceNumber (then frame number)."""
    kept: list[int] = []
    dropped = 0
    cluster_start = None
    for n in order:
        if cluster_start is not None and projections[n] - cluster_start < _SAME_POSITION_MM:
            dropped += 1
            continue  # order sorts equal positions by InstanceNumber, so the first seen is the one to keep
        cluster_start = projections[n]
        kept.append(n)
    if dropped:
        notices.append(
            Notice(
                NoticeCode.DUPLICATE_INSTANCE,
                f"{name}: {dropped} image(s) at a slice position already taken were dropped "
                "(the lowest InstanceNumber was kept)",
                uid,
            )
        )
    return kept


def _spacing_notices(offsets: np.ndarray, name: str, uid: str, notices: list[Notice]) -> None:
    if len(offsets) < 3:
        return
    steps = np.diff(offsets)
    median = float(np.median(steps))
    gaps = [(k, float(step)) for k, step in enumerate(steps) if step > _GAP_FACTOR * median]
    if gaps:
        missing = [max(1, round(step / median) - 1) for _, step in gaps]
        where = "; ".join(
            f"{count} between slices {k} and {k + 1} ({offsets[k]:.1f}–{offsets[k + 1]:.1f} mm from the first)"
            for (k, _), count in zip(gaps, missing, strict=True)
        )
        notices.append(
            Notice(
                NoticeCode.MISSING_SLICES,
                f"{name}: {sum(missing)} slice(s) missing at {median:.2f} mm spacing: {where}; not interpolated",
                uid,
            )
        )
    gap_steps = {k for k, _ in gaps}
    tolerance = max(_IRREGULAR_FRACTION * median, _IRREGULAR_MIN_MM)
    irregular = [k for k, step in enumerate(steps) if k not in gap_steps and abs(step - median) > tolerance]
    if irregular:
        notices.append(
            Notice(
                NoticeCode.IRREGULAR_SPACING,
                f"{name}: slice spacing varies from {steps.min():.2f} to {steps.max():.2f} mm "
                f"(median {median:.2f} mm) at {len(irregular)} step(s); slice offsets keep the real positions",
                uid,
            )
        )


def _mr_timing(series: Series, ds: Dataset) -> None:
    """EchoTime / RepetitionTime, top level or from the enhanced MR functional groups."""
    if series.modality is not Modality.MR:
        return
    shared = safe(lambda: first_item(ds, "SharedFunctionalGroupsSequence"))
    per_frame = safe(lambda: first_item(ds, "PerFrameFunctionalGroupsSequence"))

    def group(keyword: str) -> Dataset | None:
        return safe(lambda: first_item(per_frame, keyword) or first_item(shared, keyword))

    series.echo_time_ms = safe(lambda: float_value(ds, "EchoTime")) or safe(
        lambda: float_value(group("MREchoSequence"), "EffectiveEchoTime")
    )
    series.repetition_time_ms = safe(lambda: float_value(ds, "RepetitionTime")) or safe(
        lambda: float_value(group("MRTimingAndRelatedParametersSequence"), "RepetitionTime")
    )


def _build_projection(series: Series, name: str, images: list[Instance], notices: list[Notice]) -> None:
    uid = series.series_instance_uid
    single = [i for i in images if _image(i).frame_count == 1]
    if len(single) < len(images):
        notices.append(Notice(NoticeCode.UNSUPPORTED_IMAGE, f"{name}: multi-frame radiographs are not analysed", uid))
    if not single:
        return
    views = {id(i): _view_of(i.ds) for i in single}
    chosen = min(single, key=lambda i: (views[id(i)][0] is not RadiographView.LATERAL, i.order))
    if len(single) > 1:
        notices.append(
            Notice(
                NoticeCode.UNSUPPORTED_IMAGE,
                f"{name} holds {len(single)} radiographs; one per series is analysed: instance number "
                f"{chosen.instance_number} ({views[id(chosen)][0].value} view) is used, the others are ignored",
                uid,
            )
        )
    for inst in single:
        if inst is not chosen:
            inst.pixels = None
    image = _image(chosen)
    if image.frames is None:
        notices.append(Notice(NoticeCode.UNSUPPORTED_IMAGE, f"{name}: {image.geometry_problem}", uid))
        return
    assert image.pixel_spacing_xr is not None  # a radiograph has frames only with a spacing (geometry)
    frame = image.frames[0]
    voxels = np.empty((1, image.rows, image.columns), dtype=np.float32)
    transform(chosen, frame).apply(decode(chosen)[0], voxels[0])
    chosen.pixels = None
    view, directions = views[id(chosen)]
    row, column = directions or _NOMINAL_RADIOGRAPH_DIRECTIONS
    series.volume = Volume(
        voxels=voxels,
        origin=np.zeros(3),
        row_direction=np.array(row, dtype=float),
        column_direction=np.array(column, dtype=float),
        pixel_spacing=image.pixel_spacing_xr,
        slice_offsets=np.zeros(1),
        slice_thickness=None,
        projection=True,
    )
    series.orientation = Orientation.PROJECTION
    series.view_position = safe(lambda: text(chosen.ds, "ViewPosition"))
    series.view_position = series.view_position.upper() if series.view_position else None
    series.instances = (InstanceRef(chosen.sop_class_uid, chosen.sop_instance_uid),)
    series.headers = (chosen.ds,)


def _view_of(ds: Dataset) -> tuple[RadiographView, tuple[np.ndarray, np.ndarray] | None]:
    patient_orientation = safe(lambda: attribute_values(ds, "PatientOrientation"))
    view_position = safe(lambda: text(ds, "ViewPosition"))
    return radiograph_view(view_position, patient_orientation), patient_orientation_directions(ds)


# How each analysed modality becomes a volume.
_SERIES_BUILDERS: dict[Modality, Callable[[Series, str, list[Instance], list[Notice]], None]] = {
    Modality.CT: _build_cross_sectional,
    Modality.MR: _build_cross_sectional,
    Modality.XR: _build_projection,
}
