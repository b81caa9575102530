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

import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cspine.client.files import iter_files
from cspine.config import IngestLimits
from cspine.dicom.assemble import build_series
from cspine.dicom.attributes import int_value, required_text, safe, text
from cspine.dicom.classify import MODALITY_BY_DICOM, classify
from cspine.dicom.geometry import FRAME_READERS
from cspine.dicom.parse import parse
from cspine.dicom.pixels import bytes_per_frame, native_bytes_needed, read_image
from cspine.dicom.records import Instance, Kind, Pixels
from cspine.domain import Notice, NoticeCode, Study
from cspine.errors import (
    CspineError,
    EmptyStudyError,
    FrameTooLargeError,
    InconsistentSeriesError,
    InvalidInputError,
    MalformedDicomError,
    MissingPixelDataError,
    MixedStudiesError,
    StudyTooLargeError,
    TruncatedDicomError,
    UndecodablePixelDataError,
)

logger = logging.getLogger(__name__)

__all__ = ["StudyBuilder", "ingest", "ingest_paths"]

# A frame counts as at least this many voxels against max_study_voxels: what ingest holds per frame (its
# geometry, its InstanceRef: ~0.7 KiB) is then covered by the 4 bytes a voxel is budgeted, however few
# pixels the frame has (a 2 KB upload may declare 20,000 frames of 1 × 1 pixel).
_MIN_FRAME_VOXELS = 64 * 64


class StudyBuilder:
    """Collects the instances of one study, refusing bad ones as they arrive; ``build`` makes the Study.

    ``label`` names the instance in every error message: a file path, or "instance #12" from the gateway.
    """

    def __init__(self, limits: IngestLimits = IngestLimits()) -> None:
        self._limits = limits
        self._study_uid: str | None = None
        self._instances: list[Instance] = []
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
        ds, pixels = parse(label, source, self._limits.max_study_bytes - self._bytes)
        sop_class_uid = text(ds, "SOPClassUID") or str(ds.file_meta.get("MediaStorageSOPClassUID", ""))
        dicom_modality = (text(ds, "Modality") or "").upper()
        kind = classify(ds, sop_class_uid, dicom_modality, pixels is not None)
        if kind is Kind.DIRECTORY:
            self._notices.append(Notice(NoticeCode.NOT_AN_IMAGE, f"{label} is a DICOMDIR (a file index); skipped"))
            return
        study_uid = required_text(label, ds, "StudyInstanceUID")
        if self._study_uid is None:
            self._study_uid = study_uid
        elif study_uid != self._study_uid:
            raise MixedStudiesError(label, "it belongs to another study than the instances before it")
        inst = Instance(
            label=label,
            ds=ds,
            kind=kind,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=required_text(label, ds, "SOPInstanceUID"),
            series_uid=required_text(label, ds, "SeriesInstanceUID"),
            dicom_modality=dicom_modality,
            instance_number=safe(lambda: int_value(ds, "InstanceNumber")),
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
        if kind is Kind.IMAGE:
            self._add_image(inst, pixels)
        self._sop_uids.add(inst.sop_instance_uid)
        self._instances.append(inst)

    def _add_image(self, inst: Instance, pixels: Pixels | None) -> None:
        label = inst.label
        if pixels is None:
            raise MissingPixelDataError(label, "an image object without pixel data")
        image = read_image(label, inst.ds)
        frame_bytes = bytes_per_frame(image)
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
        if not pixels.encapsulated and pixels.length < native_bytes_needed(image):
            raise TruncatedDicomError(
                label,
                f"the pixel data holds {pixels.length} bytes; {image.frame_count} frame(s) of "
                f"{image.rows}×{image.columns} need {native_bytes_needed(image)}",
            )
        image.frames, image.geometry_problem = FRAME_READERS[modality](inst.ds, image)
        inst.pixels = pixels

    def build(self) -> Study:
        """Group by series, place slices in patient space, decode the pixels; the builder is spent after."""
        if self._built:
            raise RuntimeError("StudyBuilder.build() may be called once")
        self._built = True
        if self._study_uid is None:
            skipped = f" ({len(self._notices)} DICOMDIR file(s) skipped)" if self._notices else ""
            raise EmptyStudyError(f"the upload holds no DICOM instance of a study{skipped}")
        by_series: dict[str, list[Instance]] = defaultdict(list)
        for inst in self._instances:
            by_series[inst.series_uid].append(inst)
        self._instances = []
        notices = list(self._notices)
        series = []
        for uid, instances in by_series.items():
            try:
                series.append(build_series(uid, sorted(instances, key=lambda i: i.order), notices))
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
# Entry points


def ingest(items: Iterable[tuple[str, bytes]], limits: IngestLimits = IngestLimits()) -> Study:
    """Ingest ``(label, Part-10 bytes)`` pairs of one study, in any order."""
    builder = StudyBuilder(limits)
    for label, data in items:
        builder.add(label, data)
    return builder.build()


def ingest_paths(paths: Iterable[Path | str], limits: IngestLimits = IngestLimits()) -> Study:
    """Ingest files and folders (recursively). Every file must be DICOM: an upload must lose nothing, so a
    stray non-DICOM file is refused (NotDicomError naming it); a DICOMDIR is skipped with a notice."""
    builder = StudyBuilder(limits)
    for path in iter_files(paths):
        builder.add_file(str(path), path)
    return builder.build()
