"""What ingest learns about an instance at ``StudyBuilder.add`` and carries to ``build``: the record types
the ingest modules of this package share (the instance, its Image Pixel description, its frames, where its
pixel data lies)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

_GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


class Kind(enum.Enum):
    """What an uploaded object is, as far as ingest cares."""

    IMAGE = "image"
    NON_IMAGE = "non-image"
    DIRECTORY = "directory"  # DICOMDIR


@dataclass(frozen=True)
class Frame:
    """One 2-D image of an instance, with its own geometry and rescale."""

    index: int  # 0-based frame of its instance
    position: tuple[float, ...] | None  # ImagePositionPatient
    orientation: tuple[float, ...] | None  # ImageOrientationPatient
    spacing: tuple[float, ...] | None  # PixelSpacing (row, column)
    thickness: float | None
    slope: float
    intercept: float


@dataclass
class Pixels:
    """Where the pixel data lies in the raw bytes, and how it is encoded."""

    source: Any  # the instance's bytes (kept until decoded), or the Path of its file
    offset: int  # first byte of the value (native) or of the first item (encapsulated)
    length: int
    encapsulated: bool
    keyword: str  # PixelData, FloatPixelData or DoubleFloatPixelData
    deflated: bool


@dataclass
class Image:
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
    frames: list[Frame] | None = None  # None: no usable geometry (see geometry_problem)
    geometry_problem: str | None = None
    pixel_spacing_xr: tuple[float, float] | None = None  # radiographs: spacing in the patient plane

    @property
    def greyscale(self) -> bool:
        return self.samples == 1 and self.photometric in _GREYSCALE


@dataclass
class Instance:
    label: str
    ds: Dataset  # header without pixel data
    kind: Kind
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    dicom_modality: str
    instance_number: int | None
    image: Image | None = None
    pixels: Pixels | None = None

    @property
    def order(self) -> tuple[float, str]:
        """Sort key "first by InstanceNumber": numbered instances first, then by SOP instance UID."""
        number = self.instance_number if self.instance_number is not None else math.inf
        return (number, self.sop_instance_uid)
