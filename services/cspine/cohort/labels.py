"""A study's labels, read against its images as ingest placed them: DICOM SEG objects (structure labels) and
``boxes.json`` (tumor boxes). Each label is matched to its source series by geometry, never by file name: the
SEG's frame of reference, pixel spacing and orientation must be the series', and every frame must lie on one of
its slices. What does not hold is a :class:`Problem`, so ``cspine cohort check`` can report every one.

A SEG gives, for the series it labels, a label map [K, R, C] in the modality's model table (``SEG_LABELS``), in
ingest's slice order: what training on the cohort reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from cspine.cohort.codes import PAINT_ORDER, CodeMap, Meaning, model_label
from cspine.domain import Modality, Series, Study, Volume
from cspine.inference.specs import SEG_LABELS

BOXES_FILE = "boxes.json"
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
ORIENTATION_TOLERANCE = 1e-3  # direction cosines
SPACING_TOLERANCE_MM = 1e-3
POSITION_TOLERANCE_MM = 0.05  # a frame's in-plane origin against its slice's
SLICE_TOLERANCE = 0.25  # a frame's distance from its slice, in slice spacings
SHOWN = 3  # of many frames or boxes with the same problem, how many are named


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" stops training on the cohort; "warning" is worth a look; "info" is told only
    code: str
    message: str


@dataclass
class SeriesLabels:
    """The structure labels of one image series, from one SEG."""

    series_instance_uid: str
    modality: Modality
    source: str  # the SEG's file, relative to the study
    labels: np.ndarray | None  # [K, R, C] uint8 in SEG_LABELS[modality]; None once a cohort check dropped it
    voxels: dict[str, int] = field(default_factory=dict)  # per label of the table, labelled voxels


@dataclass(frozen=True)
class Box:
    """A tumor box on one series: voxel index ranges, inclusive (a radiograph's K range is 0…0)."""

    series_instance_uid: str
    first: tuple[int, int, int]
    last: tuple[int, int, int]


def _error(code: str, message: str) -> Problem:
    return Problem("error", code, message)


def _code(item: Dataset, keyword: str) -> tuple[str, str, str] | None:
    seq = item.get(keyword)
    if not seq:
        return None
    code = seq[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return str(code.get("CodingSchemeDesignator", "")), str(value), str(code.get("CodeMeaning", ""))


def _referenced_series(ds: Dataset, study: Study) -> Series | None:
    """The image series a SEG labels: its Referenced Series Sequence, else the series holding the instances its
    frames were derived from."""
    images = {s.series_instance_uid: s for s in study.image_series()}
    for item in ds.get("ReferencedSeriesSequence", []):
        uid = str(item.get("SeriesInstanceUID", ""))
        if uid in images:
            return images[uid]
    sources = set()
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                sources.add(str(source.get("ReferencedSOPInstanceUID", "")))
    for series in images.values():
        if sources & {ref.sop_instance_uid for ref in series.instances}:
            return series
    return None


def _functional(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """A functional group macro's item for one frame: per-frame first, else shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame) and sequence in per_frame[frame]:
        return per_frame[frame][sequence][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and sequence in shared[0]:
        return shared[0][sequence][0]
    return None


def _slice_indices(ds: Dataset, volume: Volume, frames: int, problems: list[Problem]) -> list[int] | None:
    """The slice of the series each frame lies on, checking orientation, spacing and positions; None (with the
    problems) when the SEG's geometry is not the series'."""
    if volume.projection:
        return [0] * frames
    errors = len(problems)
    orientation = _functional(ds, 0, "PlaneOrientationSequence")
    measures = _functional(ds, 0, "PixelMeasuresSequence")
    if orientation is None or measures is None or "PixelSpacing" not in measures:
        problems.append(_error("geometry", "the SEG gives no plane orientation or pixel spacing for its frames"))
        return None
    iop = np.array([float(v) for v in orientation.ImageOrientationPatient])
    expected = np.concatenate([volume.row_direction, volume.column_direction])
    if np.abs(iop - expected).max() > ORIENTATION_TOLERANCE:
        problems.append(
            _error(
                "geometry",
                f"orientation {np.round(iop, 4).tolist()} is not the series' {np.round(expected, 4).tolist()}",
            )
        )
    spacing = np.array([float(v) for v in measures.PixelSpacing])
    if np.abs(spacing - np.array(volume.pixel_spacing)).max() > SPACING_TOLERANCE_MM:
        problems.append(
            _error(
                "geometry",
                f"pixel spacing {np.round(spacing, 4).tolist()} mm is not the series' "
                f"{np.round(volume.pixel_spacing, 4).tolist()} mm",
            )
        )
    if len(problems) > errors:
        return None
    normal = volume.slice_direction
    positions = volume.slice_positions()
    indices: list[int] = []
    off: list[str] = []
    for frame in range(frames):
        plane = _functional(ds, frame, "PlanePositionSequence")
        if plane is None or "ImagePositionPatient" not in plane:
            problems.append(_error("geometry", f"frame {frame + 1} has no position"))
            return None
        position = np.array([float(v) for v in plane.ImagePositionPatient])
        offset = float(np.dot(position - volume.origin, normal))
        k = int(np.argmin(np.abs(volume.slice_offsets - offset)))
        along = abs(volume.slice_offsets[k] - offset)
        across = np.linalg.norm(position - positions[k] - np.dot(position - positions[k], normal) * normal)
        if along > SLICE_TOLERANCE * max(volume.slice_spacing, 1e-6) or across > POSITION_TOLERANCE_MM:
            off.append(f"frame {frame + 1} at {np.round(position, 2).tolist()}")
        indices.append(k)
    if off:
        shown = ", ".join(off[:SHOWN]) + (f" and {len(off) - SHOWN} more" if len(off) > SHOWN else "")
        problems.append(_error("geometry", f"{len(off)} frame(s) lie on no slice of the series: {shown}"))
        return None
    return indices


def _masks(ds: Dataset, frames: int) -> np.ndarray:
    """[F, R, C] bool: the SEG's frames (a fractional SEG's at half its maximum)."""
    pixels = np.asarray(ds.pixel_array)
    pixels = pixels.reshape(frames, int(ds.Rows), int(ds.Columns))
    if str(ds.get("SegmentationType", "BINARY")).upper() == "FRACTIONAL":
        return pixels > float(ds.get("MaximumFractionalValue", 255)) / 2
    return pixels > 0


def _frame_segments(ds: Dataset, frames: int) -> list[int]:
    numbers = []
    for frame in range(frames):
        item = _functional(ds, frame, "SegmentIdentificationSequence")
        numbers.append(int(item.ReferencedSegmentNumber) if item is not None else 0)
    return numbers


def read_seg(ds: Dataset, source: str, study: Study, codes: CodeMap) -> tuple[SeriesLabels | None, list[Problem]]:
    """The label map a SEG (``ds``, with pixel data) gives its source series in ``study``, and its problems; None
    where an error leaves no label map to trust."""
    missing = [k for k in ("Rows", "Columns", "SegmentSequence", "PixelData") if k not in ds]
    if missing:
        return None, [_error("seg_unreadable", f"{source} lacks {', '.join(missing)}: truncated, or not a whole SEG")]
    problems: list[Problem] = []
    series = _referenced_series(ds, study)
    if series is None or series.volume is None or series.modality is None:
        return None, [_error("seg_source", f"{source} labels no image series of the study cspine analyses")]
    volume = series.volume
    modality = series.modality
    name = f"{source} ({modality.value} series {series.series_number or '?'})"
    k, rows, columns = volume.shape
    if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, columns):
        problems.append(
            _error(
                "geometry", f"{name}: frames of {ds.get('Rows')} × {ds.get('Columns')} on images of {rows} × {columns}"
            )
        )
    seg_frame = str(ds.get("FrameOfReferenceUID", "")) or None
    if not volume.projection and seg_frame != series.frame_of_reference_uid:
        problems.append(
            _error(
                "frame_of_reference",
                f"{name}: frame of reference {seg_frame} is not the series' {series.frame_of_reference_uid}",
            )
        )
    if problems:
        return None, problems
    frames = int(ds.get("NumberOfFrames", 1))
    located: list[Problem] = []
    indices = _slice_indices(ds, volume, frames, located)
    if indices is None:
        return None, [Problem(p.severity, p.code, f"{name}: {p.message}") for p in located]
    masks = _masks(ds, frames)
    numbers = _frame_segments(ds, frames)
    names = SEG_LABELS[modality]
    paint: dict[str, np.ndarray] = {}
    for segment in ds.get("SegmentSequence", []):
        number = int(segment.SegmentNumber)
        label = str(segment.get("SegmentLabel", ""))
        what = f"{name} segment {number} ({label!r})"
        type_code = _code(segment, "SegmentedPropertyTypeCodeSequence")
        region = _code(segment, "AnatomicRegionSequence")
        meaning: Meaning | None = None
        if type_code is not None:
            meaning = codes.meaning(type_code[:2], region[:2] if region else None)
        if meaning is None:
            shown = f"({', '.join(type_code)})" if type_code else "no type code"
            problems.append(
                _error(
                    "unmapped_code",
                    f"{what}: {shown} is not a structure cspine knows; map it in codes.csv (docs/cohort.md)",
                )
            )
            continue
        chosen = [f for f in range(frames) if numbers[f] == number]
        mask = np.zeros(volume.shape, dtype=bool)
        for f in chosen:
            mask[indices[f]] |= masks[f]
        if not mask.any():
            problems.append(_error("empty_mask", f"{what}: no labelled voxel"))
            continue
        target, reason = model_label(modality, meaning)
        if target is None:
            problems.append(Problem("info", "not_used", f"{what}: not used ({reason})"))
            continue
        if modality is Modality.XR and meaning.structure == "vertebral_body" and meaning.level is None:
            problems.append(
                Problem(
                    "warning",
                    "body_level",
                    f"{what}: a vertebral body without its vertebra (Anatomic Region) on a radiograph is trained "
                    "as other_body, not as C2 … C7",
                )
            )
        paint.setdefault(target, np.zeros(volume.shape, dtype=bool))
        paint[target] |= mask
    labels = np.zeros(volume.shape, dtype=np.uint8)
    order = {structure: i for i, structure in enumerate(PAINT_ORDER)}
    for target in sorted(paint, key=lambda t: order.get(t, order["vertebral_body"])):
        labels[paint[target]] = names.index(target)
    voxels = {n: int((labels == i).sum()) for i, n in enumerate(names) if i and (labels == i).any()}
    return SeriesLabels(series.series_instance_uid, modality, source, labels, voxels), problems


def _voxel_index(volume: Volume, point: np.ndarray) -> np.ndarray:
    """(k, r, c) continuous voxel index of a patient-space point on a cross-sectional series."""
    d = point - volume.origin
    column = np.dot(d, volume.row_direction) / volume.pixel_spacing[1]
    row = np.dot(d, volume.column_direction) / volume.pixel_spacing[0]
    offset = np.dot(d, volume.slice_direction)
    steps = np.arange(len(volume.slice_offsets), dtype=float)
    if len(steps) > 1:
        k = float(np.interp(offset, volume.slice_offsets, steps, left=np.nan, right=np.nan))
        if np.isnan(k):  # outside the stack: extrapolate with the spacing, so the check can say how far
            k = (offset - volume.slice_offsets[0]) / volume.slice_spacing
    else:
        k = offset
    return np.array([k, row, column])


def read_boxes(path: Path, study: Study) -> tuple[list[Box], list[Problem]]:
    """The tumor boxes of ``boxes.json`` (docs/cohort.md), each checked to lie on its series, inside the images."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
        items = data["boxes"]
        if not isinstance(items, list):
            raise TypeError("'boxes' is not a list")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return [], [_error("boxes", f"{path.name} cannot be read: {type(exc).__name__}: {exc}")]
    images = {s.series_instance_uid: s for s in study.image_series()}
    boxes: list[Box] = []
    problems: list[Problem] = []
    outside: list[str] = []
    for number, item in enumerate(items, start=1):
        what = f"{path.name} box {number}"
        try:
            series = images.get(str(item["series_instance_uid"]))
            if series is None or series.volume is None:
                problems.append(_error("box_series", f"{what}: its series is not among the study's images"))
                continue
            volume = series.volume
            if str(item.get("structure", "tumor")) != "tumor":
                problems.append(_error("boxes", f"{what}: only tumor boxes are read, not {item.get('structure')!r}"))
                continue
            if volume.projection:
                (c0, r0), (c1, r1) = item["corners_px"]
                corners = np.array([[0.0, r0, c0], [0.0, r1, c1]], dtype=float)
            else:
                corners = np.array([_voxel_index(volume, np.array(p, dtype=float)) for p in item["corners_mm"]])
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(_error("boxes", f"{what}: {type(exc).__name__}: {exc} (docs/cohort.md has the format)"))
            continue
        low, high = corners.min(0), corners.max(0)
        limit = np.array(volume.shape, dtype=float) - 0.5
        if (low < -0.5).any() or (high > limit).any():
            beyond = float(max((-0.5 - low).max(), (high - limit).max()))
            outside.append(f"{what} (by {beyond:.1f} voxels)")
            continue
        first = tuple(int(v) for v in np.round(low))
        last = tuple(int(v) for v in np.round(high))
        boxes.append(Box(series.series_instance_uid, first, last))  # type: ignore[arg-type]
    if outside:
        shown = ", ".join(outside[:SHOWN]) + (f" and {len(outside) - SHOWN} more" if len(outside) > SHOWN else "")
        problems.append(_error("box_outside", f"{len(outside)} box(es) reach outside their images: {shown}"))
    return boxes, problems
