"""DICOM ingest: Part-10 instances, in any order, become one :class:`~cspine.domain.Study`.

``StudyBuilder.add`` reads an instance's header at once and refuses a bad instance at once (so a gRPC
stream can stop early); ``StudyBuilder.build`` groups the instances by SeriesInstanceUID, places them in
patient space, decodes the pixels and returns the study. ``ingest`` and ``ingest_paths`` wrap the two.

Decisions a reader of the results should know:

* **Slice order** is the projection of ImagePositionPatient on the slice normal (row × column direction of
  ImageOrientationPatient); InstanceNumber and file names never order slices. ``slice_offsets`` keep the
  true positions, so gaps and irregular spacing stay visible.
* **Pixel values** are float32 in modality units: the Modality LUT is applied (RescaleSlope/Intercept —
  per frame from the functional groups for enhanced multi-frame — or a Modality LUT Sequence). VOI LUTs
  and windows are not applied.
* **MONOCHROME1** is inverted after the rescale, ``v' = lo + hi - v``, where ``[lo, hi]`` is the range the
  stored bits can hold (BitsStored, PixelRepresentation) mapped through the rescale. Higher values are then
  brighter on display, as for MONOCHROME2, and the mapping does not depend on the image content.
* **Duplicates**: the same SOPInstanceUID twice keeps the first received; two instances at one slice
  position (within 0.01 mm) keep the lowest InstanceNumber. Both leave a DUPLICATE_INSTANCE notice.
* **Gaps**: a step larger than 1.5× the median spacing leaves a MISSING_SLICES notice saying how many
  slices are missing and where; nothing is interpolated. Any other step more than 5 % off the median
  leaves an IRREGULAR_SPACING notice.
* **Multi-frame**: enhanced CT/MR take position, orientation, spacing and rescale per frame from the
  functional groups (per-frame items override shared ones). A classic multi-frame instance is a frame
  stack only with ImagePositionPatient, ImageOrientationPatient and SpacingBetweenSlices; otherwise its
  series gets UNSUPPORTED_IMAGE.
* **Radiographs** (DX, CR — "for processing" too) have no slice plane: one image per series (a lateral one
  when a series holds several), ``projection=True``, origin zero, pixel spacing from PixelSpacing, else
  ImagerPixelSpacing divided by EstimatedRadiographicMagnificationFactor (when given), directions from
  PatientOrientation (else row = patient left, column = feet).
* **Not analysed**: other image modalities (US, PT, NM, XA, OT …) and colour images become series without
  a volume and with an UNSUPPORTED_IMAGE notice; their pixels are never decoded. Non-image objects (SR,
  SEG, RT, PR, KO, waveforms, PDFs …) become series without a volume and with a NOT_AN_IMAGE notice; a
  DICOMDIR leaves a NOT_AN_IMAGE notice only.
* **Refusals** raise a :class:`~cspine.errors.CspineError` naming the instance label and the reason; no
  exception of pydicom, numpy or a decoder leaves this module.

Memory: the builder holds each instance's raw bytes (native pixel data is read in place, never copied)
until ``build`` decodes it straight into the series' preallocated float32 volume and lets the bytes go.
``Series.headers`` keep the pydicom datasets without pixel data. A builder is not thread-safe.
"""

from __future__ import annotations

import concurrent.futures
import enum
import functools
import io
import itertools
import logging
import math
import os
import struct
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.uid
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import data_element_generator
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as pydicom_pixel_array
from pydicom.tag import BaseTag

from cspine.config import IngestLimits
from cspine.dicom.selection import RadiographView, radiograph_view, series_name
from cspine.domain import (
    InstanceRef,
    Modality,
    Notice,
    NoticeCode,
    Orientation,
    Series,
    Study,
    Volume,
)
from cspine.errors import (
    CspineError,
    EmptyStudyError,
    FrameTooLargeError,
    InconsistentSeriesError,
    InvalidInputError,
    MalformedDicomError,
    MissingPixelDataError,
    MixedStudiesError,
    NotDicomError,
    StudyTooLargeError,
    TruncatedDicomError,
    UndecodablePixelDataError,
)

logger = logging.getLogger(__name__)

__all__ = ["MODALITY_BY_DICOM", "StudyBuilder", "iter_files", "ingest", "ingest_paths"]

# --------------------------------------------------------------------------------------------------------
# Tables

#: The DICOM modalities cspine analyses, and what they become. DX "for processing" is DX too.
MODALITY_BY_DICOM: dict[str, Modality] = {
    "CT": Modality.CT,
    "MR": Modality.MR,
    "DX": Modality.XR,
    "CR": Modality.XR,
}

# Modality (0008,0060) values of objects that carry no image, even when they carry pixel data (SEG, RTDOSE).
_NON_IMAGE_MODALITIES = frozenset(
    {
        "SR",
        "SEG",
        "RTSTRUCT",
        "RTPLAN",
        "RTDOSE",
        "RTRECORD",
        "RTTREAT",
        "PR",
        "KO",
        "DOC",
        "ECG",
        "EPS",
        "HD",
        "AU",
        "RESP",
        "REG",
        "FID",
        "PLAN",
        "RWV",
        "SMR",
        "M3D",
        "AR",
        "LEN",
        "KER",
        "OAM",
        "OPM",
        "OPT",
        "POS",
        "VA",
    }
)
# Words in a SOP class name that mark a non-image object (pydicom knows every standard SOP class by name).
_NON_IMAGE_SOP_CLASS_WORDS = (
    "SR Storage",
    "Presentation State",
    "Waveform",
    "Encapsulated",
    "Key Object",
    "RT Plan",
    "RT Structure",
    "RT Dose",
    "Treatment Record",
    "Segmentation",
    "Surface",
    "Raw Data",
    "Registration",
    "Fiducials",
    "Real World Value Mapping",
    "Media Storage Directory",
    "Measurement",
    "Parametric Map",
    "Tractography",
    "Contour",
    "Annotation",
    "Storage Commitment",
)

_IMAGE_SOP_CLASS_WORD = "Image"  # "CT Image Storage", "Enhanced MR Image Storage", "… X-Ray Image Storage …"

_GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})

# Tolerances, in millimetres unless said otherwise.
_SAME_POSITION_MM = 0.01  # two slices this close are one position
_GAP_FACTOR = 1.5  # a step larger than this × the median spacing is a gap
_IRREGULAR_FRACTION = 0.05  # a step this far off the median is irregular
_IRREGULAR_MIN_MM = 0.01
_ORIENTATION_TOLERANCE = 0.01  # largest difference of direction cosines inside one series
_SPACING_TOLERANCE = 0.001  # largest relative difference of pixel spacing inside one series
_DECODE_THREADS = min(4, os.cpu_count() or 1)  # threads converting native pixel data (see _decode_all)
# A frame counts as at least this many voxels against max_study_voxels: what ingest holds per frame (its
# geometry, its InstanceRef: ~0.7 KiB) is then covered by the 4 bytes a voxel is budgeted, however few
# pixels the frame has (a 2 KB upload may declare 20,000 frames of 1 × 1 pixel).
_MIN_FRAME_VOXELS = 64 * 64
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
# A radiograph without PatientOrientation is shown as an AP view: row toward the patient's left, column down.
_NOMINAL_RADIOGRAPH_DIRECTIONS = (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0]))

# Decoder plugins ingest lets pydicom use, best first. GDCM is left out on purpose: on some malformed input
# it throws a C++ exception that nothing catches, and the process aborts (found by fuzzing).
_DECODING_PLUGIN_PREFERENCE = ("pylibjpeg", "pyjpegls", "pydicom", "pillow")

_PIXEL_TAGS = {
    tag_for_keyword("PixelData"): "PixelData",
    tag_for_keyword("FloatPixelData"): "FloatPixelData",
    tag_for_keyword("DoubleFloatPixelData"): "DoubleFloatPixelData",
}
_UNDEFINED_LENGTH = 0xFFFFFFFF

# Stored pixel dtypes of native pixel data read in place: (BitsAllocated, PixelRepresentation) → dtype.
_NATIVE_DTYPE = {
    (8, 0): np.uint8,
    (8, 1): np.int8,
    (16, 0): np.uint16,
    (16, 1): np.int16,
    (32, 0): np.uint32,
    (32, 1): np.int32,
}


class _Kind(enum.Enum):
    """What an uploaded object is, as far as ingest cares."""

    IMAGE = "image"
    NON_IMAGE = "non-image"
    DIRECTORY = "directory"  # DICOMDIR


# --------------------------------------------------------------------------------------------------------
# Reading attributes
#
# pydicom converts a raw element on first access through several layers (~10 µs each); a 512² slice leaves
# ingest about 0.6 ms in all if it is to keep pace with bare pydicom, so the ~20 attributes read from every
# instance are decoded here straight from pydicom's raw element. Anything unusual (an unexpected VR, a value
# that does not parse) falls back to pydicom's own conversion, so the fast path never changes a result.


def _decode_us(value: bytes, little_endian: bool) -> tuple[int, ...]:
    count = len(value) // 2
    if count * 2 != len(value):
        raise ValueError("odd length")
    return struct.unpack(("<" if little_endian else ">") + "H" * count, value)


def _split_text(value: bytes) -> list[str]:
    return [part.strip(" \x00") for part in value.decode("ascii").split("\\")]


def _decode_is(value: bytes, little_endian: bool) -> tuple[int, ...]:
    return tuple(int(part) for part in _split_text(value) if part)


def _decode_ds(value: bytes, little_endian: bool) -> tuple[float, ...]:
    numbers = tuple(float(part) for part in _split_text(value) if part)
    if not all(math.isfinite(n) for n in numbers):
        raise ValueError("not finite")
    return numbers


def _decode_text(value: bytes, little_endian: bool) -> tuple[str, ...]:
    return tuple(part for part in _split_text(value) if part)


_RAW_DECODERS: dict[str, Callable[[bytes, bool], tuple[Any, ...]]] = {
    "US": _decode_us,
    "IS": _decode_is,
    "DS": _decode_ds,
    "UI": _decode_text,
    "CS": _decode_text,
}


@functools.cache
def _tag(keyword: str) -> tuple[BaseTag, str]:
    """(tag, dictionary VR) of a keyword; looking a keyword up costs microseconds, so it is done once."""
    tag = BaseTag(tag_for_keyword(keyword))
    return tag, dictionary_VR(tag)


def _has(ds: Dataset | None, keyword: str) -> bool:
    return ds is not None and _tag(keyword)[0] in ds


def _values(ds: Dataset, keyword: str) -> tuple[Any, ...] | None:
    """The values of an attribute of ``ds`` as a tuple; None when absent or empty."""
    tag, vr = _tag(keyword)
    elem = ds.get_item(tag)
    if elem is None:
        return None
    if isinstance(elem, RawDataElement) and elem.value is not None:
        decoder = _RAW_DECODERS.get(vr)
        if decoder is not None and elem.VR in (None, vr):
            try:
                values = decoder(elem.value, elem.is_little_endian)
            except (ValueError, UnicodeDecodeError, struct.error):
                pass
            else:
                return values or None
    value = ds[tag].value
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(value) or None
    return (value,)


def _text(ds: Dataset, keyword: str) -> str | None:
    values = _values(ds, keyword)
    return str(values[0]).strip() or None if values else None


def _int(ds: Dataset, keyword: str) -> int | None:
    values = _values(ds, keyword)
    if not values:
        return None
    number = float(values[0])
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{keyword} is not an integer")
    return int(number)


def _float(ds: Dataset, keyword: str) -> float | None:
    values = _values(ds, keyword)
    if not values:
        return None
    number = float(values[0])
    return number if math.isfinite(number) else None


def _floats(ds: Dataset | None, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite numbers, or None when the attribute is absent or has another shape."""
    if ds is None:
        return None
    values = _values(ds, keyword)
    if not values or len(values) != count:
        return None
    numbers = tuple(float(v) for v in values)
    return numbers if all(math.isfinite(n) for n in numbers) else None


def _item(ds: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of a sequence attribute, or None."""
    if not _has(ds, keyword):
        return None
    sequence = ds[keyword].value
    return sequence[0] if sequence else None


def _tag_name(tag: int) -> str:
    return keyword_for_tag(tag) or f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


# --------------------------------------------------------------------------------------------------------
# What add() learns about an instance


@dataclass(frozen=True)
class _Frame:
    """One 2-D image of an instance, with its own geometry and rescale."""

    index: int  # 0-based frame of its instance
    position: tuple[float, ...] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient
    spacing: tuple[float, ...] | None  # PixelSpacing (row, column)
    thickness: float | None
    slope: float
    intercept: float


@dataclass
class _Pixels:
    """Where the pixel data lies in the raw bytes, and how it is encoded."""

    source: Any  # the instance's bytes (kept until decoded), or the Path of its file
    offset: int  # first byte of the value (native) or of the first item (encapsulated)
    length: int
    encapsulated: bool
    keyword: str  # PixelData, FloatPixelData or DoubleFloatPixelData
    deflated: bool


@dataclass
class _Image:
    """The pixel description of an image instance."""

    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    frame_count: int
    modality_lut: bool
    frames: list[_Frame] | None = None  # None: no usable geometry (see geometry_problem)
    geometry_problem: str | None = None
    pixel_spacing_xr: tuple[float, float] | None = None  # radiographs: spacing in the patient plane

    @property
    def greyscale(self) -> bool:
        return self.samples == 1 and self.photometric in _GREYSCALE


@dataclass
class _Instance:
    label: str
    ds: Dataset  # header without pixel data
    kind: _Kind
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    dicom_modality: str
    instance_number: int | None
    image: _Image | None = None
    pixels: _Pixels | None = None

    @property
    def order(self) -> tuple[float, str]:
        """Sort key "first by InstanceNumber": numbered instances first, then by SOP instance UID."""
        number = self.instance_number if self.instance_number is not None else math.inf
        return (number, self.sop_instance_uid)


# --------------------------------------------------------------------------------------------------------
# Parsing


def _open_source(source: Any) -> Any:
    """A binary stream over the instance: its bytes (no copy) or its file."""
    return open(source, "rb") if isinstance(source, Path) else io.BytesIO(source)


def _source_size(source: Any, stream: Any) -> int:
    return os.fstat(stream.fileno()).st_size if isinstance(source, Path) else len(source)


def _parse(label: str, source: Any, max_inflated: int) -> tuple[Dataset, _Pixels | None]:
    """Parse the header once, and locate the pixel data without reading it.

    ``source`` is the instance's bytes, or the Path of its file (whose pixel data is then read at decode).
    A deflated data set may inflate to at most ``max_inflated`` bytes.
    """
    with _open_source(source) as stream:
        size = _source_size(source, stream)
        _check_inflated_size(label, stream, max_inflated)
        try:
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
        except InvalidDicomError:
            raise NotDicomError(label, "not a DICOM Part-10 file (no 'DICM' prefix after the preamble)") from None
        except (EOFError, struct.error):
            raise TruncatedDicomError(label, "the file ends inside its header") from None
        except OSError as exc:
            # pydicom reports a sequence cut short as an OSError ("No tag to read at file position …").
            raise TruncatedDicomError(label, f"the file ends inside a sequence ({type(exc).__name__})") from None
        except Exception as exc:  # pydicom raises many kinds on garbage; none may leave ingest
            raise NotDicomError(label, f"the header cannot be parsed as DICOM ({type(exc).__name__})") from None
        ds.buffer = None  # the dataset must not keep the upload alive once the pixels are decoded
        _check_header_complete(label, ds, stream, size)
        if _text(ds.file_meta, "TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
            return ds, _locate_deflated_pixels(label, source)
        return ds, _locate_pixels(label, source, size, stream, ds)


_DEFLATED_SYNTAX = pydicom.uid.DeflatedExplicitVRLittleEndian.encode("ascii")
_INFLATE_STEP = 16 * 1024 * 1024


def _check_inflated_size(label: str, stream: Any, limit: int) -> None:
    """pydicom inflates a deflated data set in one piece, so a small upload could inflate to gigabytes (a
    zip bomb). Inflate it first in bounded steps, only counting, and refuse it beyond ``limit``.

    Runs before pydicom has read the file meta, so it finds the data set's start from the File Meta
    Information Group Length, which Part 10 requires."""
    head = stream.read(144)
    try:
        if len(head) < 144 or head[128:132] != b"DICM":
            return  # pydicom refuses it
        group, element, vr, _, group_length = struct.unpack("<HH2sHI", head[132:144])
        has_group_length = (group << 16 | element) == _tag("FileMetaInformationGroupLength")[0] and vr == b"UL"
        meta = stream.read(group_length if has_group_length else 4096)
        if _DEFLATED_SYNTAX not in meta:
            return
        if not has_group_length:
            raise NotDicomError(label, "a deflated file without File Meta Information Group Length")
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        pending, total = stream.read(), 0
        while pending and total <= limit:
            total += len(inflater.decompress(pending, _INFLATE_STEP))
            pending = inflater.unconsumed_tail
        if total > limit:
            raise StudyTooLargeError(f"instance {label}: the deflated data set inflates to more than {limit} bytes")
    except zlib.error:
        pass  # pydicom will fail on it, and say so
    finally:
        stream.seek(0)


def _check_header_complete(label: str, ds: Dataset, stream: Any, size: int) -> None:
    """pydicom stops silently where a file ends: a cut inside the last attribute's value, or a few bytes
    after it that make no attribute header, mean a truncated file."""
    tags = list(ds.keys())  # in the order read from the file
    if not tags:
        raise TruncatedDicomError(label, "the data set is empty or ends inside its first attribute")
    last = ds.get_item(tags[-1], keep_deferred=True)
    if not isinstance(last, RawDataElement) or last.length == _UNDEFINED_LENGTH or last.value is None:
        return
    if len(last.value) < last.length:
        raise TruncatedDicomError(label, f"the file ends inside attribute {_tag_name(last.tag)}")
    end = last.value_tell + last.length
    if stream.tell() >= size and 0 < size - end < 8:
        raise TruncatedDicomError(label, f"the file ends inside the attribute after {_tag_name(last.tag)}")


def _locate_pixels(label: str, source: Any, size: int, stream: Any, ds: Dataset) -> _Pixels | None:
    """Read the pixel data element's header where ``stop_before_pixels`` left the stream."""
    if stream.tell() >= size:
        return None
    implicit_vr, little_endian = ds.original_encoding
    if implicit_vr is None:
        return None
    elements = data_element_generator(stream, implicit_vr, little_endian, defer_size=0)
    try:
        elem = next(elements, None)
    except EOFError:
        raise TruncatedDicomError(label, "the file ends inside the encapsulated pixel data") from None
    except Exception as exc:
        raise UndecodablePixelDataError(
            label, f"the pixel data element cannot be read ({type(exc).__name__})"
        ) from None
    if elem is None or elem.tag not in _PIXEL_TAGS:
        return None
    keyword = _PIXEL_TAGS[elem.tag]
    if elem.length == _UNDEFINED_LENGTH:
        # The stream now stands after the sequence delimiter item (8 bytes).
        end = stream.tell() - 8
        return _Pixels(source, elem.value_tell, end - elem.value_tell, True, keyword, False)
    if elem.value_tell + elem.length > size:
        have = size - elem.value_tell
        raise TruncatedDicomError(label, f"the pixel data ends after {have} of its {elem.length} bytes")
    return _Pixels(source, elem.value_tell, elem.length, False, keyword, False)


def _locate_deflated_pixels(label: str, source: Any) -> _Pixels | None:
    """Deflated files are inflated by pydicom; read the whole data set to see the pixel data's length."""
    try:
        with _open_source(source) as stream:
            full = pydicom.dcmread(stream)
        keyword = next((k for k in _PIXEL_TAGS.values() if k in full), None)
        if keyword is None:
            return None
        elem = full[keyword]
        length = len(elem.value) if elem.value is not None else 0
    except Exception as exc:
        raise TruncatedDicomError(label, f"the deflated data set cannot be read ({type(exc).__name__})") from None
    return _Pixels(source, 0, length, bool(elem.is_undefined_length), keyword, True)


@functools.cache
def _sop_class_name(sop_class_uid: str) -> str:
    return pydicom.uid.UID(sop_class_uid).name if sop_class_uid else ""


def _classify(ds: Dataset, sop_class_uid: str, modality: str, has_pixels: bool) -> _Kind:
    if sop_class_uid == pydicom.uid.MediaStorageDirectoryStorage or _has(ds, "DirectoryRecordSequence"):
        return _Kind.DIRECTORY
    name = _sop_class_name(sop_class_uid)
    if modality in _NON_IMAGE_MODALITIES or any(word in name for word in _NON_IMAGE_SOP_CLASS_WORDS):
        return _Kind.NON_IMAGE
    if has_pixels or _IMAGE_SOP_CLASS_WORD in name or (_has(ds, "Rows") and _has(ds, "Columns")):
        return _Kind.IMAGE
    return _Kind.NON_IMAGE


def _required_text(label: str, ds: Dataset, keyword: str) -> str:
    value = _text(ds, keyword)
    if not value:
        raise MalformedDicomError(label, f"{keyword} is missing")
    return value


def _read_image(label: str, ds: Dataset) -> _Image:
    """The Image Pixel module, validated."""
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    bits_allocated = _int(ds, "BitsAllocated")
    if not rows or not columns or rows <= 0 or columns <= 0:
        raise MalformedDicomError(label, "Rows or Columns is missing or not positive")
    if bits_allocated is None or not (bits_allocated == 1 or (bits_allocated % 8 == 0 and 8 <= bits_allocated <= 64)):
        raise MalformedDicomError(label, f"BitsAllocated {bits_allocated} is not usable")
    samples = _int(ds, "SamplesPerPixel") or 1
    bits_stored = _int(ds, "BitsStored") or bits_allocated
    frame_count = _int(ds, "NumberOfFrames") or 1
    if samples <= 0 or frame_count <= 0 or not 0 < bits_stored <= bits_allocated:
        raise MalformedDicomError(label, "SamplesPerPixel, NumberOfFrames or BitsStored is not usable")
    photometric = (_text(ds, "PhotometricInterpretation") or ("MONOCHROME2" if samples == 1 else "RGB")).upper()
    return _Image(
        rows=rows,
        columns=columns,
        samples=samples,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=_int(ds, "PixelRepresentation") == 1,
        photometric=photometric,
        frame_count=frame_count,
        modality_lut=_has(ds, "ModalityLUTSequence"),
    )


def _frame_bytes(image: _Image) -> int:
    return image.rows * image.columns * image.samples * math.ceil(image.bits_allocated / 8)


def _native_bytes_needed(image: _Image) -> int:
    if image.bits_allocated == 1:
        return math.ceil(image.rows * image.columns * image.samples * image.frame_count / 8)
    return _frame_bytes(image) * image.frame_count


# --------------------------------------------------------------------------------------------------------
# Geometry read at add() time


def _positive(spacing: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """A spacing, or None when absent or not all positive (zero or negative counts as absent)."""
    return spacing if spacing is not None and min(spacing) > 0 else None


def _rescale(ds: Dataset | None) -> tuple[float | None, float | None]:
    if ds is None:
        return None, None
    return _float(ds, "RescaleSlope"), _float(ds, "RescaleIntercept")


def _cross_sectional_frames(ds: Dataset, image: _Image) -> tuple[list[_Frame] | None, str | None]:
    """Per-frame geometry of a CT/MR instance, or (None, why not)."""
    if _has(ds, "PerFrameFunctionalGroupsSequence") or _has(ds, "SharedFunctionalGroupsSequence"):
        return _enhanced_frames(ds, image)
    slope, intercept = _rescale(ds)
    slope = slope or 1.0  # a zero or absent slope is "not set", never "make every pixel equal"
    intercept = intercept or 0.0
    position = _floats(ds, "ImagePositionPatient", 3)
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _positive(_floats(ds, "PixelSpacing", 2))
    thickness = _float(ds, "SliceThickness")
    if position is None or orientation is None or spacing is None:
        return None, "no usable ImagePositionPatient, ImageOrientationPatient or PixelSpacing"
    if image.frame_count == 1:
        return [_Frame(0, position, orientation, spacing, thickness, slope, intercept)], None
    step = _float(ds, "SpacingBetweenSlices")
    directions = _directions(orientation)
    if not step or step <= 0 or directions is None:
        return None, "a multi-frame image without per-frame geometry or SpacingBetweenSlices"
    normal = np.cross(*directions)
    frames = [
        _Frame(i, tuple(np.asarray(position) + i * step * normal), orientation, spacing, thickness, slope, intercept)
        for i in range(image.frame_count)
    ]
    return frames, None


def _enhanced_frames(ds: Dataset, image: _Image) -> tuple[list[_Frame] | None, str | None]:
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != image.frame_count:
        return None, f"{len(per_frame)} per-frame functional groups for {image.frame_count} frames"
    top_slope, top_intercept = _rescale(ds)

    def group(frame: Dataset | None, keyword: str) -> Dataset | None:
        # A per-frame item overrides the shared one (PS3.3 C.7.6.16).
        return _item(frame, keyword) or _item(shared, keyword)

    frames = []
    for index in range(image.frame_count):
        item = per_frame[index] if per_frame else None
        measures = group(item, "PixelMeasuresSequence")
        slope, intercept = _rescale(group(item, "PixelValueTransformationSequence"))
        frames.append(
            _Frame(
                index=index,
                position=_floats(group(item, "PlanePositionSequence"), "ImagePositionPatient", 3),
                orientation=_floats(group(item, "PlaneOrientationSequence"), "ImageOrientationPatient", 6),
                spacing=_positive(_floats(measures, "PixelSpacing", 2)),
                thickness=_float(measures, "SliceThickness") if measures is not None else None,
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

    spacing = _positive(_floats(ds, "PixelSpacing", 2))
    if spacing is None:
        imager = _positive(_floats(ds, "ImagerPixelSpacing", 2))
        if imager is None:
            return None
        magnification = _float(ds, "EstimatedRadiographicMagnificationFactor")
        factor = magnification if magnification and magnification > 0 else 1.0
        spacing = (imager[0] / factor, imager[1] / factor)
    return (float(spacing[0]), float(spacing[1]))


def _radiograph_frames(ds: Dataset, image: _Image) -> tuple[list[_Frame] | None, str | None]:
    image.pixel_spacing_xr = _radiograph_spacing(ds)
    if image.pixel_spacing_xr is None:
        return None, "no PixelSpacing or ImagerPixelSpacing"
    slope, intercept = _rescale(ds)
    return [_Frame(0, None, None, image.pixel_spacing_xr, None, slope or 1.0, intercept or 0.0)], None


# Which geometry reader applies to which analysed modality.
_FRAME_READERS: dict[Modality, Callable[[Dataset, _Image], tuple[list[_Frame] | None, str | None]]] = {
    Modality.CT: _cross_sectional_frames,
    Modality.MR: _cross_sectional_frames,
    Modality.XR: _radiograph_frames,
}


def _directions(orientation: tuple[float, ...] | None) -> tuple[np.ndarray, np.ndarray] | None:
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


def _orientation_of(normal: np.ndarray) -> Orientation:
    axis = int(np.argmax(np.abs(normal)))
    return _ORIENTATION_BY_NORMAL_AXIS[axis] if abs(normal[axis]) >= _PLANE_COSINE else Orientation.OBLIQUE


def _patient_orientation_directions(ds: Dataset) -> tuple[np.ndarray, np.ndarray] | None:
    """Row and column directions from PatientOrientation ('A\\F' …), or None when absent or unusable."""
    try:
        values = _values(ds, "PatientOrientation")
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


# --------------------------------------------------------------------------------------------------------
# Pixels


def _is_native(inst: _Instance) -> bool:
    """Native pixel data numpy reads as it lies (no decoder, no bit unpacking, no byte swapping of 8-bit OW)."""
    image, pixels = inst.image, inst.pixels
    return (
        image is not None
        and pixels is not None
        and not pixels.encapsulated
        and not pixels.deflated
        and pixels.keyword == "PixelData"
        and (image.bits_allocated, int(image.signed)) in _NATIVE_DTYPE
        and image.samples == 1
        and (inst.ds.original_encoding[1] or image.bits_allocated > 8)
    )


def _decode(inst: _Instance) -> np.ndarray:
    """The stored values of every frame, shape (frames, rows, columns); read in place when native."""
    image, pixels = inst.image, inst.pixels
    assert image is not None and pixels is not None
    dtype = _NATIVE_DTYPE.get((image.bits_allocated, int(image.signed)))
    fast = _is_native(inst)
    if fast:
        byte_order = "<" if inst.ds.original_encoding[1] else ">"
        count = image.rows * image.columns * image.frame_count
        buffer, offset = _native_bytes(inst, count * np.dtype(dtype).itemsize)
        stored = np.frombuffer(buffer, np.dtype(dtype).newbyteorder(byte_order), count, offset)
        stored = _mask_unused_bits(stored, image)
        return stored.reshape(image.frame_count, image.rows, image.columns)
    return _decode_with_pydicom(inst)


def _native_bytes(inst: _Instance, length: int) -> tuple[Any, int]:
    """(buffer, offset) of native pixel data: the uploaded bytes in place, or read from the file now."""
    pixels = inst.pixels
    if not isinstance(pixels.source, Path):
        return pixels.source, pixels.offset
    buffer = np.empty(length, dtype=np.uint8)
    try:
        with open(pixels.source, "rb") as stream:
            stream.seek(pixels.offset)
            read = stream.readinto(buffer)
    except OSError as exc:
        raise TruncatedDicomError(inst.label, f"the file cannot be read again ({exc.strerror})") from None
    if read != length:
        raise TruncatedDicomError(inst.label, f"the file lost its pixel data after {read} of {length} bytes")
    return buffer, 0


def _mask_unused_bits(stored: np.ndarray, image: _Image) -> np.ndarray:
    """Ignore bits above BitsStored (PS3.5 8.1.1): mask them, or sign-extend signed values."""
    shift = image.bits_allocated - image.bits_stored
    if shift == 0 or stored.size == 0:
        return stored
    if image.signed:
        low, high = -(1 << (image.bits_stored - 1)), (1 << (image.bits_stored - 1)) - 1
        if stored.min() >= low and stored.max() <= high:
            return stored
        return (stored.astype(stored.dtype.newbyteorder("=")) << shift) >> shift
    mask = (1 << image.bits_stored) - 1
    if stored.max() <= mask:
        return stored
    return stored & stored.dtype.type(mask)


def _decode_with_pydicom(inst: _Instance) -> np.ndarray:
    """Compressed, deflated, bit-packed or float pixel data: let pydicom and its plugins decode it."""
    image, pixels = inst.image, inst.pixels
    assert image is not None and pixels is not None
    transfer_syntax = _safe(lambda: _text(inst.ds.file_meta, "TransferSyntaxUID"))
    syntax_name = pydicom.uid.UID(transfer_syntax).name if transfer_syntax else "unknown transfer syntax"
    try:
        with _open_source(pixels.source) as stream:
            full = pydicom.dcmread(stream)
        plugin = _decoding_plugin(transfer_syntax)
    except Exception as exc:
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data cannot be read ({type(exc).__name__})"
        ) from None
    if plugin is None:
        raise UndecodablePixelDataError(inst.label, f"no decoder for {syntax_name} is installed")
    _check_codestreams(inst, full, syntax_name)
    try:
        arr = pydicom_pixel_array(full, decoding_plugin=plugin)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # a Rust decoder's panic is a BaseException (pyo3 PanicException)
        logger.debug(
            "%s pixel data of %s not decoded by %s: %s: %s",
            syntax_name,
            inst.label,
            plugin or "pydicom",
            type(exc).__name__,
            exc,
        )
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data cannot be decoded ({type(exc).__name__})"
        ) from None
    expected = image.frame_count * image.rows * image.columns
    if arr.size != expected:
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data decodes to {arr.size} values, not {expected}"
        )
    return arr.reshape(image.frame_count, image.rows, image.columns)


# Markers that start a JPEG frame header (SOF0…SOF15 but DHT/JPG/DAC) and JPEG-LS's SOF55.
_JPEG_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RST0…7, SOI: no length field
_J2K_CODESTREAM = b"\xff\x4f\xff\x51"  # SOC then SIZ


def _jpeg_frame_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG or JPEG-LS frame header, walking the marker segments."""
    if fragment[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(fragment):
        if fragment[position] != 0xFF:
            return None
        marker = fragment[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _JPEG_STANDALONE_MARKERS:
            position += 2
            continue
        if marker in _JPEG_SOF_MARKERS and position + 10 <= len(fragment):
            rows, columns = struct.unpack(">HH", fragment[position + 5 : position + 9])
            return rows, columns, fragment[position + 9]
        if marker in (0xDA, 0xD9):  # a scan or the end before any frame header
            return None
        position += 2 + int.from_bytes(fragment[position + 2 : position + 4], "big")
    return None


def _j2k_frame_size(fragment: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG 2000 SIZ segment (a raw codestream, or one inside JP2 boxes)."""
    start = fragment.find(_J2K_CODESTREAM, 0, 4096)
    if start < 0 or start + 42 > len(fragment):
        return None
    x_size, y_size, x_offset, y_offset = struct.unpack(">IIII", fragment[start + 8 : start + 24])
    components = int.from_bytes(fragment[start + 40 : start + 42], "big")
    return y_size - y_offset, x_size - x_offset, components


# Which header reader checks which transfer syntax's frames.
_FRAME_SIZE_READERS: dict[str, Callable[[bytes], tuple[int, int, int] | None]] = {
    **{syntax: _jpeg_frame_size for syntax in pydicom.uid.JPEGTransferSyntaxes},
    **{syntax: _jpeg_frame_size for syntax in pydicom.uid.JPEGLSTransferSyntaxes},
    **{syntax: _j2k_frame_size for syntax in pydicom.uid.JPEG2000TransferSyntaxes},
}


def _check_codestreams(inst: _Instance, full: Dataset, syntax_name: str) -> None:
    """Compare each frame's codestream header with Rows × Columns before any decoder sees it.

    The decoders size their buffers from the codestream, not from the DICOM header; a damaged header can make
    one allocate gigabytes or abort the process (std::bad_alloc escaping C++), so such frames never reach one.
    """
    image = inst.image
    transfer_syntax = _safe(lambda: _text(inst.ds.file_meta, "TransferSyntaxUID"))
    reader = _FRAME_SIZE_READERS.get(transfer_syntax or "")
    if reader is None:
        return
    try:
        frames = generate_fragmented_frames(full.PixelData, number_of_frames=image.frame_count)
        for number, fragments in enumerate(itertools.islice(frames, image.frame_count), start=1):
            size = reader(fragments[0]) if fragments else None
            if size is None:
                raise UndecodablePixelDataError(inst.label, f"frame {number} has no {syntax_name} header")
            rows, columns, components = size
            if (rows, columns) != (image.rows, image.columns) or components != image.samples:
                raise UndecodablePixelDataError(
                    inst.label,
                    f"frame {number}'s {syntax_name} header says {rows}×{columns}×{components}, "
                    f"the DICOM header {image.rows}×{image.columns}×{image.samples}",
                )
    except CspineError:
        raise
    except Exception as exc:
        raise UndecodablePixelDataError(
            inst.label, f"the {syntax_name} pixel data items cannot be read ({type(exc).__name__})"
        ) from None


def _decoding_plugin(transfer_syntax: str | None) -> str | None:
    """The one pydicom decoding plugin used for a transfer syntax ("" is pydicom's own native decoder), or
    None when none is installed. One, not a chain: a stream one decoder refuses is damaged, and handing
    it to the next only costs time (CharLS needs seconds to refuse some damaged JPEG-LS streams)."""
    decoder = pydicom.pixels.get_decoder(pydicom.uid.UID(transfer_syntax or ""))
    if decoder.is_native:
        return ""
    available = set(decoder.available_plugins)
    return next((plugin for plugin in _DECODING_PLUGIN_PREFERENCE if plugin in available), None)


@dataclass(frozen=True)
class _Transform:
    """Stored values → modality units (→ inverted for MONOCHROME1), for one frame."""

    slope: float
    intercept: float
    lut: Dataset | None  # the dataset holding a Modality LUT Sequence, applied instead of the rescale
    invert_sum: float | None  # lo + hi of the output range for MONOCHROME1

    def apply(self, stored: np.ndarray, out: np.ndarray) -> None:
        if self.lut is not None:
            out[...] = apply_modality_lut(stored, self.lut)
        elif self.slope == 1.0:
            np.add(stored, np.float32(self.intercept), out=out, casting="unsafe")
        else:
            np.multiply(stored, self.slope, out=out, casting="unsafe")
            if self.intercept:
                out += np.float32(self.intercept)
        if self.invert_sum is not None:
            np.subtract(np.float32(self.invert_sum), out, out=out)


def _stored_range(image: _Image) -> tuple[int, int]:
    if image.signed:
        return -(1 << (image.bits_stored - 1)), (1 << (image.bits_stored - 1)) - 1
    return 0, (1 << image.bits_stored) - 1


def _transform(inst: _Instance, frame: _Frame) -> _Transform:
    image = inst.image
    assert image is not None
    lut = inst.ds if image.modality_lut else None
    invert_sum = None
    if image.photometric == "MONOCHROME1":
        low, high = _stored_range(image)
        if lut is not None:
            mapped = apply_modality_lut(np.arange(low, high + 1), lut)
            invert_sum = float(np.min(mapped) + np.max(mapped))
        else:
            ends = (low * frame.slope + frame.intercept, high * frame.slope + frame.intercept)
            invert_sum = float(min(ends) + max(ends))
    return _Transform(frame.slope, frame.intercept, lut, invert_sum)


# --------------------------------------------------------------------------------------------------------
# The builder


def _safe(read: Callable[[], Any]) -> Any:
    """An optional attribute: None when absent or unreadable."""
    try:
        return read()
    except Exception:
        return None


class StudyBuilder:
    """Collects the instances of one study, refusing bad ones as they arrive; ``build`` makes the Study.

    ``label`` names the instance in every error message: a file path, or "instance #12" from the gateway.
    """

    def __init__(self, limits: IngestLimits = IngestLimits()) -> None:
        self._limits = limits
        self._study_uid: str | None = None
        self._instances: list[_Instance] = []
        self._sop_uids: set[str] = set()
        self._notices: list[Notice] = []
        self._count = 0
        self._bytes = 0
        self._voxels = 0
        self._built = False

    @property
    def study_instance_uid(self) -> str | None:
        """The study of the first instance added, once there is one."""
        return self._study_uid

    @property
    def notices(self) -> list[Notice]:
        """Notices so far (DICOMDIRs and repeated instances skipped); build() adds the series' own."""
        return list(self._notices)

    def add(self, label: str, data: bytes) -> None:
        """Read one Part-10 instance's header; raise a CspineError at once if it cannot be used.

        The builder keeps a reference to ``data`` (native pixel data is decoded from it in place at build).
        """
        self._admit(label, len(data))
        self._add_guarded(label, data)

    def add_file(self, label: str, path: Path | str) -> None:
        """Like ``add`` for a file: the header is read now, the pixel data at ``build`` — the builder holds
        no file's bytes in between, and the file must not change meanwhile."""
        path = Path(path)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise InvalidInputError(f"{label}: cannot be read ({exc.strerror or type(exc).__name__})") from None
        self._admit(label, size)
        self._add_guarded(label, path)

    def _admit(self, label: str, size: int) -> None:
        if self._built:
            raise RuntimeError("StudyBuilder.add() after build()")
        self._count += 1
        self._bytes += size
        if self._count > self._limits.max_instances:
            raise StudyTooLargeError(
                f"instance {label}: the study has more than {self._limits.max_instances} instances"
            )
        if self._bytes > self._limits.max_study_bytes:
            raise StudyTooLargeError(f"instance {label}: the study is larger than {self._limits.max_study_bytes} bytes")

    def _add_guarded(self, label: str, source: Any) -> None:
        try:
            self._add(label, source)
        except (CspineError, MemoryError):  # the server out of memory is no fault of the instance's
            raise
        except OSError as exc:
            if isinstance(source, Path) and exc.errno is not None:  # the file system, not the content
                raise InvalidInputError(f"{label}: cannot be read ({exc.strerror})") from None
            # pydicom parses a defined-length sequence on first access, and reports a damaged one as OSError.
            raise MalformedDicomError(label, "a sequence attribute cannot be read") from None
        except Exception as exc:  # a value pydicom could not convert, a geometry numpy could not handle …
            # The type only: pydicom's message quotes the header value it could not convert.
            logger.debug("instance %s refused: %s", label, type(exc).__name__)
            raise MalformedDicomError(label, f"an attribute cannot be read ({type(exc).__name__})") from None

    def _add(self, label: str, source: Any) -> None:
        ds, pixels = _parse(label, source, self._limits.max_study_bytes - self._bytes)
        sop_class_uid = _text(ds, "SOPClassUID") or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        dicom_modality = (_text(ds, "Modality") or "").upper()
        kind = _classify(ds, sop_class_uid, dicom_modality, pixels is not None)
        if kind is _Kind.DIRECTORY:
            self._notices.append(Notice(NoticeCode.NOT_AN_IMAGE, f"{label} is a DICOMDIR (a file index); skipped"))
            return
        study_uid = _required_text(label, ds, "StudyInstanceUID")
        if self._study_uid is None:
            self._study_uid = study_uid
        elif study_uid != self._study_uid:
            raise MixedStudiesError(label, "it belongs to another study than the instances before it")
        inst = _Instance(
            label=label,
            ds=ds,
            kind=kind,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=_required_text(label, ds, "SOPInstanceUID"),
            series_uid=_required_text(label, ds, "SeriesInstanceUID"),
            dicom_modality=dicom_modality,
            instance_number=_safe(lambda: _int(ds, "InstanceNumber")),
        )
        if inst.sop_instance_uid in self._sop_uids:
            self._notices.append(
                Notice(
                    NoticeCode.DUPLICATE_INSTANCE,
                    f"{label} repeats an instance already received (same SOPInstanceUID); dropped",
                    inst.series_uid,
                )
            )
            return
        if kind is _Kind.IMAGE:
            self._add_image(inst, pixels)
        self._sop_uids.add(inst.sop_instance_uid)
        self._instances.append(inst)

    def _add_image(self, inst: _Instance, pixels: _Pixels | None) -> None:
        label = inst.label
        if pixels is None:
            raise MissingPixelDataError(label, "an image object without pixel data")
        image = _read_image(label, inst.ds)
        frame_bytes = _frame_bytes(image)
        if frame_bytes > self._limits.max_frame_bytes:
            raise FrameTooLargeError(
                label,
                f"a {image.rows}×{image.columns} frame of {image.samples} sample(s) at {image.bits_allocated} "
                f"bits decodes to {frame_bytes} bytes, more than the limit of {self._limits.max_frame_bytes}",
            )
        inst.image = image
        modality = MODALITY_BY_DICOM.get(inst.dicom_modality)
        if modality is None or not image.greyscale:
            return  # never decoded: its pixels are not kept
        self._voxels += max(image.rows * image.columns, _MIN_FRAME_VOXELS) * image.frame_count
        if self._voxels > self._limits.max_study_voxels:
            raise StudyTooLargeError(
                f"instance {label}: the study has more than {self._limits.max_study_voxels} voxels "
                f"({image.frame_count} frame(s) of {image.rows}×{image.columns} here; a frame counts as at least "
                f"{_MIN_FRAME_VOXELS})"
            )
        if pixels.encapsulated and pixels.length < 8 * image.frame_count:
            raise UndecodablePixelDataError(
                label, f"{pixels.length} bytes of encapsulated pixel data cannot hold {image.frame_count} frames"
            )
        if not pixels.encapsulated and pixels.length < _native_bytes_needed(image):
            raise TruncatedDicomError(
                label,
                f"the pixel data holds {pixels.length} bytes; {image.frame_count} frame(s) of "
                f"{image.rows}×{image.columns} need {_native_bytes_needed(image)}",
            )
        image.frames, image.geometry_problem = _FRAME_READERS[modality](inst.ds, image)
        inst.pixels = pixels

    def build(self) -> Study:
        """Group by series, place slices in patient space, decode the pixels; the builder is spent after."""
        if self._built:
            raise RuntimeError("StudyBuilder.build() may be called once")
        self._built = True
        if self._study_uid is None:
            skipped = f" ({len(self._notices)} DICOMDIR file(s) skipped)" if self._notices else ""
            raise EmptyStudyError(f"the upload holds no DICOM instance of a study{skipped}")
        by_series: dict[str, list[_Instance]] = defaultdict(list)
        for inst in self._instances:
            by_series[inst.series_uid].append(inst)
        self._instances = []
        notices = list(self._notices)
        series = []
        for uid, instances in by_series.items():
            try:
                series.append(_build_series(uid, sorted(instances, key=lambda i: i.order), notices))
            except (CspineError, MemoryError):
                raise
            except Exception as exc:
                logger.debug("series not built: %s", type(exc).__name__)  # its message may quote a header value
                label = min(instances, key=lambda i: i.order).label
                raise InconsistentSeriesError(label, f"its series cannot be assembled ({type(exc).__name__})") from None
            finally:
                for inst in instances:
                    inst.pixels = None
        series.sort(key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))
        logger.info(
            "ingested a study: %d series, %d with a volume, %d notices",
            len(series),
            sum(s.volume is not None for s in series),
            len(notices),
        )
        return Study(self._study_uid, series, notices)


# --------------------------------------------------------------------------------------------------------
# Series assembly


def _build_series(uid: str, instances: list[_Instance], notices: list[Notice]) -> Series:
    images = [i for i in instances if i.kind is _Kind.IMAGE]
    for other in (i for i in instances if i.kind is not _Kind.IMAGE and images):
        notices.append(Notice(NoticeCode.NOT_AN_IMAGE, f"{other.label} is not an image; skipped", uid))
    members = images or instances
    first = members[0]
    series = Series(
        series_instance_uid=uid,
        dicom_modality=first.dicom_modality,
        modality=MODALITY_BY_DICOM.get(first.dicom_modality) if images else None,
        sop_class_uid=first.sop_class_uid,
        series_number=_safe(lambda: _int(first.ds, "SeriesNumber")),
        description=_safe(lambda: _text(first.ds, "SeriesDescription")) or "",
        instances=tuple(InstanceRef(i.sop_class_uid, i.sop_instance_uid) for i in members),
        frame_of_reference_uid=_safe(lambda: _text(first.ds, "FrameOfReferenceUID")),
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
    colour = next((i for i in images if not i.image.greyscale), None)
    if colour is not None:
        notices.append(
            Notice(
                NoticeCode.UNSUPPORTED_IMAGE,
                f"{name}: {colour.image.photometric} colour images are not analysed",
                uid,
            )
        )
        return series
    _SERIES_BUILDERS[series.modality](series, name, images, notices)
    return series


def _check_same_series(first: _Instance, inst: _Instance) -> None:
    a, b = first.image, inst.image
    if inst.dicom_modality != first.dicom_modality:
        raise InconsistentSeriesError(
            inst.label, f"modality {inst.dicom_modality} differs from its series' {first.dicom_modality}"
        )
    if (b.rows, b.columns) != (a.rows, a.columns):
        raise InconsistentSeriesError(
            inst.label, f"{b.rows}×{b.columns} pixels differ from its series' {a.rows}×{a.columns}"
        )


def _build_cross_sectional(series: Series, name: str, images: list[_Instance], notices: list[Notice]) -> None:
    uid = series.series_instance_uid
    broken = next((i for i in images if i.image.frames is None), None)
    if broken is not None:
        notices.append(Notice(NoticeCode.UNSUPPORTED_IMAGE, f"{name}: {broken.image.geometry_problem}", uid))
        return
    frames = [(inst, frame) for inst in images for frame in inst.image.frames]
    reference_inst, reference = _majority(frames, lambda pair: _plane_key(pair[1]))
    directions = _directions(reference.orientation)
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
    slots: dict[int, list[tuple[int, _Frame]]] = defaultdict(list)  # instance → [(slice k, frame)]
    instance_of = {}
    for k, n in enumerate(kept):
        inst, frame = frames[n]
        slots[id(inst)].append((k, frame))
        instance_of[id(inst)] = inst
    _decode_all([(instance_of[key], targets) for key, targets in slots.items()], voxels)
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
    series.orientation = _orientation_of(normal)
    multi_frame = any(inst.image.frame_count > 1 for inst in images)
    series.instances = tuple(
        InstanceRef(inst.sop_class_uid, inst.sop_instance_uid, frame.index + 1 if multi_frame else None)
        for inst, frame in slice_order
    )
    seen: dict[int, Dataset] = {}
    for inst, _ in slice_order:
        seen.setdefault(id(inst), inst.ds)
    series.headers = tuple(seen.values())


def _decode_into(inst: _Instance, targets: list[tuple[int, _Frame]], voxels: np.ndarray) -> None:
    stored = _decode(inst)
    for k, frame in targets:
        _transform(inst, frame).apply(stored[frame.index], voxels[k])
    inst.pixels = None  # the raw bytes may go now


def _decode_all(work: list[tuple[_Instance, list[tuple[int, _Frame]]]], voxels: np.ndarray) -> None:
    """Decode every instance into its slices of ``voxels``.

    Native pixel data is read and converted by a few threads: file reads and numpy release the GIL, and each
    instance writes only its own slices (on the 2-core reference machine this lifts ingest from ~0.8× to
    ~0.87× bare pydicom's slices/s). Compressed data is decoded in this thread, because not every decoder
    plugin is known to be thread-safe. Results are awaited in slice order, so the first failure in slice
    order is the one raised.
    """
    native = [(inst, targets) for inst, targets in work if _is_native(inst)]
    other = [(inst, targets) for inst, targets in work if not _is_native(inst)]
    workers = min(_DECODE_THREADS, len(native))
    if workers > 1:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="cspine-decode") as pool:
            futures = [pool.submit(_decode_into, inst, targets, voxels) for inst, targets in native]
            for future in futures:
                future.result()
    else:
        other = work
    for inst, targets in other:
        _decode_into(inst, targets, voxels)


def _majority(items: list[Any], key: Callable[[Any], Any]) -> Any:
    """The first item of the most common kind: a series is judged by its majority, so that the odd
    instance out is the one an error names."""
    counts: dict[Any, int] = defaultdict(int)
    for item in items:
        counts[key(item)] += 1
    best = max(counts.values())
    return next(item for item in items if counts[key(item)] == best)


def _plane_key(frame: _Frame) -> tuple:
    return (
        tuple(round(v / _ORIENTATION_TOLERANCE) for v in frame.orientation),
        tuple(round(v, 3) for v in frame.spacing),
    )


def _check_same_plane(inst: _Instance, frame: _Frame, reference: _Frame) -> None:
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
    frames: list[tuple[_Instance, _Frame]],
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
    shared = _safe(lambda: _item(ds, "SharedFunctionalGroupsSequence"))
    per_frame = _safe(lambda: _item(ds, "PerFrameFunctionalGroupsSequence"))

    def group(keyword: str) -> Dataset | None:
        return _safe(lambda: _item(per_frame, keyword) or _item(shared, keyword))

    series.echo_time_ms = _safe(lambda: _float(ds, "EchoTime")) or _safe(
        lambda: _float(group("MREchoSequence"), "EffectiveEchoTime")
    )
    series.repetition_time_ms = _safe(lambda: _float(ds, "RepetitionTime")) or _safe(
        lambda: _float(group("MRTimingAndRelatedParametersSequence"), "RepetitionTime")
    )


def _build_projection(series: Series, name: str, images: list[_Instance], notices: list[Notice]) -> None:
    uid = series.series_instance_uid
    single = [i for i in images if i.image.frame_count == 1]
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
    image = chosen.image
    if image.frames is None:
        notices.append(Notice(NoticeCode.UNSUPPORTED_IMAGE, f"{name}: {image.geometry_problem}", uid))
        return
    frame = image.frames[0]
    voxels = np.empty((1, image.rows, image.columns), dtype=np.float32)
    _transform(chosen, frame).apply(_decode(chosen)[0], voxels[0])
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
    series.view_position = _safe(lambda: _text(chosen.ds, "ViewPosition"))
    series.view_position = series.view_position.upper() if series.view_position else None
    series.instances = (InstanceRef(chosen.sop_class_uid, chosen.sop_instance_uid),)
    series.headers = (chosen.ds,)


def _view_of(ds: Dataset) -> tuple[RadiographView, tuple[np.ndarray, np.ndarray] | None]:
    patient_orientation = _safe(lambda: _values(ds, "PatientOrientation"))
    view_position = _safe(lambda: _text(ds, "ViewPosition"))
    return radiograph_view(view_position, patient_orientation), _patient_orientation_directions(ds)


# How each analysed modality becomes a volume.
_SERIES_BUILDERS: dict[Modality, Callable[[Series, str, list[_Instance], list[Notice]], None]] = {
    Modality.CT: _build_cross_sectional,
    Modality.MR: _build_cross_sectional,
    Modality.XR: _build_projection,
}


# --------------------------------------------------------------------------------------------------------
# Entry points


def ingest(items: Iterable[tuple[str, bytes]], limits: IngestLimits = IngestLimits()) -> Study:
    """Ingest ``(label, Part-10 bytes)`` pairs of one study, in any order."""
    builder = StudyBuilder(limits)
    for label, data in items:
        builder.add(label, data)
    return builder.build()


def iter_files(paths: Iterable[Path | str]) -> Iterator[Path]:
    """Every regular file named, or inside a named folder (recursively, in sorted order)."""
    for given in paths:
        path = Path(given)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(folder) / name
        elif path.is_file():
            yield path
        else:
            raise InvalidInputError(f"{path}: no such file or folder")


def ingest_paths(paths: Iterable[Path | str], limits: IngestLimits = IngestLimits()) -> Study:
    """Ingest files and folders (recursively). Every file must be DICOM: an upload must lose nothing, so a
    stray non-DICOM file is refused (NotDicomError naming it); a DICOMDIR is skipped with a notice."""
    builder = StudyBuilder(limits)
    for path in iter_files(paths):
        builder.add_file(str(path), path)
    return builder.build()
