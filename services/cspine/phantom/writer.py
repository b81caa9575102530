"""Write rendered SYNTHETIC series as DICOM Part-10 files: CT Image, MR Image, Digital X-Ray (DX).

Every object says it is synthetic (patient name, study/series descriptions, image comments). UIDs are
derived from the case seed, so the same seed writes the same study. Pixel storage varies from case to
case the way scanners vary (12- or 16-bit, signed or unsigned, rescale slope and intercept, MONOCHROME1
radiographs), so ingest meets those variants in every test run.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

import cspine
from cspine.domain import SeriesRole
from cspine.phantom.scanner import RenderedSeries

SYNTHETIC_NOTE = "SYNTHETIC phantom made by cspine: not patient data"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"

# How CT pixels are stored: (PixelRepresentation, BitsStored, RescaleIntercept, RescaleSlope).
CT_STORAGE = {
    "unsigned12": (0, 12, -1024.0, 1.0),
    "signed16": (1, 16, 0.0, 1.0),
    "unsigned16_half": (0, 16, -1024.0, 0.5),
}

_SERIES = {  # role: (series number, description)
    SeriesRole.CT: (2, "SYNTHETIC CT C-spine axial"),
    SeriesRole.MR_T1: (3, "SYNTHETIC MR C-spine sag T1"),
    SeriesRole.MR_T2: (4, "SYNTHETIC MR C-spine sag T2"),
    SeriesRole.XR: (1, "SYNTHETIC XR C-spine lateral"),
}


@dataclass(frozen=True)
class StudyInfo:
    """Study-level attributes shared by every series of one SYNTHETIC case."""

    case_id: str
    seed_key: str  # entropy for deterministic UIDs
    sex: str
    age_years: int
    date: dt.date
    site: str = ""  # a SYNTHETIC site's name (sites.SITES) other than the default: InstitutionName says it

    def uid(self, *parts: object) -> str:
        return generate_uid(entropy_srcs=[self.seed_key, *map(str, parts)])

    @property
    def study_instance_uid(self) -> str:
        return self.uid("study")


def _decimal(value: float) -> str:
    """A DS string of at most 16 characters."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if len(text) <= 16 else f"{value:.8g}"


def _common(
    study: StudyInfo,
    role: SeriesRole,
    sop_class: str,
    sop_uid: str,
    instance: int,
    modality: str,
    description: str | None = None,
) -> Dataset:
    number, default_description = _SERIES[role]
    description = description or default_description
    if not description.startswith("SYNTHETIC"):
        raise ValueError(f"a phantom series description must start with SYNTHETIC, got {description!r}")
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date = study.date.strftime("%Y%m%d")
    ds.InstanceCreationDate = date
    # Patient: SYNTHETIC, no real identity.
    ds.PatientName = f"SYNTHETIC^{study.case_id.upper()}"
    ds.PatientID = f"SYN-{study.case_id}"
    ds.PatientBirthDate = ""
    ds.PatientSex = study.sex
    ds.PatientAge = f"{study.age_years:03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = SYNTHETIC_NOTE
    # Study
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = date
    ds.StudyTime = "100000"
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.case_id[-16:]
    ds.AccessionNumber = ""
    ds.StudyDescription = "SYNTHETIC cervical spine phantom (cspine)"
    # Series
    ds.Modality = modality
    ds.SeriesInstanceUID = study.uid("series", role.value)
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.SeriesDate = date
    ds.SeriesTime = f"10{number:02d}00"
    ds.BodyPartExamined = "CSPINE"
    # Equipment
    ds.Manufacturer = "cspine (synthetic phantom)"
    ds.ManufacturerModelName = "cspine-phantom"
    ds.SoftwareVersions = cspine.__version__
    ds.InstitutionName = f"SYNTHETIC site {study.site}" if study.site else "SYNTHETIC"
    # Image
    ds.InstanceNumber = instance
    ds.ContentDate = date
    ds.ContentTime = ds.SeriesTime
    ds.AcquisitionNumber = 1
    ds.ImageComments = SYNTHETIC_NOTE
    ds.BurnedInAnnotation = "NO"
    return ds


def _code(code: Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def _pixels(ds: Dataset, stored: np.ndarray, bits_stored: int, signed: bool, photometric: str = "MONOCHROME2") -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.PixelData = stored.astype("<i2" if signed else "<u2").tobytes()


def _plane(ds: Dataset, series: RenderedSeries, k: int) -> None:
    position = series.origin + series.slice_normal * series.slice_spacing * k
    ds.ImagePositionPatient = [_decimal(v) for v in position]
    ds.ImageOrientationPatient = [_decimal(v) for v in (*series.row_direction, *series.column_direction)]
    ds.PixelSpacing = [_decimal(v) for v in series.pixel_spacing]
    ds.SliceThickness = _decimal(series.slice_thickness)
    ds.SliceLocation = _decimal(float(position @ series.slice_normal))
    ds.PatientPosition = "HFS"
    ds.PositionReferenceIndicator = ""


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_ct(
    series: RenderedSeries, study: StudyInfo, out_dir: Path, storage: str, description: str | None = None
) -> list[Path]:
    representation, bits, intercept, slope = CT_STORAGE[storage]
    lo = -(2 ** (bits - 1)) if representation else 0
    hi = 2 ** (bits - 1) - 1 if representation else 2**bits - 1
    count = series.values.shape[0]
    paths = []
    for k in range(count):
        instance = count - k  # scanned head first: instance 1 is the most superior slice
        uid = study.uid("ct", k)
        ds = _common(study, SeriesRole.CT, CT_IMAGE_STORAGE, uid, instance, "CT", description)
        ds.FrameOfReferenceUID = study.uid("for", "ct")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        _plane(ds, series, k)
        stored = np.clip(np.rint((series.values[k] - intercept) / slope), lo, hi)
        _pixels(ds, stored, bits, bool(representation))
        ds.RescaleIntercept = _decimal(intercept)
        ds.RescaleSlope = _decimal(slope)
        ds.RescaleType = "HU"
        ds.KVP = _decimal(series.acquisition["kvp"])
        ds.ConvolutionKernel = series.acquisition["kernel"]
        ds.WindowCenter = "400"
        ds.WindowWidth = "1800"
        ds.WindowCenterWidthExplanation = "BONE"
        path = out_dir / f"CT{instance:04d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def mr_scale(values: np.ndarray, bits: int) -> float:
    """Factor from MR signal to stored values: the 99.9th percentile lands at 80 % of the range."""
    peak = float(np.percentile(values, 99.9)) or 1.0
    return min(1.0, (2**bits - 1) * 0.8 / peak)


def write_mr(
    series: RenderedSeries, study: StudyInfo, out_dir: Path, bits: int, description: str | None = None
) -> list[Path]:
    count = series.values.shape[0]
    t1 = series.role is SeriesRole.MR_T1
    scale = mr_scale(series.values, bits)
    prefix = "T1" if t1 else "T2"
    paths = []
    for k in range(count):
        instance = k + 1
        uid = study.uid(series.role.value, k)
        ds = _common(study, series.role, MR_IMAGE_STORAGE, uid, instance, "MR", description)
        ds.FrameOfReferenceUID = study.uid("for", "mr")
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        _plane(ds, series, k)
        ds.SpacingBetweenSlices = _decimal(series.slice_spacing)
        stored = np.clip(np.rint(series.values[k] * scale), 0, 2**bits - 1)
        _pixels(ds, stored, bits, signed=False)
        acq = series.acquisition
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = ["SK", "SP"] if not t1 else "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = _decimal(acq["tr"])
        ds.EchoTime = _decimal(acq["te"])
        ds.EchoTrainLength = acq["etl"]
        ds.MagneticFieldStrength = _decimal(acq["field_strength"])
        ds.ImagedNucleus = "1H"
        ds.SequenceName = "tse2d1" if not t1 else "se2d1"
        ds.ProtocolName = f"SYNTHETIC sag {prefix}"
        center = float(np.percentile(stored, 60))
        ds.WindowCenter = _decimal(center)
        ds.WindowWidth = _decimal(max(2 * center, 1.0))
        path = out_dir / f"{prefix}{instance:04d}.dcm"
        _save(ds, path)
        paths.append(path)
    return paths


def write_xr(series: RenderedSeries, study: StudyInfo, out_dir: Path, description: str | None = None) -> list[Path]:
    acq = series.acquisition
    image = series.values[0]
    lo, hi = np.percentile(image, [0.5, 99.8])
    stored = np.clip(np.rint((image - lo) / max(hi - lo, 1e-6) * 4095), 0, 4095)
    monochrome1 = bool(acq["monochrome1"])
    if monochrome1:
        stored = 4095 - stored
    uid = study.uid("xr", 0)
    ds = _common(study, SeriesRole.XR, DX_PRESENTATION_STORAGE, uid, 1, "DX", description)
    ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = [str(acq["facing"]), "F"]
    ds.ImageLaterality = "U"
    ds.ViewPosition = "LL" if acq["facing"] == "A" else "RL"
    ds.ViewCodeSequence = [_code(codes.SCT.LeftLateral if acq["facing"] == "A" else codes.SCT.RightLateral)]
    ds.AnatomicRegionSequence = [_code(codes.SCT.CervicalSpine)]
    ds.PositionerType = "COLUMN"
    ds.KVP = _decimal(acq["kvp"])
    magnification = float(acq["magnification"])
    ds.ImagerPixelSpacing = [_decimal(s * magnification) for s in series.pixel_spacing]
    ds.PixelSpacing = [_decimal(s) for s in series.pixel_spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "SYNTHETIC parallel projection; magnification known exactly"
    ds.EstimatedRadiographicMagnificationFactor = _decimal(magnification)
    ds.DistanceSourceToDetector = _decimal(acq["sid_mm"])
    ds.DistanceSourceToPatient = _decimal(acq["sid_mm"] / magnification)
    ds.DetectorType = "SCINTILLATOR"
    ds.AcquisitionContextSequence = []
    _pixels(ds, stored, 12, signed=False, photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2")
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if monochrome1 else -1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.LossyImageCompression = "00"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    path = out_dir / "DX0001.dcm"
    _save(ds, path)
    return [path]
