"""What an uploaded object is to ingest (an image, a non-image object such as SR, SEG or RT, or a DICOMDIR),
and which DICOM modalities cspine analyses."""

from __future__ import annotations

import functools

import pydicom.uid
from pydicom.dataset import Dataset

from cspine.dicom.attributes import has
from cspine.dicom.records import Kind
from cspine.domain import Modality

__all__ = ["MODALITY_BY_DICOM", "classify"]

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


@functools.cache
def _sop_class_name(sop_class_uid: str) -> str:
    return pydicom.uid.UID(sop_class_uid).name if sop_class_uid else ""


def classify(ds: Dataset, sop_class_uid: str, modality: str, has_pixels: bool) -> Kind:
    if sop_class_uid == pydicom.uid.MediaStorageDirectoryStorage or has(ds, "DirectoryRecordSequence"):
        return Kind.DIRECTORY
    name = _sop_class_name(sop_class_uid)
    if modality in _NON_IMAGE_MODALITIES or any(word in name for word in _NON_IMAGE_SOP_CLASS_WORDS):
        return Kind.NON_IMAGE
    if has_pixels or _IMAGE_SOP_CLASS_WORD in name or (has(ds, "Rows") and has(ds, "Columns")):
        return Kind.IMAGE
    return Kind.NON_IMAGE
