"""Where each frame lies in patient space, read at ``StudyBuilder.add``: position, orientation, spacing and
rescale of CT/MR frames (classic, classic multi-frame, enhanced functional groups) and of radiographs; and the
direction arithmetic assembly uses (row/column directions, plane orientation, PatientOrientation letters)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from pydicom.dataset import Dataset

from cspine.dicom.attributes import attribute_values, first_item, float_value, floats, has
from cspine.dicom.records import Frame, Image
from cspine.domain import Modality, Orientation

_PLANE_COSINE = math.cos(math.radians(25.0))  # within 25° of an axis: axial / sagittal / coronal

# The axis a slice normal points along, and what that makes the slices (LPS: x left, y posterior, z up).
_ORIENTATION_BY_NORMAL_AXIS = (Orientation.SAGITTAL, Orientation.CORONAL, Orientation.AXIAL)

# PatientOrientation letters as LPS unit vectors (DICOM PS3.3 C.7.6.1.1.1).
_PATIENT_DIRECTION = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}


def _positive(spacing: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """A spacing, or None when absent or not all positive (zero or negative counts as absent)."""
    return spacing if spacing is not None and min(spacing) > 0 else None


def _rescale(ds: Dataset | None) -> tuple[float | None, float | None]:
    if ds is None:
        return None, None
    return float_value(ds, "RescaleSlope"), float_value(ds, "RescaleIntercept")


def _cross_sectional_frames(ds: Dataset, image: Image) -> tuple[list[Frame] | None, str | None]:
    """Per-frame geometry of a CT/MR instance, or (None, why not)."""
    if has(ds, "PerFrameFunctionalGroupsSequence") or has(ds, "SharedFunctionalGroupsSequence"):
        return _enhanced_frames(ds, image)
    slope, intercept = _rescale(ds)
    slope = slope or 1.0  # a zero or absent slope is "not set", never "make every pixel equal"
    intercept = intercept or 0.0
    position = floats(ds, "ImagePositionPatient", 3)
    orientation = floats(ds, "ImageOrientationPatient", 6)
    spacing = _positive(floats(ds, "PixelSpacing", 2))
    thickness = float_value(ds, "SliceThickness")
    if position is None or orientation is None or spacing is None:
        return None, "no usable ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
    if image.frame_count == 1:
        return [Frame(0, position, orientation, spacing, thickness, slope, intercept)], None
    step = float_value(ds, "SpacingBetweenSlices")
    directions = row_column_directions(orientation)
    if not step or step <= 0 or directions is None:
        return None, "a multi-frame image without per-frame geometry or SpacingBetweenSlices"
    normal = np.cross(*directions)
    frames = [
        Frame(i, tuple(np.asarray(position) + i * step * normal), orientation, spacing, thickness, slope, intercept)
        for i in range(image.frame_count)
    ]
    return frames, None


def _enhanced_frames(ds: Dataset, image: Image) -> tuple[list[Frame] | None, str | None]:
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != image.frame_count:
        return None, f"{len(per_frame)} per-frame functional groups for {image.frame_count} frames"
    top_slope, top_intercept = _rescale(ds)

    def group(frame: Dataset | None, keyword: str) -> Dataset | None:
        # A per-frame item overrides the shared one (PS3.3 C.7.6.16).
        return first_item(frame, keyword) or first_item(shared, keyword)

    frames = []
    for index in range(image.frame_count):
        item = per_frame[index] if per_frame else None
        measures = group(item, "PixelMeasuresSequence")
        slope, intercept = _rescale(group(item, "PixelValueTransformationSequence"))
        frames.append(
            Frame(
                index=index,
                position=floats(group(item, "PlanePositionSequence"), "ImagePositionPatient", 3),
                orientation=floats(group(item, "PlaneOrientationSequence"), "ImageOrientationPatient", 6),
                spacing=_positive(floats(measures, "PixelSpacing", 2)),
                thickness=float_value(measures, "SliceThickness") if measures is not None else None,
                slope=slope or top_slope or 1.0,
                intercept=intercept if intercept is not None else (top_intercept or 0.0),
            )
        )
    if any(f.position is None or f.orientation is None or f.spacing is None for f in frames):
        return None, "functional groups without position, orientation or pixel spacing for every frame"
    return frames, None


def _radiograph_spacing(ds: Dataset) -> tuple[float, float] | None:
    """Pixel spacing in the patient plane: PixelSpacing, else ImagerPixelSpacing / magnification.

    A zero or negative spacing counts as absent (some CR writers fill PixelSpacing with zeros)."""

    spacing = _positive(floats(ds, "PixelSpacing", 2))
    if spacing is None:
        imager = _positive(floats(ds, "ImagerPixelSpacing", 2))
        if imager is None:
            return None
        magnification = float_value(ds, "EstimatedRadiographicMagnificationFactor")
        factor = magnification if magnification and magnification > 0 else 1.0
        spacing = (imager[0] / factor, imager[1] / factor)
    return (float(spacing[0]), float(spacing[1]))


def _radiograph_frames(ds: Dataset, image: Image) -> tuple[list[Frame] | None, str | None]:
    image.pixel_spacing_xr = _radiograph_spacing(ds)
    if image.pixel_spacing_xr is None:
        return None, "no PixelSpacing or ImagerPixelSpacing"
    slope, intercept = _rescale(ds)
    return [Frame(0, None, None, image.pixel_spacing_xr, None, slope or 1.0, intercept or 0.0)], None


# Which geometry reader applies to which analysed modality.
FRAME_READERS: dict[Modality, Callable[[Dataset, Image], tuple[list[Frame] | None, str | None]]] = {
    Modality.CT: _cross_sectional_frames,
    Modality.MR: _cross_sectional_frames,
    Modality.XR: _radiograph_frames,
}


def row_column_directions(orientation: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Unit row and column directions of an ImageOrientationPatient, or None when it is unusable."""
    if orientation is None:
        return None
    row, column = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    row_norm, column_norm = np.linalg.norm(row), np.linalg.norm(column)
    if not (0.9 < row_norm < 1.1 and 0.9 < column_norm < 1.1):
        return None
    row, column = row / row_norm, column / column_norm
    if abs(float(row @ column)) > 0.05:
        return None
    column = column - (column @ row) * row  # remove rounding so that the slice direction is a unit vector
    return row, column / np.linalg.norm(column)


def orientation_of(normal: np.ndarray) -> Orientation:
    axis = int(np.argmax(np.abs(normal)))
    return _ORIENTATION_BY_NORMAL_AXIS[axis] if abs(normal[axis]) >= _PLANE_COSINE else Orientation.OBLIQUE


def patient_orientation_directions(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column directions from PatientOrientation ('A\\F' …), or None when absent or unusable."""
    try:
        values = attribute_values(ds, "PatientOrientation")
    except Exception:
        return None
    if not values or len(values) != 2:
        return None
    vectors = []
    for letters in values:
        letters = str(letters).strip().upper()
        if not letters or any(c not in _PATIENT_DIRECTION for c in letters):
            return None
        vector = np.sum([_PATIENT_DIRECTION[c] for c in letters], axis=0)
        vectors.append(vector / np.linalg.norm(vector))
    row, column = vectors
    if abs(float(row @ column)) > 0.75:  # 'A\A' or 'AF\F' name no plane
        return None
    column = column - (column @ row) * row
    return row, column / np.linalg.norm(column)
