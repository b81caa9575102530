"""Small, real DICOM Part-10 files made with pydicom for the ingest tests: CT/MR series, radiographs,
enhanced multi-frame images, SR documents and DICOMDIRs, in every transfer syntax that can be encoded here.

Every builder returns a :class:`Built`: the files as ``(name, bytes)`` in slice order, plus the stored pixel
values and geometry a test compares ingest's result with. Pixel values follow a fixed pattern, so the same
arguments always give the same bytes except for generated UIDs.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pydicom
from pydicom import uid as dicom_uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)

# Identifying values that must never appear in a log line, an error message or an inspect report.
PATIENT_NAME = "Doe^Jane^Testpatient"
PATIENT_ID = "PID-424242"
PATIENT_BIRTH_DATE = "19510203"


@dataclass
class Built:
    """What a builder made."""

    files: list[tuple[str, bytes]]  # in slice order
    stored: np.ndarray  # stored values, [K, R, C], slice order
    positions: np.ndarray  # (K, 3) ImagePositionPatient (zeros for radiographs)
    study_uid: str
    series_uid: str
    slope: float = 1.0
    intercept: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def modality_values(self) -> np.ndarray:
        return self.stored.astype(np.float64) * self.slope + self.intercept


def pattern(shape: Sequence[int], low: int, high: int, seed: int = 0) -> np.ndarray:
    """Deterministic values in [low, high] that differ between slices, rows and columns."""
    k, i, j = np.indices(shape)
    span = high - low + 1
    return (low + (k * 97 + i * 31 + j * 7 + seed * 13) % span).astype(np.int64)


def _normal(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))


def _pixel_dtype(bits_allocated: int, signed: bool) -> np.dtype:
    return np.dtype(
        {
            (8, False): "u1",
            (8, True): "i1",
            (16, False): "<u2",
            (16, True): "<i2",
            (32, False): "<u4",
            (32, True): "<i4",
        }[(bits_allocated, signed)]
    )


def base_dataset(
    *,
    sop_class_uid: str,
    modality: str,
    study_uid: str,
    series_uid: str,
    series_number: int = 1,
    instance_number: int = 1,
    description: str = "",
) -> Dataset:
    """A dataset with file meta, patient/study/series identity and the SOP common module."""
    sop_uid = dicom_uid.generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101010"
    ds.AccessionNumber = "A1"
    ds.Modality = modality
    ds.Manufacturer = "cspine tests"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = description
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = PATIENT_BIRTH_DATE
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    return ds


def set_pixels(
    ds: Dataset,
    stored: np.ndarray,
    *,
    signed: bool,
    bits_allocated: int = 16,
    bits_stored: int | None = None,
    photometric: str = "MONOCHROME2",
) -> None:
    """Image Pixel module for greyscale ``stored`` values, [R, C] or [frames, R, C]; little endian bytes."""
    frames = stored if stored.ndim == 3 else stored[None]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = frames.shape[1], frames.shape[2]
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if stored.ndim == 3 and len(frames) > 1 or "PerFrameFunctionalGroupsSequence" in ds:
        ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.astype(_pixel_dtype(bits_allocated, signed)).tobytes()


# ------------------------------------------------------------------------------------------------------
# Encoding


def _save(ds: Dataset, *, implicit_vr: bool = False, little_endian: bool = True) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=implicit_vr, little_endian=little_endian, enforce_file_format=True)
    return buffer.getvalue()


def _native(syntax: str) -> Callable[[Dataset], bytes]:
    def encode(ds: Dataset) -> bytes:
        ds.file_meta.TransferSyntaxUID = syntax
        return _save(ds, implicit_vr=syntax == dicom_uid.ImplicitVRLittleEndian)

    return encode


def _big_endian(ds: Dataset) -> bytes:
    item = 1 if ds.BitsAllocated <= 8 else ds.BitsAllocated // 8
    if item > 1:
        words = np.frombuffer(ds.PixelData, dtype=f"<u{item}")
        ds.PixelData = words.astype(f">u{item}").tobytes()
    ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRBigEndian
    return _save(ds, little_endian=False)


def _pydicom_encoder(syntax: str, **kwargs) -> Callable[[Dataset], bytes]:
    def encode(ds: Dataset) -> bytes:
        ds.compress(syntax, **kwargs)
        return _save(ds)

    return encode


def _gdcm_encoder(gdcm_syntax_name: str) -> Callable[[Dataset], bytes]:
    """pydicom cannot encode JPEG (ISO 10918) here; GDCM can, through files."""

    def encode(ds: Dataset) -> bytes:
        import gdcm

        with tempfile.TemporaryDirectory() as folder:
            source, target = os.path.join(folder, "in.dcm"), os.path.join(folder, "out.dcm")
            ds.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
            ds.save_as(source, enforce_file_format=True)
            reader = gdcm.ImageReader()
            reader.SetFileName(source)
            if not reader.Read():
                raise RuntimeError("GDCM could not read its input")
            change = gdcm.ImageChangeTransferSyntax()
            change.SetTransferSyntax(gdcm.TransferSyntax(getattr(gdcm.TransferSyntax, gdcm_syntax_name)))
            change.SetInput(reader.GetImage())
            if not change.Change():
                raise RuntimeError(f"GDCM could not encode {gdcm_syntax_name}")
            writer = gdcm.ImageWriter()
            writer.SetFile(reader.GetFile())
            writer.SetImage(change.GetOutput())
            writer.SetFileName(target)
            if not writer.Write():
                raise RuntimeError("GDCM could not write its output")
            with open(target, "rb") as stream:
                return stream.read()

    return encode


#: Every transfer syntax the builders can write, and how. Lossy ones are marked in LOSSY.
ENCODERS: dict[str, Callable[[Dataset], bytes]] = {
    dicom_uid.ExplicitVRLittleEndian: _native(dicom_uid.ExplicitVRLittleEndian),
    dicom_uid.ImplicitVRLittleEndian: _native(dicom_uid.ImplicitVRLittleEndian),
    dicom_uid.DeflatedExplicitVRLittleEndian: _native(dicom_uid.DeflatedExplicitVRLittleEndian),
    dicom_uid.ExplicitVRBigEndian: _big_endian,
    dicom_uid.RLELossless: _pydicom_encoder(dicom_uid.RLELossless),
    dicom_uid.JPEGLSLossless: _pydicom_encoder(dicom_uid.JPEGLSLossless),
    dicom_uid.JPEGLSNearLossless: _pydicom_encoder(dicom_uid.JPEGLSNearLossless, jls_error=2),
    dicom_uid.JPEG2000Lossless: _pydicom_encoder(dicom_uid.JPEG2000Lossless),
    dicom_uid.JPEG2000: _pydicom_encoder(dicom_uid.JPEG2000, j2k_psnr=[80]),
    dicom_uid.JPEGLosslessSV1: _gdcm_encoder("JPEGLosslessProcess14_1"),
    dicom_uid.JPEGLossless: _gdcm_encoder("JPEGLosslessProcess14"),
    dicom_uid.JPEGBaseline8Bit: _gdcm_encoder("JPEGBaselineProcess1"),  # 8-bit images only
    dicom_uid.JPEGExtended12Bit: _gdcm_encoder("JPEGExtendedProcess2_4"),  # 8-bit images only here
}
LOSSY = frozenset(
    {dicom_uid.JPEGLSNearLossless, dicom_uid.JPEG2000, dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit}
)
EIGHT_BIT_ONLY = frozenset({dicom_uid.JPEGBaseline8Bit, dicom_uid.JPEGExtended12Bit})


def encode(ds: Dataset, syntax: str = dicom_uid.ExplicitVRLittleEndian) -> bytes:
    """Part-10 bytes of ``ds`` in ``syntax`` (``ds`` is changed on the way: keep a copy if needed)."""
    return ENCODERS[syntax](ds)


# ------------------------------------------------------------------------------------------------------
# Series


# Type 1/2 attributes of the CT and MR Image modules, so that the files are complete enough for dciodvfy.
_MODALITY_ATTRIBUTES = {
    "CT": {"KVP": "120"},
    "MR": {
        "ScanningSequence": "SE",
        "SequenceVariant": "NONE",
        "ScanOptions": "",
        "MRAcquisitionType": "2D",
        "EchoTrainLength": 1,
    },
}


def cross_sectional_series(
    *,
    modality: str,
    sop_class_uid: str,
    n: int,
    rows: int,
    cols: int,
    orientation: Sequence[float],
    spacing: float,
    offsets: Sequence[float] | None,
    origin: Sequence[float],
    pixel_spacing: Sequence[float],
    thickness: float | None,
    slope: float,
    intercept: float,
    signed: bool,
    low: int,
    high: int,
    bits_allocated: int,
    bits_stored: int | None,
    photometric: str,
    study_uid: str | None,
    series_uid: str | None,
    series_number: int,
    description: str,
    syntax: str,
    instance_numbers: Sequence[int] | None,
    extra: dict | None,
    seed: int,
) -> Built:
    study_uid = study_uid or dicom_uid.generate_uid()
    series_uid = series_uid or dicom_uid.generate_uid()
    frame_of_reference = dicom_uid.generate_uid()
    offsets = np.asarray(offsets if offsets is not None else np.arange(n) * spacing, float)
    positions = np.asarray(origin, float)[None, :] + offsets[:, None] * _normal(orientation)[None, :]
    stored = pattern((len(offsets), rows, cols), low, high, seed)
    files = []
    for k, position in enumerate(positions):
        ds = base_dataset(
            sop_class_uid=sop_class_uid,
            modality=modality,
            study_uid=study_uid,
            series_uid=series_uid,
            series_number=series_number,
            instance_number=instance_numbers[k] if instance_numbers is not None else k + 1,
            description=description,
        )
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        for keyword, value in _MODALITY_ATTRIBUTES[modality].items():
            setattr(ds, keyword, value)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
        ds.SliceThickness = f"{thickness if thickness is not None else spacing:g}"
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        set_pixels(
            ds,
            stored[k],
            signed=signed,
            bits_allocated=bits_allocated,
            bits_stored=bits_stored,
            photometric=photometric,
        )
        files.append((f"{modality.lower()}_{series_number}_{k:03d}.dcm", encode(ds, syntax)))
    return Built(files, stored, positions, study_uid, series_uid, slope, intercept)


def ct_series(
    n: int = 6,
    *,
    rows: int = 16,
    cols: int = 12,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 2.5,
    offsets: Sequence[float] | None = None,
    origin: Sequence[float] = (-10.0, -20.0, 100.0),
    pixel_spacing: Sequence[float] = (0.7, 0.8),
    thickness: float | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    signed: bool = False,
    low: int = 0,
    high: int = 3000,
    bits_allocated: int = 16,
    bits_stored: int | None = 12,
    photometric: str = "MONOCHROME2",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 2,
    description: str = "AX CT BONE",
    syntax: str = dicom_uid.ExplicitVRLittleEndian,
    instance_numbers: Sequence[int] | None = None,
    extra: dict | None = None,
    seed: int = 0,
) -> Built:
    """An axial CT series (by default): ``n`` slices ``spacing`` mm apart, or at ``offsets`` mm along the
    slice normal from ``origin``; stored values in [low, high], HU = stored × slope + intercept."""
    return cross_sectional_series(
        **{k: v for k, v in locals().items()}, modality="CT", sop_class_uid=dicom_uid.CTImageStorage
    )


def mr_series(
    n: int = 5,
    *,
    rows: int = 14,
    cols: int = 18,
    orientation: Sequence[float] = SAGITTAL,
    spacing: float = 3.0,
    offsets: Sequence[float] | None = None,
    origin: Sequence[float] = (6.0, -50.0, 80.0),
    pixel_spacing: Sequence[float] = (0.5, 0.5),
    thickness: float | None = None,
    echo_time: float | None = 100.0,
    repetition_time: float | None = 3000.0,
    slope: float = 1.0,
    intercept: float = 0.0,
    signed: bool = False,
    low: int = 0,
    high: int = 1500,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 3,
    description: str = "SAG T2 TSE",
    syntax: str = dicom_uid.ExplicitVRLittleEndian,
    instance_numbers: Sequence[int] | None = None,
    seed: int = 1,
) -> Built:
    """A sagittal MR series (by default), T2-weighted timing unless told otherwise."""
    extra = {}
    if echo_time is not None:
        extra["EchoTime"] = f"{echo_time:g}"
    if repetition_time is not None:
        extra["RepetitionTime"] = f"{repetition_time:g}"
    return cross_sectional_series(
        modality="MR",
        sop_class_uid=dicom_uid.MRImageStorage,
        n=n,
        rows=rows,
        cols=cols,
        orientation=orientation,
        spacing=spacing,
        offsets=offsets,
        origin=origin,
        pixel_spacing=pixel_spacing,
        thickness=thickness,
        slope=slope,
        intercept=intercept,
        signed=signed,
        low=low,
        high=high,
        bits_allocated=16,
        bits_stored=16,
        photometric="MONOCHROME2",
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        description=description,
        syntax=syntax,
        instance_numbers=instance_numbers,
        extra=extra,
        seed=seed,
    )


def radiograph(
    *,
    modality: str = "DX",
    rows: int = 20,
    cols: int = 16,
    view_position: str | None = "LL",
    patient_orientation: Sequence[str] | None = ("A", "F"),
    pixel_spacing: Sequence[float] | None = None,
    imager_pixel_spacing: Sequence[float] | None = (0.2, 0.2),
    magnification: float | None = 1.25,
    photometric: str = "MONOCHROME1",
    bits_stored: int = 12,
    bits_allocated: int = 16,
    slope: float = 1.0,
    intercept: float = 0.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 4,
    instance_number: int = 1,
    description: str = "C-SPINE LAT",
    syntax: str = dicom_uid.ExplicitVRLittleEndian,
    for_processing: bool = False,
    seed: int = 2,
) -> Built:
    """One projection radiograph (DX by default, a MONOCHROME1 lateral with ImagerPixelSpacing)."""
    study_uid = study_uid or dicom_uid.generate_uid()
    series_uid = series_uid or dicom_uid.generate_uid()
    sop_class = {
        ("DX", False): dicom_uid.DigitalXRayImageStorageForPresentation,
        ("DX", True): dicom_uid.DigitalXRayImageStorageForProcessing,
        ("CR", False): dicom_uid.ComputedRadiographyImageStorage,
        ("CR", True): dicom_uid.ComputedRadiographyImageStorage,
    }[(modality, for_processing)]
    ds = base_dataset(
        sop_class_uid=sop_class,
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        instance_number=instance_number,
        description=description,
    )
    if view_position is not None:
        ds.ViewPosition = view_position
    if pixel_spacing is not None:
        ds.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = [f"{v:g}" for v in imager_pixel_spacing]
    if magnification is not None:
        ds.EstimatedRadiographicMagnificationFactor = f"{magnification:g}"
    ds.PresentationIntentType = "FOR PROCESSING" if for_processing else "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    ds.ImageLaterality = "U"
    ds.LossyImageCompression = "00"
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.KVP = "80"
    ds.DetectorType = "DIRECT"
    ds.RescaleType = "US"
    ds.WindowCenter, ds.WindowWidth = f"{1 << (bits_stored - 1)}", f"{1 << bits_stored}"
    ds.AcquisitionContextSequence = DicomSequence([])
    ds.AnatomicRegionSequence = DicomSequence([])
    ds.PatientOrientation = list(patient_orientation) if patient_orientation is not None else ""
    ds.RescaleSlope = f"{slope:g}"
    ds.RescaleIntercept = f"{intercept:g}"
    stored = pattern((1, rows, cols), 0, (1 << bits_stored) - 1, seed)
    set_pixels(
        ds, stored[0], signed=False, bits_allocated=bits_allocated, bits_stored=bits_stored, photometric=photometric
    )
    files = [(f"{modality.lower()}_{series_number}_{instance_number}.dcm", encode(ds, syntax))]
    return Built(files, stored, np.zeros((1, 3)), study_uid, series_uid, slope, intercept)


def enhanced_series(
    n_frames: int = 5,
    *,
    modality: str = "CT",
    rows: int = 10,
    cols: int = 12,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 2.0,
    origin: Sequence[float] = (0.0, 0.0, 40.0),
    pixel_spacing: Sequence[float] = (0.6, 0.6),
    frame_order: Sequence[int] | None = None,
    slopes: Sequence[float] | None = None,
    intercept: float = -1000.0,
    echo_time: float = 95.0,
    repetition_time: float = 2800.0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 5,
    description: str = "ENHANCED",
    syntax: str = dicom_uid.ExplicitVRLittleEndian,
    per_frame_positions: bool = True,  # False: a broken file whose frames cannot be placed
    seed: int = 3,
) -> Built:
    """One enhanced CT or MR multi-frame instance. Frame f lies at slice ``frame_order[f]`` (default: a
    shuffled order, so that ingest must sort), with rescale slope ``slopes[f]`` per frame when given
    (else one shared slope of 1). ``stored``/``positions`` in the result are in slice order."""
    study_uid = study_uid or dicom_uid.generate_uid()
    series_uid = series_uid or dicom_uid.generate_uid()
    default_order = sorted(range(n_frames), key=lambda k: (k % 2, -k))  # e.g. 4, 2, 0, 3, 1
    order = list(frame_order) if frame_order is not None else default_order
    if sorted(order) != list(range(n_frames)):
        raise ValueError("frame_order must be a permutation")
    sop_class = {"CT": dicom_uid.EnhancedCTImageStorage, "MR": dicom_uid.EnhancedMRImageStorage}[modality]
    ds = base_dataset(
        sop_class_uid=sop_class,
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        description=description,
    )
    ds.FrameOfReferenceUID = dicom_uid.generate_uid()
    slice_positions = (
        np.asarray(origin, float)[None, :] + (np.arange(n_frames) * spacing)[:, None] * _normal(orientation)[None, :]
    )
    slice_stored = pattern((n_frames, rows, cols), 0, 2000, seed)
    shared = Dataset()
    plane_orientation = Dataset()
    plane_orientation.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
    measures = Dataset()
    measures.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    measures.SliceThickness = f"{spacing:g}"
    shared.PlaneOrientationSequence = DicomSequence([plane_orientation])
    shared.PixelMeasuresSequence = DicomSequence([measures])
    if slopes is None:
        transformation = Dataset()
        transformation.RescaleSlope = "1"
        transformation.RescaleIntercept = f"{intercept:g}"
        transformation.RescaleType = "HU" if modality == "CT" else "US"
        shared.PixelValueTransformationSequence = DicomSequence([transformation])
    if modality == "MR":
        timing = Dataset()
        timing.RepetitionTime = repetition_time
        shared.MRTimingAndRelatedParametersSequence = DicomSequence([timing])
        echo = Dataset()
        echo.EffectiveEchoTime = echo_time
        shared.MREchoSequence = DicomSequence([echo])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    frame_stored = np.empty_like(slice_stored)
    frame_slopes = []
    for f, k in enumerate(order):
        item = Dataset()
        content = Dataset()
        content.InStackPositionNumber = k + 1
        item.FrameContentSequence = DicomSequence([content])
        if per_frame_positions:
            position = Dataset()
            position.ImagePositionPatient = [f"{v:.4f}" for v in slice_positions[k]]
            item.PlanePositionSequence = DicomSequence([position])
        if slopes is not None:
            transformation = Dataset()
            transformation.RescaleSlope = f"{slopes[f]:g}"
            transformation.RescaleIntercept = f"{intercept:g}"
            transformation.RescaleType = "HU" if modality == "CT" else "US"
            item.PixelValueTransformationSequence = DicomSequence([transformation])
        frame_slopes.append(slopes[f] if slopes is not None else 1.0)
        per_frame.append(item)
        frame_stored[f] = slice_stored[k]
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    set_pixels(ds, frame_stored, signed=False, bits_allocated=16, bits_stored=16)
    files = [(f"enhanced_{modality.lower()}_{series_number}.dcm", encode(ds, syntax))]
    slice_slopes = np.empty(n_frames)
    for f, k in enumerate(order):
        slice_slopes[k] = frame_slopes[f]
    built = Built(files, slice_stored, slice_positions, study_uid, series_uid, 1.0, intercept)
    built.extra["slice_slopes"] = slice_slopes
    built.extra["frame_order"] = order
    return built


def colour_image(*, modality: str = "CT", study_uid: str | None = None, series_number: int = 8) -> Built:
    """An RGB image of an analysed modality (a secondary-capture-like screenshot), which ingest skips."""
    study_uid = study_uid or dicom_uid.generate_uid()
    series_uid = dicom_uid.generate_uid()
    ds = base_dataset(
        sop_class_uid=dicom_uid.CTImageStorage if modality == "CT" else dicom_uid.SecondaryCaptureImageStorage,
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        description="SCREENSHOT",
    )
    rgb = (pattern((1, 8, 8), 0, 255)[0][..., None] * np.array([1, 0, 0]) % 256).astype(np.uint8)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = 8, 8
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.ImagePositionPatient = ["0", "0", "0"]
    ds.ImageOrientationPatient = list(AXIAL)
    ds.PixelSpacing = ["1", "1"]
    ds.PixelData = rgb.tobytes()
    return Built([("colour.dcm", encode(ds))], rgb[None], np.zeros((1, 3)), study_uid, series_uid)


def other_modality_image(modality: str = "US", *, study_uid: str | None = None, series_number: int = 9) -> Built:
    """A greyscale image of a modality cspine does not analyse."""
    study_uid = study_uid or dicom_uid.generate_uid()
    series_uid = dicom_uid.generate_uid()
    sop_class = {
        "US": dicom_uid.UltrasoundImageStorage,
        "NM": dicom_uid.NuclearMedicineImageStorage,
        "OT": dicom_uid.SecondaryCaptureImageStorage,
    }[modality]
    ds = base_dataset(
        sop_class_uid=sop_class,
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        series_number=series_number,
        description=f"{modality} IMAGE",
    )
    stored = pattern((1, 6, 7), 0, 200)
    set_pixels(ds, stored[0], signed=False, bits_allocated=8)
    return Built([(f"{modality.lower()}.dcm", encode(ds))], stored, np.zeros((1, 3)), study_uid, series_uid)


def sr_document(*, study_uid: str, series_number: int = 90) -> tuple[str, bytes]:
    """A Basic Text SR: no pixels, skipped by ingest."""
    ds = base_dataset(
        sop_class_uid=dicom_uid.BasicTextSRStorage,
        modality="SR",
        study_uid=study_uid,
        series_uid=dicom_uid.generate_uid(),
        series_number=series_number,
        description="REPORT",
    )
    ds.ContentDate = "20240102"
    ds.ContentTime = "111111"
    ds.PerformedProcedureCodeSequence = DicomSequence([])
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue = "18748-4"
    concept.CodingSchemeDesignator = "LN"
    concept.CodeMeaning = "Diagnostic Imaging Report"
    ds.ConceptNameCodeSequence = DicomSequence([concept])
    return "report_sr.dcm", encode(ds)


def dicomdir_bytes() -> bytes:
    """A minimal DICOMDIR (Media Storage Directory): no study, no image."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dicom_uid.MediaStorageDirectoryStorage
    meta.MediaStorageSOPInstanceUID = dicom_uid.generate_uid()
    meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "CSPINE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = DicomSequence([])
    return _save(ds)


def dataset_of(data: bytes) -> Dataset:
    """Read built bytes back (for tests that edit a header)."""
    return pydicom.dcmread(io.BytesIO(data))


def fuzz_seed_files() -> list[tuple[str, bytes]]:
    """Valid instances for the fuzz test to damage: CT and MR slices, a radiograph, an enhanced multi-frame
    instance and one file per compressed or unusual encoding (swap in phantom-generated files here)."""
    ct = ct_series(1, rows=8, cols=8, signed=True, low=-500, high=500, intercept=0.0)
    mr = mr_series(1, rows=8, cols=8)
    xr = radiograph(rows=8, cols=8)
    enhanced = enhanced_series(3, rows=6, cols=6)
    encoded = [
        ct_series(1, rows=8, cols=8, syntax=dicom_uid.RLELossless, seed=5),
        mr_series(1, rows=8, cols=8, syntax=dicom_uid.JPEGLSLossless, seed=6),
        ct_series(1, rows=32, cols=32, syntax=dicom_uid.JPEG2000Lossless, seed=7),
        ct_series(1, rows=8, cols=8, syntax=dicom_uid.JPEGLosslessSV1, seed=8),
        ct_series(
            1,
            rows=8,
            cols=8,
            syntax=dicom_uid.JPEGBaseline8Bit,
            bits_allocated=8,
            bits_stored=8,
            high=255,
            intercept=0.0,
            seed=9,
        ),
        ct_series(1, rows=8, cols=8, syntax=dicom_uid.DeflatedExplicitVRLittleEndian, seed=10),
        mr_series(1, rows=8, cols=8, syntax=dicom_uid.ExplicitVRBigEndian, seed=11),
    ]
    return [built.files[0] for built in (ct, mr, xr, enhanced, *encoded)]


# --------------------------------------------------------------------------------------------------------
# Patient and study headers malformed in every value representation, each value holding PHI_MARKER: the log
# tests look for the marker in every log line and on stderr, the output tests in the SEG and SR.

PHI_MARKER = "QXPHI7"
_M = PHI_MARKER
# keyword -> raw value (a list: several values), each invalid for its VR as the comment says. Some also hold
# quotes, a line break or a non-ASCII letter, as a value quoted in an error message may.
MALFORMED_PATIENT_STUDY: dict[str, str | list[str]] = {
    # Patient
    "PatientName": f"{_M}^O'Brien^a^b^c^d",  # PN: six components (five at most), a quote
    "PatientID": f"{_M}-" + "9" * 64,  # LO: 71 characters (64 at most)
    "IssuerOfPatientID": f'{_M} "issuer" ' + "i" * 60,  # LO: too long, double quotes
    "TypeOfPatientID": f"{_M}-text",  # CS: lower case and '-'
    "PatientBirthDate": f"03.02.1901{_M}",  # DA: the birth date, not YYYYMMDD
    "PatientBirthTime": f"25{_M}",  # TM: not HHMMSS
    "PatientSex": f"{_M}?",  # CS: '?', and not M, F or O
    "OtherPatientIDs": [f"{_M}-OTHER", "o" * 70],  # LO: the second value too long
    "OtherPatientNames": f"{_M}=a=b=c",  # PN: four component groups (three at most)
    "PatientComments": f'{_M} it\'s "quoted"\r\nline two, é ' + "c" * 10300,  # LT: over 10240 characters
    "PatientIdentityRemoved": f"{_M}-MAYBE",  # CS: '-'
    # General Study
    "StudyDate": _M,  # DA
    "StudyTime": f"99{_M}",  # TM
    "AccessionNumber": f"{_M}-ACCESSION-NO",  # SH: 19 characters (16 at most)
    "ReferringPhysicianName": f"{_M}^a^b^c^d^e",  # PN: six components
    "ConsultingPhysicianName": f"{_M}=1=2=3",  # PN: four groups
    "StudyDescription": f"{_M} " + "d" * 64,  # LO: too long
    "PhysiciansOfRecord": f"{_M}^" + "p" * 70,  # PN: a component of 70 characters (64 at most)
    "NameOfPhysiciansReadingStudy": f"{_M}^r^e^a^d^x",  # PN: six components
    "StudyID": f"{_M}-STUDY-ID-X",  # SH: 17 characters
    # Patient Study
    "AdmittingDiagnosesDescription": f"{_M} " + "a" * 64,  # LO: too long
    "PatientAge": f"abc{_M}",  # AS: not nnnD/W/M/Y
    "PatientSize": f"1.7{_M}",  # DS: not a number
    "PatientWeight": _M,  # DS: not a number
    "MedicalAlerts": f"{_M} " + "m" * 64,  # LO: too long
    "Allergies": f"{_M} " + "l" * 64,  # LO: too long
    "Occupation": f"{_M} occupation",  # SH: 17 characters
    "SmokingStatus": f"{_M}-yes",  # CS: lower case and '-'
    "AdditionalPatientHistory": f"{_M} " + "h" * 10300,  # LT: too long
    "LastMenstrualDate": f"{_M}0101",  # DA
    "PatientState": f"{_M} " + "z" * 64,  # LO: too long
    "AdmissionID": f"{_M} " + "y" * 64,  # LO: too long
    # General Equipment and General Series: not copied into a SEG or SR, never logged either
    "InstitutionName": f"{_M} " + "n" * 64,  # LO: too long
    "InstitutionAddress": f"{_M} street " + "k" * 1024,  # ST: over 1024 characters
    "PerformingPhysicianName": f"{_M}^a^b^c^d^e",  # PN: six components
    "OperatorsName": f"{_M}=a=b=c",  # PN: four groups
    "AcquisitionNumber": _M,  # IS: not a number
    "StageNumber": f"1{_M}",  # IS: not a number
}


def with_malformed_patient_study(ds: Dataset) -> None:
    """Set every attribute of MALFORMED_PATIENT_STUDY in ``ds`` as raw bytes (UTF-8, no character set declared),
    so pydicom neither checks nor converts them here: whoever reads the file is the first to parse them."""
    for keyword, value in MALFORMED_PATIENT_STUDY.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        raw = "\\".join(value if isinstance(value, list) else [value]).encode()
        raw += b" " * (len(raw) % 2)
        vr = pydicom.datadict.dictionary_VR(tag)
        ds[tag] = pydicom.dataelem.RawDataElement(pydicom.tag.BaseTag(tag), vr, len(raw), raw, 0, False, True)
