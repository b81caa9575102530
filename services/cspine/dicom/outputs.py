"""DICOM outputs of an analysis, made with highdicom: a SEG of the label map on one source series, a TID 1500
Comprehensive 3D SR with the lesions, assessments and spine measurements, and a reader for that SR.

Only assessed modalities are segmented and reported as findings. A modality (or a fused assessment) that is not
assessable is reported as "Assessability: Not assessable" with one coded reason each (the ``ReasonCode`` value,
its message as the TEXT item after it) and no finding, score or probability. The models' disclosure (what they
were trained on) is a TEXT item of the report's own Qualitative Evaluations; model versions are algorithm
parameters of every group that names the algorithm.

Source headers that lack what a SEG needs are fixed where the SEG stays valid, and refused otherwise with
``OutputUnavailableError`` (the pipeline then leaves the object out with an ``output_unavailable`` notice):

- no SliceThickness on a CT or MR series: fixed, the slice spacing is written as the SEG's slice thickness;
- a radiograph: its SEG lies on the pixel grid, without frame of reference or plane position (the position of a
  projection is nominal), with the source's PatientOrientation;
- no FrameOfReferenceUID on a CT or MR series: refused (the CT and MR IODs make it mandatory, highdicom will not
  make a SEG of such a source, and a SEG of several slices cannot be placed without one);
- a patient or study attribute whose value is not valid for its VR (a birth date "03.02.1901", an age "abc", a
  name of too many components, a LO too long …): left empty in the SEG or SR (the Patient and General Study
  attributes are type 2 or 3), with an ``output_value_omitted`` notice naming the attribute by keyword, never
  its value; a missing type-2 one is written empty;
- whatever else highdicom or pydicom refuse: refused, naming the exception type only.

UIDs. Sending the outputs of a re-analysis into a PACS must replace, not pile up: the Series and SOP Instance
UIDs of the SEG and SR are derived (``generate_uid(entropy_srcs=...)``, pydicom's root) from what decides their
content, never drawn at random:

- the object kind ("SEG", "SEG series", "SR", "SR series");
- the StudyInstanceUID, the Series Instance UIDs of every series the analysis used with the number of slices
  it used of each (and the SEG's own source series), the name and version of every model of the analysis, and
  the prototype set version;
- for the SR, also the SOP Instance UID of the SEG it references (none: an SR without a SEG differs from one
  with it).

The same study analysed again with the same models and prototype set gives the same UIDs; another prototype
set version, another model version, another source series or more of a series' slices (a study analysed
again once late instances arrived) gives others. The cspine software version is not
part of it (the algorithm parameters name the models, which decide the findings). The tracking UIDs of the SEG's
segments and of the SR's measurement groups are derived from their object's SOP Instance UID and their
identifier, so an object sent again is the same object. The failure SR (``build_failure_sr``, for a study
cspine could not analyse) derives its UIDs from the StudyInstanceUID and the message.

What the SR's lesion groups reference (IHE AI Results): the SEG holds one series (the first of ``SEG_SOURCES``
with a labelled structure) and one "Tumor" segment for all lesions of it (lesions are the connected components
of that segment). A lesion measured on the SEG's source series, when a SEG is written with the SR, is a TID 1411
Volumetric ROI group (a CT or MR lesion) whose Referenced Segment is the SEG's tumor segment, with the lesion's
slices that hold tumor frames as its Source Images for Segmentation; on a radiograph it is a TID 1410 Planar
ROI group whose Referenced Segmentation Frame is the tumor segment's frame on the radiograph. A viewer that
follows the reference finds the tumor mask on the lesion's slices: the lesion's own voxels and those of any
other lesion on the same slices. A lesion of another series (the SEG holds one modality), one whose slices hold
no tumor frame of the SEG (an MR lesion seen on T1 only), and every lesion of an SR written without a SEG, stays
a TID 1501 image-level group referencing the slices through the lesion.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import numbers
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr.utils import find_content_items
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid
from pydicom.valuerep import DA, DT, TM, DSfloat

import cspine
from cspine.domain import (
    Assessment,
    AssessmentStatus,
    Lesion,
    LevelMeasurement,
    Modality,
    ModalityResult,
    Notice,
    NoticeCode,
    OodScore,
    ReasonCode,
    Series,
    SeriesRole,
    SpineMeasurements,
    StudyAnalysis,
)
from cspine.errors import OutputUnavailableError
from cspine.inference.specs import SEG_LABELS

logger = logging.getLogger(__name__)

__all__ = [
    "OutputUnavailableError",
    "build_failure_sr",
    "build_seg",
    "build_sr",
    "read_sr_evaluations",
    "read_sr_measurements",
]


# What highdicom and pydicom raise on source headers they cannot use.
WRITER_ERRORS = (ValueError, TypeError, AttributeError, LookupError)

MANUFACTURER = "cspine"
SEG_SERIES_NUMBER = 901
SR_SERIES_NUMBER = 902
SEG_SERIES_DESCRIPTION = "cspine segmentation (software output, research use only)"
SR_SERIES_DESCRIPTION = "cspine tumor report (software output, research use only)"
FAILURE_SR_SERIES_DESCRIPTION = "cspine: study not analysed (software output, research use only)"
# Software has no serial number, but the Enhanced General Equipment module requires one.
DEVICE_SERIAL_NUMBER = f"cspine-{cspine.__version__}"
# The observer device UID is derived, not random, so every report of one version names the same device.
DEVICE_OBSERVER_UID = generate_uid(entropy_srcs=["cspine device observer", cspine.__version__])

# The SEG segments one source series: the first of these whose modality has a non-empty label map on it.
SEG_SOURCES: tuple[tuple[Modality, SeriesRole], ...] = (
    (Modality.CT, SeriesRole.CT),
    (Modality.MR, SeriesRole.MR_T2),
    (Modality.MR, SeriesRole.MR_T1),
    (Modality.XR, SeriesRole.XR),
)

# --------------------------------------------------------------------------------------------------------
# Codes. Standard (SCT, DCM, UCUM) where one exists; the rest in the private scheme 99CSPINE.

CSPINE_SCHEME = "99CSPINE"
CODING_SCHEMES = [
    CodingSchemeIdentificationItem(
        designator=CSPINE_SCHEME,
        name="cspine private concepts",
        version=cspine.__version__,
        responsible_organization="cspine project",
    )
]


def _private(value: str, meaning: str) -> Code:
    return Code(value, CSPINE_SCHEME, meaning)


VERTEBRAL_BODY = Code("3572006", "SCT", "Vertebral body")
INTERVERTEBRAL_DISC = Code("360499006", "SCT", "Intervertebral disc")
DETECTION_SCORE = _private("DETECTION-SCORE", "Tumor detection score")
UNCERTAINTY = _private("UNCERTAINTY", "Classification uncertainty (normalised entropy)")
CORD_COMPRESSION_RATIO = _private("CORD-COMPRESSION", "Cord compression ratio (AP / LR diameter)")
OPLL_OCCUPYING_RATIO = _private("OPLL-OCCUPYING", "OPLL occupying ratio")
OPLL_MAX_THICKNESS = _private("OPLL-THICKNESS", "OPLL maximum thickness")
OOD_SCORE = _private("OOD-SCORE", "Out-of-distribution score (Mahalanobis distance)")
OOD_THRESHOLD = _private("OOD-THRESHOLD", "Out-of-distribution threshold")
ASSESSABILITY = _private("ASSESSABILITY", "Assessability")
ASSESSABILITY_VALUES: dict[AssessmentStatus, Code] = {
    AssessmentStatus.ASSESSED: _private("ASSESSED", "Assessed"),
    AssessmentStatus.NOT_ASSESSABLE: _private("NOT-ASSESSABLE", "Not assessable"),
}
NOT_ASSESSABLE_REASON = _private("NA-REASON", "Reason not assessable")
REASON_DETAILS = _private("NA-REASON-TEXT", "Reason details")
# A reason's code value is the ReasonCode value (LongCodeValue when over 16 characters); its meaning is fixed
# per code (at most 64 characters) and the reason's own message follows as a TEXT item.
REASON_CODES: dict[ReasonCode, Code] = {
    r: _private(r.value, r.value.replace("_", " ").capitalize()) for r in ReasonCode
}
DISCLOSURE = _private("DISCLOSURE", "Model training data and intended use")
# The failure SR's document title (in place of a CID 7021 title, which has none for "not analysed") and reason.
NOT_ANALYSED_TITLE = _private("NOT-ANALYSED", "Study not analysed by cspine")
NOT_ANALYSED_REASON = _private("NOT-ANALYSED-REASON", "Reason not analysed")
# TID 1500's container for report-level qualitative evaluations (CODE or TEXT items).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
MILLILITER = Code("ml", "UCUM", "milliliter")
MM = codes.UCUM.Millimeter
MM2 = codes.UCUM.SquareMillimeter
DEGREE = codes.UCUM.Degree
RATIO = codes.UCUM.Ratio
NO_UNITS = codes.UCUM.NoUnits

LEVEL_CODES: dict[str, Code] = {
    "C1": codes.SCT.C1Vertebra,
    "C2": codes.SCT.C2Vertebra,
    "C3": codes.SCT.C3Vertebra,
    "C4": codes.SCT.C4Vertebra,
    "C5": codes.SCT.C5Vertebra,
    "C6": codes.SCT.C6Vertebra,
    "C7": codes.SCT.C7Vertebra,
    "T1": codes.SCT.T1Vertebra,
}
# The disc a level's disc height is measured on: the one below it.
DISC_BELOW: dict[str, tuple[str, Code]] = {
    "C2": ("C2-C3", codes.SCT.C2C3Disc),
    "C3": ("C3-C4", codes.SCT.C3C4Disc),
    "C4": ("C4-C5", codes.SCT.C4C5Disc),
    "C5": ("C5-C6", codes.SCT.C5C6Disc),
    "C6": ("C6-C7", codes.SCT.C6C7Disc),
    "C7": ("C7-T1", codes.SCT.C7T1Disc),
}
MODALITY_CODES: dict[Modality, Code] = {
    Modality.CT: codes.DCM.ComputedTomography,
    Modality.MR: codes.DCM.MagneticResonance,
    Modality.XR: codes.DCM.DigitalRadiography,
}
PROCEDURE_CODES: dict[Modality, Code] = {
    Modality.CT: codes.cid100.CTUnspecifiedBodyRegion,
    Modality.MR: codes.cid100.MRIUnspecifiedBodyRegion,
    Modality.XR: codes.cid100.XRUnspecifiedBodyRegion,
}
PRESENT_ABSENT: dict[bool, Code] = {True: codes.SCT.Present, False: codes.SCT.Absent}


@dataclass(frozen=True)
class SegmentCode:
    """How one structure of a label table is described as a SEG segment."""

    label: str
    category: Code
    type: Code
    region: Code | None = None
    rgb: tuple[int, int, int] = (200, 200, 200)


_ANATOMY = codes.SCT.AnatomicalStructure
_ABNORMAL = codes.SCT.MorphologicallyAbnormalStructure


def _body(level: str, rgb: tuple[int, int, int]) -> SegmentCode:
    return SegmentCode(f"{level} vertebral body", _ANATOMY, VERTEBRAL_BODY, LEVEL_CODES[level], rgb)


SEGMENT_CODES: dict[str, SegmentCode] = {
    "tumor": SegmentCode("Tumor", _ABNORMAL, codes.SCT.Neoplasm, rgb=(230, 30, 30)),
    "vertebral_body": SegmentCode("Vertebral body", _ANATOMY, VERTEBRAL_BODY, rgb=(241, 214, 145)),
    "posterior_elements": SegmentCode("Posterior elements", _ANATOMY, codes.SCT.ArchOfVertebra, rgb=(216, 180, 110)),
    "disc": SegmentCode("Intervertebral disc", _ANATOMY, INTERVERTEBRAL_DISC, rgb=(90, 160, 230)),
    "canal": SegmentCode("Spinal canal", _ANATOMY, codes.SCT.SpinalCanalStructure, rgb=(120, 220, 220)),
    "csf": SegmentCode("CSF", codes.SCT.BodySubstance, codes.SCT.CerebrospinalFluid, rgb=(120, 220, 220)),
    "cord": SegmentCode("Spinal cord", _ANATOMY, codes.SCT.SpinalCord, rgb=(250, 240, 120)),
    "opll": SegmentCode(
        "OPLL (ossified posterior longitudinal ligament)", _ABNORMAL, codes.SCT.Ossification, rgb=(230, 130, 30)
    ),
    "c2_body": _body("C2", (241, 214, 145)),
    "c3_body": _body("C3", (200, 230, 150)),
    "c4_body": _body("C4", (241, 214, 145)),
    "c5_body": _body("C5", (200, 230, 150)),
    "c6_body": _body("C6", (241, 214, 145)),
    "c7_body": _body("C7", (200, 230, 150)),
    "t1_body": _body("T1", (241, 214, 145)),  # not in a model's table: a cohort's labels (cspine phantom) use it
    "other_body": SegmentCode("Other vertebral body", _ANATOMY, VERTEBRAL_BODY, rgb=(170, 170, 170)),
}


# --------------------------------------------------------------------------------------------------------
# UIDs (the rule is in the module docstring)


def _derived_uid(kind: str, *sources: str) -> hd.UID:
    """A UID derived from ``kind`` and ``sources`` only. They are hashed as one JSON list, so that ("ab", "c")
    and ("a", "bc") differ (pydicom joins its entropy sources without a separator)."""
    return hd.UID(generate_uid(entropy_srcs=[json.dumps(["cspine", kind, *sources])]))


def _content_sources(analysis: StudyAnalysis, *series_uids: str) -> tuple[str, ...]:
    """What decides the content of an analysis' outputs: the study, the series it used with their slice counts
    (a series analysed again once more of its instances have arrived gives new objects, not the old UIDs with
    other content), ``series_uids``, its models' names and versions and the prototype set version; each list
    sorted, so order does not count."""
    series = {f"{used.series_instance_uid} {used.slices}" for result in analysis.modalities for used in result.series}
    return (
        analysis.study_instance_uid,
        "series",
        *sorted(series.union(series_uids)),
        "models",
        *sorted(f"{model.name} {model.version}" for model in analysis.models),
        "prototype set",
        analysis.prototype_set_version,
    )


def _tracking(object_uid: str, identifier: str) -> hd.sr.TrackingIdentifier:
    """A measurement group's tracking identifier, its UID derived from its SR's SOP Instance UID."""
    return hd.sr.TrackingIdentifier(uid=_derived_uid("tracking", object_uid, identifier), identifier=identifier)


def _algorithm_sequence(name: str = "cspine") -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(
        name=name, family=codes.DCM.ArtificialIntelligence, version=cspine.__version__, source=MANUFACTURER
    )


# --------------------------------------------------------------------------------------------------------
# SEG


def build_seg(
    analysis: StudyAnalysis, chosen: Mapping[SeriesRole, Series], notices: list[Notice] | None = None
) -> bytes | None:
    """A binary DICOM SEG of the first non-empty label map of an assessed modality in ``SEG_SOURCES`` order,
    one segment per structure present; None when no assessed modality has a labelled voxel. Source values left
    out of it (not valid for their VR) are told in an ``output_value_omitted`` notice appended to ``notices``.

    Raises ``OutputUnavailableError`` when the source series does not allow a valid SEG."""
    for modality, role in SEG_SOURCES:
        result = analysis.modality(modality)
        if result is None or not result.assessment.assessed:
            continue  # a not-assessable modality's structures are not shown as findings
        labels = result.labels.get(role)
        if labels is None or not labels.any():
            continue
        if role not in chosen:
            raise OutputUnavailableError(
                f"DICOM SEG not written: the {modality.value} label map is on the {role.value} series, "
                "which was not chosen"
            )
        with _writing("SEG", f"the {modality.value} series"):
            sources = _content_sources(analysis, chosen[role].series_instance_uid)
            seg, omitted = _segmentation(modality, chosen[role], labels, sources)
            data = _encode(seg)
        _tell_omitted("SEG", omitted, notices)
        return data
    logger.info("no label map of an assessed modality holds a structure: no DICOM SEG")
    return None


@contextmanager
def _writing(kind: str, source: str) -> Iterator[None]:
    """What highdicom or pydicom raise on headers they cannot use, as ``OutputUnavailableError``. Only the
    exception's type is kept: its message may quote header values."""
    try:
        yield
    except WRITER_ERRORS as exc:
        raise OutputUnavailableError(
            f"DICOM {kind} not written: highdicom could not make one of {source} ({type(exc).__name__})"
        ) from exc


@dataclass(frozen=True)
class SegKind:
    """What a SEG says it is: cspine's analysis output, or labels written as a cohort's ground truth."""

    series_number: int
    series_description: str
    content_label: str
    algorithm: str  # the AlgorithmName of every segment (highdicom's algorithm type AUTOMATIC)


RESULT_SEG = SegKind(SEG_SERIES_NUMBER, SEG_SERIES_DESCRIPTION, "CSPINE", "cspine")


def _segmentation(
    modality: Modality, series: Series, labels: np.ndarray, uid_sources: Sequence[str]
) -> tuple[hd.seg.Segmentation, list[str]]:
    """The analysis' SEG, its UIDs derived from ``uid_sources``, and the keywords of the source attributes whose
    values it leaves out (invalid for their VR)."""
    return label_map_seg(
        series, SEG_LABELS[modality], labels, uid_sources, RESULT_SEG, f"cspine {modality.value} segmentation"
    )


def label_map_seg(
    series: Series,
    names: Sequence[str],
    labels: np.ndarray,
    uid_sources: Sequence[str],
    kind: SegKind,
    description: str,
) -> tuple[hd.seg.Segmentation, list[str]]:
    """A binary SEG of ``series`` (ingested, with its headers): one segment per structure of ``names`` (index =
    label value, 0 background, coded by ``SEGMENT_CODES``) present in the [K, R, C] label map ``labels``; its
    UIDs derived from ``uid_sources``. Also the keywords of the source attributes whose values it leaves out
    (invalid for their VR)."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[0] != len(series.instances):
        raise ValueError(f"a label map of shape {labels.shape} does not fit a series of {len(series.instances)} slices")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(
            f"a label map must hold integers 0…{len(names) - 1}, got {labels.dtype} {labels.min()}…{labels.max()}"
        )
    present = [int(v) for v in np.unique(labels) if v != 0]
    # highdicom wants segment numbers 1…S without gaps; structures absent from the map get no segment.
    renumber = np.zeros(len(names), dtype=np.uint8)
    renumber[present] = np.arange(1, len(present) + 1)
    sources, frames = _source_frames(series, renumber[labels])
    sources = _fitted_sources(series, sources)
    sources[0], omitted = _fitted_patient_and_study(sources[0])  # highdicom reads them from the first source
    sop_instance_uid = _derived_uid("SEG", *uid_sources)
    descriptions = [
        _segment_description(number, names[value], sop_instance_uid, kind.algorithm)
        for number, value in enumerate(present, start=1)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_derived_uid("SEG series", *uid_sources),
        series_number=kind.series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="cspine",
        software_versions=cspine.__version__,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        series_description=kind.series_description,
        content_label=kind.content_label,
        content_description=description,
    )
    if _is_projection(series):
        _fit_projection_source(seg, sources[0])
    omitted += _empty_invalid_values(seg)
    logger.info(
        "DICOM SEG (%s) of a series: %d segments, %d frames", description, len(descriptions), seg.NumberOfFrames
    )
    return seg, omitted


def _source_frames(series: Series, labels: np.ndarray) -> tuple[list[Dataset], np.ndarray]:
    """The source images and the label map in their frame order: slice order for single-frame images, the
    frame numbers of the one multi-frame instance otherwise."""
    headers = list(series.headers)
    if not headers:
        raise ValueError(f"series {series.series_instance_uid} kept no headers to reference")
    if all(ref.frame_number is None for ref in series.instances):
        if len(headers) != labels.shape[0]:
            raise ValueError(f"{len(headers)} headers for {labels.shape[0]} slices")
        return headers, labels
    if len(headers) != 1:
        raise ValueError("a SEG can reference one multi-frame source instance, not several")
    frames = np.zeros((int(headers[0].NumberOfFrames), *labels.shape[1:]), dtype=labels.dtype)
    for k, ref in enumerate(series.instances):
        if ref.frame_number is None:
            raise ValueError("a multi-frame source's slice without a frame number")
        frames[ref.frame_number - 1] = labels[k]
    return headers, frames


def _is_projection(series: Series) -> bool:
    return series.volume is not None and series.volume.projection


# A projection has no slice plane in the patient: its SEG lies on the pixel grid, and highdicom is given the
# source without these (some DX carry a frame of reference, or a nominal position, that places nothing).
PROJECTION_GEOMETRY = ("FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient")


def _fitted_sources(series: Series, headers: list[Dataset]) -> list[Dataset]:
    """The source headers as highdicom needs them for a valid SEG: copies with the radiograph's nominal
    geometry removed, or a missing slice thickness filled in from the slice spacing; the headers themselves
    when nothing is missing. ``OutputUnavailableError`` when a CT or MR series has no frame of reference."""
    if _is_projection(series):
        return [_without(header, PROJECTION_GEOMETRY) for header in headers]
    if any("FrameOfReferenceUID" not in header for header in headers):
        raise OutputUnavailableError(
            f"DICOM SEG not written: the {series.dicom_modality} series has no FrameOfReferenceUID, which a SEG of "
            f"{series.dicom_modality} images needs to place its frames"
        )
    if all(_pixel_measures(header).get("SliceThickness") not in (None, "") for header in headers):
        return headers
    spacing = series.volume.slice_spacing if series.volume is not None else 0.0
    if spacing <= 0:
        raise OutputUnavailableError(
            f"DICOM SEG not written: the {series.dicom_modality} series has neither a SliceThickness nor a slice "
            "spacing to take it from"
        )
    logger.info("the %s series has no SliceThickness: the SEG uses the slice spacing", series.dicom_modality)
    fitted = [copy.deepcopy(header) for header in headers]
    for header in fitted:
        _pixel_measures(header).SliceThickness = DSfloat(spacing, auto_format=True)
    return fitted


def _pixel_measures(header: Dataset) -> Dataset:
    """Where a source image keeps its slice thickness: its shared Pixel Measures item when it is an
    enhanced multi-frame image that has one, else the image itself."""
    shared = header.get("SharedFunctionalGroupsSequence")
    if shared and "PixelMeasuresSequence" in shared[0]:
        return shared[0].PixelMeasuresSequence[0]
    return header


def _without(header: Dataset, keywords: Sequence[str]) -> Dataset:
    out = copy.deepcopy(header)
    for keyword in keywords:
        if keyword in out:
            delattr(out, keyword)
    return out


def _fit_projection_source(seg: hd.seg.Segmentation, source: Dataset) -> None:
    """Patch a SEG of a radiograph (no frame of reference) where highdicom 0.28 leaves it short."""
    # The General Image module needs PatientOrientation (type 2C: present, if empty) when no plane
    # orientation places the frames.
    seg.PatientOrientation = source.get("PatientOrientation", "")
    # highdicom writes a Pixel Measures item without SliceThickness here and then refuses to read its own
    # output back; without a frame of reference the SEG does not need it (the frames lie on the source grid).
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "PixelMeasuresSequence" in shared and "SliceThickness" not in shared.PixelMeasuresSequence[0]:
        del shared.PixelMeasuresSequence


def _segment_description(number: int, structure: str, seg_uid: str, algorithm: str) -> hd.seg.SegmentDescription:
    code = SEGMENT_CODES.get(structure) or SegmentCode(
        structure.replace("_", " ").capitalize(), _ANATOMY, codes.SCT.BodyStructure
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=code.label,
        segmented_property_category=code.category,
        segmented_property_type=code.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=_algorithm_sequence(algorithm),
        tracking_id=structure,
        tracking_uid=_derived_uid("segment", seg_uid, structure),
        anatomic_regions=[code.region] if code.region is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*code.rgb),
    )


# --------------------------------------------------------------------------------------------------------
# SR


def build_sr(
    analysis: StudyAnalysis,
    chosen: Mapping[SeriesRole, Series],
    seg: bytes | None = None,
    notices: list[Notice] | None = None,
) -> bytes:
    """A Comprehensive 3D SR (TID 1500 measurement report) of the analysis, with the slices of every used
    series (and the SEG, when given) as evidence. Source values left out of it (not valid for their VR) are
    told in an ``output_value_omitted`` notice appended to ``notices``.

    Raises ``OutputUnavailableError`` when the source headers do not allow a valid SR."""
    with _writing("SR", "the source headers"):
        sr, omitted = _report(analysis, chosen, seg)
        data = _encode(sr)
    _tell_omitted("SR", omitted, notices)
    return data


def _report(
    analysis: StudyAnalysis, chosen: Mapping[SeriesRole, Series], seg: bytes | None
) -> tuple[hd.sr.Comprehensive3DSR, list[str]]:
    """The SR, and the keywords of the source attributes whose values it leaves out (invalid for their VR)."""
    evidence = _evidence(analysis, chosen)
    omitted: list[str] = []
    if evidence:  # highdicom reads the patient and study from the first evidence instance
        evidence[0], omitted = _fitted_patient_and_study(evidence[0])
    seg_header = pydicom.dcmread(DicomBytesIO(seg), stop_before_pixels=True) if seg is not None else None
    if seg_header is not None:
        evidence.append(seg_header)
    uid_sources = (*_content_sources(analysis), "SEG", str(seg_header.SOPInstanceUID) if seg_header else "none")
    sop_instance_uid = _derived_uid("SR", *uid_sources)
    algorithm = _algorithm(
        [
            f"prototype set version {analysis.prototype_set_version}",
            *(f"model {m.name} version {m.version}" for m in analysis.models),
        ]
    )
    tumor = _seg_tumor(seg_header) if seg_header is not None else None
    groups = [
        *_lesion_groups(sop_instance_uid, analysis, chosen, algorithm, tumor),
        *(
            _assessment_group(sop_instance_uid, f"{r.modality.value} assessment", r.assessment, algorithm, r.ood)
            for r in analysis.modalities
        ),
        _assessment_group(sop_instance_uid, "Fused assessment", analysis.fused, algorithm),
        *_spine_groups(sop_instance_uid, analysis.spine),
    ]
    procedures = [PROCEDURE_CODES[r.modality] for r in analysis.modalities] or [codes.cid100.ImagingProcedure]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=list(dict.fromkeys(procedures)),
        imaging_measurements=groups,
    )
    if analysis.disclosure is not None:
        report[0].ContentSequence.append(_report_evaluations([(DISCLOSURE, analysis.disclosure.text)]))
    sr = _comprehensive_3d_sr(
        evidence, report, _derived_uid("SR series", *uid_sources), sop_instance_uid, SR_SERIES_DESCRIPTION
    )
    omitted += _empty_invalid_values(sr)
    logger.info("DICOM SR: %d measurement groups, %d evidence instances", len(groups), len(evidence))
    return sr, omitted


def _algorithm(parameters: Sequence[str] | None = None) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of cspine, with ``parameters`` (the prototype set and model versions)."""
    return hd.sr.AlgorithmIdentification(
        name="cspine",
        version=cspine.__version__,
        parameters=list(parameters) if parameters else None,
        family=codes.DCM.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )


def _observation_context() -> hd.sr.ObservationContext:
    """TID 1001 with cspine as the device observer (TID 1004)."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=DEVICE_OBSERVER_UID,
            name="cspine",
            manufacturer_name=MANUFACTURER,
            model_name="cspine",
        ),
    )
    return hd.sr.ObservationContext(observer_device_context=observer)


def _comprehensive_3d_sr(
    evidence: Sequence[Dataset],
    report: hd.sr.MeasurementReport,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_description: str,
) -> hd.sr.Comprehensive3DSR:
    return hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        coding_schemes=CODING_SCHEMES,
        # UTF-8, whatever the source images use: reasons and the disclosure are free text ("C2–C7").
        specific_character_set="ISO_IR 192",
    )


FAILURE_SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def build_failure_sr(source: Dataset, message: str) -> bytes:
    """A Comprehensive 3D SR saying that cspine did not analyse the study of ``source`` (one of its instances'
    headers), and why: a TID 1500 report titled "Study not analysed by cspine" (99CSPINE), with cspine as the
    device observer, "Imaging procedure" as the procedure reported, and one TID 1501 group "cspine analysis"
    holding cspine's algorithm identification and ``message`` as the TEXT item "Reason not analysed". The
    message is cspine's own and must name no patient. Patient and study come from ``source``, an invalid value
    left empty (logged by keyword only); ``source`` itself is the SR's one evidence instance. UIDs derive from
    the StudyInstanceUID and ``message``, so the same failure sent again is the same instance.

    Raises ``OutputUnavailableError`` when ``source`` lacks a valid UID the SR needs to be placed in its study
    and to reference it (its study, series, SOP instance and SOP class UIDs), naming the attribute only."""
    for keyword in FAILURE_SOURCE_UIDS:
        if not pydicom.uid.UID(str(source.get(keyword) or "")).is_valid:
            raise OutputUnavailableError(f"DICOM SR not written: the source header has no valid {keyword}")
    with _writing("SR", "the source header"):
        sr, omitted = _failure_report(source, message or "no reason was given")
        data = _encode(sr)
    _tell_omitted("SR", omitted, None)
    return data


def _failure_report(source: Dataset, message: str) -> tuple[hd.sr.Comprehensive3DSR, list[str]]:
    header, omitted = _fitted_patient_and_study(source)
    uid_sources = (str(source.StudyInstanceUID), message)
    sop_instance_uid = _derived_uid("failure SR", *uid_sources)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(sop_instance_uid, "cspine analysis"), algorithm_id=_algorithm()
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(NOT_ANALYSED_REASON, message, relationship_type="CONTAINS"))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(),
        procedure_reported=[codes.cid100.ImagingProcedure],
        imaging_measurements=[group],
        title=NOT_ANALYSED_TITLE,
    )
    series_instance_uid = _derived_uid("failure SR series", *uid_sources)
    sr = _comprehensive_3d_sr([header], report, series_instance_uid, sop_instance_uid, FAILURE_SR_SERIES_DESCRIPTION)
    omitted += _empty_invalid_values(sr)
    logger.info("DICOM SR: the study was not analysed")
    return sr, omitted


def _report_evaluations(texts: Sequence[tuple[Code, str]]) -> hd.sr.ContainerContentItem:
    """TID 1500's report-level "Qualitative Evaluations" container, of TEXT items."""
    container = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    container.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.TextContentItem(name=name, value=text, relationship_type="CONTAINS") for name, text in texts]
    )
    return container


def _evidence(analysis: StudyAnalysis, chosen: Mapping[SeriesRole, Series]) -> list[Dataset]:
    """The headers of every series the analysis used, each instance once. A not-assessable modality's
    series are evidence where they were chosen; the series an assessed modality used must have been."""
    evidence: dict[str, Dataset] = {}
    for result in analysis.modalities:
        for used in result.series:
            series = chosen.get(used.role)
            if series is None or series.series_instance_uid != used.series_instance_uid:
                if not result.assessment.assessed:
                    continue
                raise ValueError(f"the {used.role.value} series the analysis used is not the chosen one")
            for header in series.headers:
                evidence.setdefault(str(header.SOPInstanceUID), header)
    return list(evidence.values())


@dataclass(frozen=True)
class _SegTumor:
    """Where a cspine SEG keeps the lesions: its tumor segment, and that segment's frames per source image."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str  # of the source series
    segment_number: int
    frames: dict[str, list[int]] = field(default_factory=dict)  # source SOP Instance UID -> SEG frame numbers


def _seg_tumor(seg: Dataset) -> _SegTumor | None:
    """The tumor segment of a cspine SEG (its TrackingID is the label name "tumor"); None when it has none."""
    numbers = [int(item.SegmentNumber) for item in seg.SegmentSequence if item.get("TrackingID") == "tumor"]
    if len(numbers) != 1 or len(seg.ReferencedSeriesSequence) != 1:
        return None
    frames: dict[str, list[int]] = defaultdict(list)
    for number, item in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1):
        if int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != numbers[0]:
            continue
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.SourceImageSequence:
                frames[str(source.ReferencedSOPInstanceUID)].append(number)
    return _SegTumor(
        str(seg.SOPClassUID),
        str(seg.SOPInstanceUID),
        str(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
        numbers[0],
        dict(frames),
    )


MeasurementGroup = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
)


def _lesion_groups(
    report_uid: str,
    analysis: StudyAnalysis,
    chosen: Mapping[SeriesRole, Series],
    algorithm: hd.sr.AlgorithmIdentification,
    tumor: _SegTumor | None,
) -> Iterable[MeasurementGroup]:
    by_uid = {s.series_instance_uid: s for s in chosen.values()}
    for result in analysis.modalities:
        if not result.assessment.assessed:
            continue  # no findings of a modality cspine could not assess
        for number, lesion in enumerate(result.lesions, start=1):
            series = by_uid.get(lesion.series_instance_uid)
            yield _lesion_group(report_uid, result, number, lesion, series, algorithm, tumor)


def _lesion_group(
    report_uid: str,
    result: ModalityResult,
    number: int,
    lesion: Lesion,
    series: Series | None,
    algorithm: hd.sr.AlgorithmIdentification,
    tumor: _SegTumor | None,
) -> MeasurementGroup:
    """TID 1411 (1410 on a radiograph) referencing the SEG's tumor segment where the SEG holds the lesion's
    series and tumor frames on its slices; else TID 1501 referencing the slices through the lesion."""
    measurements = [
        hd.sr.Measurement(name=codes.SCT.Diameter, value=lesion.max_diameter_mm, unit=MM, derivation=codes.SCT.Maximum),
        *_optional(codes.SCT.Volume, lesion.volume_ml, MILLILITER),
        *_optional(codes.SCT.Area, lesion.area_mm2, MM2),
        *(_assessment_measurements(lesion.assessment) if lesion.assessment is not None else ()),
    ]
    common: dict[str, Any] = {
        "tracking_identifier": _tracking(report_uid, f"{result.modality.value} lesion {number}"),
        "finding_category": _ABNORMAL,
        "finding_type": codes.SCT.Neoplasm,
        "finding_sites": [hd.sr.FindingSite(_level_code(lesion.vertebral_level))],
        "algorithm_id": algorithm,
        "measurements": measurements,
        "qualitative_evaluations": [hd.sr.QualitativeEvaluation(codes.DCM.Modality, MODALITY_CODES[result.modality])],
    }
    sources = _slices_through(series, lesion) if series is not None else []
    if tumor is not None and series is not None and series.series_instance_uid == tumor.series_instance_uid:
        masked = [ds for ds in sources if str(ds.SOPInstanceUID) in tumor.frames]
        if _is_projection(series) and len(masked) == 1:
            frames = tumor.frames[str(masked[0].SOPInstanceUID)]
            frame = hd.sr.ReferencedSegmentationFrame(
                sop_class_uid=tumor.sop_class_uid,
                sop_instance_uid=tumor.sop_instance_uid,
                frame_number=frames[0] if len(frames) == 1 else frames,
                segment_number=tumor.segment_number,
                source_image=hd.sr.SourceImageForSegmentation.from_source_image(masked[0]),
            )
            # The frame names its segment (its Segment Identification); the SR Image reference may not hold both a
            # Referenced Frame Number and a Referenced Segment Number, though highdicom 0.28 writes both.
            del frame[0].ReferencedSOPSequence[0].ReferencedSegmentNumber
            return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_segment=frame, **common)
        if masked:
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=tumor.sop_class_uid,
                    sop_instance_uid=tumor.sop_instance_uid,
                    segment_number=tumor.segment_number,
                    source_images=[hd.sr.SourceImageForSegmentation.from_source_image(ds) for ds in masked],
                ),
                **common,
            )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in sources] or None,
        **common,
    )


def _slices_through(series: Series, lesion: Lesion) -> list[Dataset]:
    """The source images that cut the lesion's box, so a viewer can jump to it; every image of a
    radiograph or of a multi-frame series."""
    volume = series.volume
    if volume is None or volume.projection or len(series.headers) != len(series.instances):
        return list(series.headers)
    normal = volume.slice_direction
    corners = np.array(list(itertools.product(*zip(lesion.bbox_min_mm, lesion.bbox_max_mm, strict=True))))
    lo, hi = (corners @ normal).min(), (corners @ normal).max()
    positions = volume.slice_positions() @ normal
    half = volume.slice_spacing / 2
    inside = np.flatnonzero((positions >= lo - half) & (positions <= hi + half))
    return [series.headers[k] for k in inside]


def _assessment_group(
    report_uid: str,
    identifier: str,
    assessment: Assessment,
    algorithm: hd.sr.AlgorithmIdentification,
    ood: OodScore | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """An assessed one: a Neoplasm finding, present or absent, with its scores. A not-assessable one: no
    finding and no score, only "Not assessable" and its reasons, each a code followed by its message."""
    assessability = hd.sr.QualitativeEvaluation(ASSESSABILITY, ASSESSABILITY_VALUES[assessment.status])
    ood_measurements = _ood_measurements(ood) if ood is not None else []
    if assessment.assessed:
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(report_uid, identifier),
            finding_category=_ABNORMAL,
            finding_type=codes.SCT.Neoplasm,
            finding_sites=[hd.sr.FindingSite(codes.SCT.CervicalSpine)],
            algorithm_id=algorithm,
            measurements=[*_assessment_measurements(assessment), *ood_measurements],
            qualitative_evaluations=[
                assessability,
                hd.sr.QualitativeEvaluation(codes.DCM.PresenceOfProperty, PRESENT_ABSENT[assessment.tumor_detected]),
            ],
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(report_uid, identifier),
        finding_sites=[hd.sr.FindingSite(codes.SCT.CervicalSpine)],
        algorithm_id=algorithm,
        measurements=ood_measurements or None,
        qualitative_evaluations=[assessability],
    )
    for reason in assessment.reasons:
        # TID 1501 takes CODE and TEXT qualitative evaluations; highdicom builds only the CODE kind.
        group[0].ContentSequence.append(
            hd.sr.CodeContentItem(NOT_ASSESSABLE_REASON, REASON_CODES[reason.code], relationship_type="CONTAINS")
        )
        if reason.message:
            group[0].ContentSequence.append(
                hd.sr.TextContentItem(REASON_DETAILS, reason.message, relationship_type="CONTAINS")
            )
    return group


def _ood_measurements(ood: OodScore) -> list[hd.sr.Measurement]:
    return [
        hd.sr.Measurement(name=OOD_SCORE, value=ood.score, unit=NO_UNITS),
        hd.sr.Measurement(name=OOD_THRESHOLD, value=ood.threshold, unit=NO_UNITS),
    ]


def _assessment_measurements(assessment: Assessment) -> list[hd.sr.Measurement]:
    return [
        *_optional(DETECTION_SCORE, assessment.detection_score, RATIO),
        *(
            hd.sr.Measurement(name=_probability_code(p.label), value=p.probability, unit=RATIO)
            for p in assessment.probabilities
        ),
        hd.sr.Measurement(name=UNCERTAINTY, value=assessment.uncertainty, unit=RATIO),
    ]


def _probability_code(label: str) -> Code:
    """The private concept "Probability of <label>": class labels are data, so their codes are made."""
    value = "P-" + "".join(c if c.isalnum() else "_" for c in label.upper())
    return _private(value, f"Probability of {label}")


def _spine_groups(report_uid: str, spine: SpineMeasurements) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = [group for level in spine.levels for group in _level_groups(report_uid, level)]
    if spine.cobb_angle_deg is not None:
        groups.append(
            _group(
                report_uid,
                "Cobb angle C2-C7 (lordosis positive)",
                None,
                [codes.SCT.CervicalSpine],
                [hd.sr.Measurement(name=codes.SCT.CobbAngle, value=spine.cobb_angle_deg, unit=DEGREE)],
                spine.cobb_source,
                category=None,
            )
        )
    if spine.opll is not None:
        opll = spine.opll
        groups.append(
            _group(
                report_uid,
                "OPLL",
                codes.SCT.Ossification,
                [_level_code(level) for level in opll.levels] or [codes.SCT.CervicalSpine],
                [
                    hd.sr.Measurement(name=OPLL_OCCUPYING_RATIO, value=opll.occupying_ratio, unit=RATIO),
                    hd.sr.Measurement(name=OPLL_MAX_THICKNESS, value=opll.max_thickness_mm, unit=MM),
                ],
                Modality.CT,
                category=_ABNORMAL,
                evaluations=[hd.sr.QualitativeEvaluation(codes.DCM.PresenceOfProperty, PRESENT_ABSENT[opll.present])],
            )
        )
    return groups


def _level_groups(report_uid: str, m: LevelMeasurement) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One group per structure measured at a level: canal, cord, and the disc below it."""
    site = [_level_code(m.level)]
    groups = []
    canal = _optional(codes.SCT.Area, m.canal_area_mm2, MM2)
    if canal:
        groups.append(
            _group(report_uid, f"{m.level} spinal canal", codes.SCT.SpinalCanalStructure, site, canal, m.canal_source)
        )
    cord = [
        *_optional(codes.SCT.Area, m.cord_area_mm2, MM2),
        *_optional(CORD_COMPRESSION_RATIO, m.cord_compression_ratio, RATIO),
    ]
    if cord:
        groups.append(_group(report_uid, f"{m.level} spinal cord", codes.SCT.SpinalCord, site, cord, m.cord_source))
    disc = _optional(codes.DCM.Height, m.disc_height_mm, MM)
    if disc:
        name, code = DISC_BELOW.get(m.level, (f"{m.level} lower", INTERVERTEBRAL_DISC))
        groups.append(_group(report_uid, f"{name} disc", code, [code], disc, m.disc_source))
    return groups


def _group(
    report_uid: str,
    identifier: str,
    finding: Code | None,
    sites: Sequence[Code],
    measurements: list[hd.sr.Measurement],
    source: Modality | None,
    category: Code | None = _ANATOMY,
    evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    evaluations = list(evaluations)
    if source is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(codes.DCM.Modality, MODALITY_CODES[source]))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(report_uid, identifier),
        finding_category=category,
        finding_type=finding,
        finding_sites=[hd.sr.FindingSite(site) for site in sites],
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
    )


def _optional(name: Code, value: float | None, unit: Code) -> list[hd.sr.Measurement]:
    return [] if value is None else [hd.sr.Measurement(name=name, value=float(value), unit=unit)]


def _level_code(level: str) -> Code:
    return LEVEL_CODES.get(level) or _private(f"LEVEL-{level}", f"{level} vertebra")


def _encode(dataset: Dataset) -> bytes:
    buffer = DicomBytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------------
# Source values a SEG or SR cannot carry. highdicom copies the Patient and Study modules of the first source
# image (SEG) or evidence instance (SR) into its output, and parses some of them first; a value that is not
# valid for its VR would make it refuse, or make the output invalid. Such a value is left out (the attribute
# empty: these are type 2 or 3), and named by keyword, never shown.

# What highdicom parses from that first instance for the Patient and General Study modules: type 2 all, so a
# missing one is written empty.
PATIENT_STUDY_ARGUMENTS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
# The VRs whose values are checked: the text ones. A UID was checked at ingest, and emptying one would break a
# reference.
CHECKED_VRS = frozenset("AE AS CS DA DS DT IS LO LT PN SH ST TM UC UR UT".split())
# Dates and times are also parsed the way highdicom parses them (pydicom's check lets ranges through).
PARSERS = {"DA": DA, "DT": DT, "TM": TM}
ENUMERATED_VALUES = {"PatientSex": frozenset({"M", "F", "O"})}
PN_MAX_COMPONENTS = 5  # family, given, middle, prefix, suffix


def _valid(element: DataElement) -> bool:
    """Whether ``element`` holds a value a SEG or SR can carry: no more values than its keyword allows, each
    valid for its VR (pydicom's check; a date or time highdicom can parse; a name of at most five components
    per group; one of the enumerated values)."""
    if element.is_empty or element.tag.is_private:
        return True
    values = list(element.value) if isinstance(element.value, MultiValue) else [element.value]
    try:
        if len(values) > 1 and pydicom.datadict.dictionary_VM(element.tag) == "1":
            return False
        for value in values:
            if element.VR in ("IS", "DS") and isinstance(value, numbers.Number):
                value = str(value)  # pydicom checks the text (its IS and DS keep the text they were read from)
            elif element.VR == "PN":
                value = str(value)  # pydicom checks a name's text, and lets any PersonName through
            pydicom.valuerep.validate_value(element.VR, value, pydicom.config.RAISE)
            if element.VR in PARSERS:
                PARSERS[element.VR](value)
            if element.VR == "PN" and any(len(group.split("^")) > PN_MAX_COMPONENTS for group in str(value).split("=")):
                return False
            allowed = ENUMERATED_VALUES.get(element.keyword)
            if allowed is not None and value not in allowed:
                return False
    except (ValueError, TypeError, OverflowError, KeyError):  # the message is not kept: it quotes the value
        return False
    return True


def _fitted_patient_and_study(header: Dataset) -> tuple[Dataset, list[str]]:
    """A copy of ``header`` in which what highdicom parses for the Patient and General Study modules is present
    and valid (a missing attribute added empty, an invalid value emptied), and the keywords of those emptied."""
    fitted = copy.deepcopy(header)
    emptied = []
    for keyword in PATIENT_STUDY_ARGUMENTS:
        element = fitted.data_element(keyword) if keyword in fitted else None  # pydicom raises on a missing one
        if element is None:
            setattr(fitted, keyword, None)
        elif not _valid(element):
            fitted[element.tag] = DataElement(element.tag, element.VR, None)
            emptied.append(keyword)
    return fitted, emptied


def _empty_invalid_values(dataset: Dataset) -> list[str]:
    """Empty each top-level attribute of ``dataset`` (a SEG or SR just made) whose value is not valid for its VR:
    values copied from the source, as highdicom's own are valid. The element is replaced, not changed, as the
    output shares it with the source header. The keywords emptied."""
    emptied = []
    for element in list(dataset):
        if element.VR in CHECKED_VRS and not _valid(element):
            dataset[element.tag] = DataElement(element.tag, element.VR, None)
            emptied.append(element.keyword)
    return emptied


def _tell_omitted(kind: str, keywords: list[str], notices: list[Notice] | None) -> None:
    if not keywords:
        return
    names = ", ".join(dict.fromkeys(keywords))
    logger.info("DICOM %s written without the source's %s: not valid for the value representation", kind, names)
    if notices is not None:
        notices.append(
            Notice(
                NoticeCode.OUTPUT_VALUE_OMITTED,
                f"DICOM {kind} written without the source's {names}: the value is not valid for its value "
                "representation, so the attribute is left empty",
            )
        )


# --------------------------------------------------------------------------------------------------------
# Reading a report back


def read_sr_measurements(data: bytes) -> dict[str, dict[str, Any]]:
    """The measurement groups of a cspine SR (TID 1501, 1410 and 1411 alike): ``{tracking identifier: {concept:
    value}}``.

    A measurement gives its concept name's meaning and a float; a qualitative evaluation its name's and
    its value's meanings (the group's "Finding category" comes back this way too). Each group also has
    "Finding" (the finding type's meaning, when there is one), "Finding site" (the meanings of its finding
    sites, joined by ", ") and, when the group names its algorithm, "Algorithm Parameters" (a tuple of
    strings; one of them is "prototype set version <version>"). An assessment group has "Assessability"
    ("Assessed" or "Not assessable"); a not-assessable one also "Reasons": a tuple of (code value, code
    meaning, message), one per reason in the report's order.
    """
    sr = hd.sr.srread(data)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    out: dict[str, dict[str, Any]] = {}
    groups: list[MeasurementGroup] = [
        *report.get_image_measurement_groups(),
        *report.get_planar_roi_measurement_groups(),
        *report.get_volumetric_roi_measurement_groups(),
    ]
    for group in groups:
        values: dict[str, Any] = {}
        if group.finding_type is not None:
            values["Finding"] = group.finding_type.meaning
        if group.finding_sites:
            values["Finding site"] = ", ".join(site.value.meaning for site in group.finding_sites)
        for measurement in group.get_measurements():
            values[measurement.name.meaning] = float(measurement.value)
        for evaluation in group.get_qualitative_evaluations():
            if evaluation.name != NOT_ASSESSABLE_REASON:
                # highdicom annotates QualitativeEvaluation.value as int | float; it is a CODE item's CodedConcept
                values[evaluation.name.meaning] = evaluation.value.meaning  # type: ignore[union-attr]
        reasons = _reasons(group[0])
        if reasons:
            values["Reasons"] = reasons
        parameters = _algorithm_parameters(group)
        if parameters:
            values["Algorithm Parameters"] = parameters
        identifier = group.tracking_identifier
        if identifier is None:  # TID 1411 requires one; cspine writes one in every group
            raise ValueError("a measurement group without a tracking identifier")
        out[identifier] = values
    return out


def read_sr_evaluations(data: bytes) -> dict[str, str]:
    """The report-level qualitative evaluations of a cspine SR (TID 1500's "Qualitative Evaluations"):
    ``{concept name meaning: text, or the coded value's meaning}``; the disclosure is one of them."""
    sr = hd.sr.srread(data)
    out: dict[str, str] = {}
    for container in find_content_items(sr, name=QUALITATIVE_EVALUATIONS):
        for item in container.ContentSequence:
            name = item.ConceptNameCodeSequence[0].CodeMeaning
            out[name] = str(item.TextValue) if item.ValueType == "TEXT" else item.ConceptCodeSequence[0].CodeMeaning
    return out


def _reasons(group: Dataset) -> tuple[tuple[str, str, str], ...]:
    """(code value, code meaning, message) of each reason, the message read from the TEXT item after it."""
    reasons: list[list[str]] = []
    for item in group.ContentSequence:
        name = hd.sr.CodedConcept.from_dataset(item.ConceptNameCodeSequence[0])
        if name == NOT_ASSESSABLE_REASON and item.ValueType == "CODE":
            code = hd.sr.CodedConcept.from_dataset(item.ConceptCodeSequence[0])
            reasons.append([code.value, code.meaning, ""])
        elif name == REASON_DETAILS and item.ValueType == "TEXT" and reasons:
            reasons[-1][2] = str(item.TextValue)
    return tuple((value, meaning, message) for value, meaning, message in reasons)


def _algorithm_parameters(group: MeasurementGroup) -> tuple[str, ...]:
    items = find_content_items(group[0], name=codes.DCM.AlgorithmParameters)
    return tuple(str(item.TextValue) for item in items)


def write_outputs(analysis: StudyAnalysis, chosen: Mapping[SeriesRole, Series], *, seg: bool, sr: bool) -> None:
    """The requested DICOM SEG and SR (the SR referencing the SEG when there is one). One that cannot be
    written is left out with an ``output_unavailable`` notice: an output never costs the analysis. A source value
    one leaves out (invalid for its VR) is told in an ``output_value_omitted`` notice."""
    notices = analysis.notices
    writers = (
        ("SEG", "dicom_seg", seg, lambda: build_seg(analysis, chosen, notices)),
        ("SR", "dicom_sr", sr, lambda: build_sr(analysis, chosen, analysis.dicom_seg, notices)),
    )
    for kind, field_name, wanted, write in writers:
        if not wanted:
            continue
        try:
            data = write()
        except OutputUnavailableError as exc:  # its message is cspine's own and names no patient
            logger.warning("%s [%s]", exc, type(exc).__name__)
            message = str(exc)
        except Exception as exc:  # noqa: BLE001 — a writer's bug must not cost the analysis either
            logger.error("DICOM %s not written: unexpected %s", kind, type(exc).__name__)
            message = f"DICOM {kind} not written: an internal error ({type(exc).__name__})"
        else:
            if data is not None:
                setattr(analysis, field_name, data)
                continue
            message = f"DICOM {kind} not written: no assessed modality has a segmented structure"
        analysis.notices.append(Notice(NoticeCode.OUTPUT_UNAVAILABLE, message))
