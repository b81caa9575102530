"""Domain objects shared by every stage: studies, series, volumes and the notices that travel with them.

They are plain dataclasses, independent of gRPC and Triton. Coordinates are DICOM patient coordinates
(LPS: +x toward the patient's left, +y posterior, +z superior), in millimetres.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Modality(str, enum.Enum):
    """The imaging modalities cspine analyses."""

    CT = "CT"
    MR = "MR"
    XR = "XR"  # projection radiograph: DICOM DX or CR


# The order in which the modalities measure a lesion best: the main lesion is the first one's largest.
MEASURING_ORDER: tuple[Modality, ...] = (Modality.CT, Modality.MR, Modality.XR)


class Orientation(str, enum.Enum):
    """How a series' slices lie in the patient."""

    AXIAL = "axial"
    SAGITTAL = "sagittal"
    CORONAL = "coronal"
    OBLIQUE = "oblique"
    PROJECTION = "projection"  # a radiograph: no slice plane in patient space
    UNKNOWN = "unknown"


class SeriesRole(str, enum.Enum):
    """The series the pipeline uses, at most one of each, picked by series selection."""

    CT = "ct"  # axial CT
    MR_T1 = "mr_t1"  # sagittal T1-weighted MR
    MR_T2 = "mr_t2"  # sagittal T2-weighted MR
    XR = "xr"  # lateral radiograph

    @property
    def modality(self) -> Modality:
        return _ROLE_MODALITY[self]


_ROLE_MODALITY = {
    SeriesRole.CT: Modality.CT,
    SeriesRole.MR_T1: Modality.MR,
    SeriesRole.MR_T2: Modality.MR,
    SeriesRole.XR: Modality.XR,
}


class NoticeCode(str, enum.Enum):
    """Closed set of things a result tells its reader about what was done with the input."""

    NOT_AN_IMAGE = "not_an_image"  # SR, SEG, RT, PR … skipped
    UNSUPPORTED_IMAGE = "unsupported_image"  # an image cspine cannot place or read (colour, no geometry …)
    DUPLICATE_INSTANCE = "duplicate_instance"
    MISSING_SLICES = "missing_slices"  # a gap in a series; nothing is interpolated
    IRREGULAR_SPACING = "irregular_spacing"
    SERIES_SKIPPED = "series_skipped"  # selection did not use a series, and says why
    MISSING_MODALITY = "missing_modality"
    MODALITY_FAILED = "modality_failed"  # a modality could not be analysed; the result goes on without it
    MEASUREMENT_UNAVAILABLE = "measurement_unavailable"  # a measurement the images did not allow
    OUTSIDE_ANALYSED_LEVELS = "outside_analysed_levels"  # a finding above C2 (dens, C1, skull base): not counted
    NOT_ASSESSABLE = "not_assessable"  # a modality gave no tumor call; its result says why
    OUTPUT_UNAVAILABLE = "output_unavailable"  # a requested DICOM SEG or SR could not be written; the analysis stands
    OUTPUT_VALUE_OMITTED = "output_value_omitted"  # a SEG or SR written with an invalid source value left empty
    LESION_NOT_MATCHED = "lesion_not_matched"  # a modality's lesions lie at none of the main lesion's levels


@dataclass(frozen=True)
class Notice:
    """Something the reader of a result should know. The message names no patient."""

    code: NoticeCode
    message: str
    series_instance_uid: str | None = None


@dataclass(eq=False)
class Volume:
    """The pixels of one series in modality units (HU for CT), placed in patient space.

    ``voxels[k, i, j]`` is slice ``k``, row ``i``, column ``j``; its centre lies at
    ``origin + slice_offsets[k] * slice_direction + i * pixel_spacing[0] * column_direction
    + j * pixel_spacing[1] * row_direction``. Slices are ordered by position along ``slice_direction``;
    ``slice_offsets`` keep the real positions, so a gap or irregular spacing stays visible.
    """

    voxels: np.ndarray  # float32 [K, R, C]
    origin: np.ndarray  # (3,) centre of voxel (0, 0, 0)
    row_direction: np.ndarray  # (3,) unit vector along a row: the column index j grows (IOP[0:3])
    column_direction: np.ndarray  # (3,) unit vector down a column: the row index i grows (IOP[3:6])
    pixel_spacing: tuple[float, float]  # (between rows, between columns), DICOM PixelSpacing order
    slice_offsets: np.ndarray  # (K,) mm along slice_direction from slice 0, strictly increasing
    slice_thickness: float | None = None
    projection: bool = False  # radiograph: pixel_spacing is corrected to the patient plane, origin nominal

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.voxels.shape)  # type: ignore[return-value]

    @property
    def slice_direction(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def slice_spacing(self) -> float:
        """Median distance between slices; the slice thickness (or 0) for a single slice."""
        if len(self.slice_offsets) > 1:
            return float(np.median(np.diff(self.slice_offsets)))
        return float(self.slice_thickness or 0.0)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """(slice, row, column) spacing in mm."""
        return (self.slice_spacing, float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))

    def slice_positions(self) -> np.ndarray:
        """(K, 3) ImagePositionPatient of every slice."""
        return self.origin[None, :] + self.slice_offsets[:, None] * self.slice_direction[None, :]

    def affine(self) -> np.ndarray:
        """4×4 matrix taking (k, i, j, 1) to patient (x, y, z, 1), using the median slice spacing."""
        a = np.eye(4)
        a[:3, 0] = self.slice_direction * self.slice_spacing
        a[:3, 1] = self.column_direction * self.pixel_spacing[0]
        a[:3, 2] = self.row_direction * self.pixel_spacing[1]
        a[:3, 3] = self.origin
        return a

    def index_to_patient(self, kij: np.ndarray) -> np.ndarray:
        """Patient coordinates (N, 3) of fractional voxel indices (N, 3), honouring real slice offsets."""
        kij = np.asarray(kij, dtype=float).reshape(-1, 3)
        offsets = np.interp(kij[:, 0], np.arange(len(self.slice_offsets)), self.slice_offsets)
        return (
            self.origin[None, :]
            + offsets[:, None] * self.slice_direction[None, :]
            + kij[:, 1:2] * self.pixel_spacing[0] * self.column_direction[None, :]
            + kij[:, 2:3] * self.pixel_spacing[1] * self.row_direction[None, :]
        )


@dataclass(frozen=True)
class InstanceRef:
    """Where one slice of a volume came from, for references in DICOM SEG/SR output."""

    sop_class_uid: str
    sop_instance_uid: str
    frame_number: int | None = None  # 1-based, for multi-frame instances


@dataclass(eq=False)
class Series:
    """One DICOM series of a study, as ingest understood it."""

    series_instance_uid: str
    dicom_modality: str  # (0008,0060) as sent: CT, MR, DX, CR, SR, SEG …
    modality: Modality | None  # None: nothing cspine analyses
    sop_class_uid: str
    series_number: int | None = None
    description: str = ""
    orientation: Orientation = Orientation.UNKNOWN
    volume: Volume | None = None
    instances: tuple[InstanceRef, ...] = ()  # in slice order when there is a volume
    frame_of_reference_uid: str | None = None
    echo_time_ms: float | None = None  # MR
    repetition_time_ms: float | None = None  # MR
    view_position: str | None = None  # XR: AP, PA, LL, RL, LATERAL …
    # pydicom datasets without their pixel data, in slice order: what the DICOM writers need from the source.
    headers: tuple[Any, ...] = field(default=(), repr=False)


@dataclass(eq=False)
class Study:
    """One patient study: its series and what ingest noticed on the way."""

    study_instance_uid: str
    series: list[Series]
    notices: list[Notice] = field(default_factory=list)

    def image_series(self) -> list[Series]:
        return [s for s in self.series if s.volume is not None]


@dataclass(eq=False)
class Selection:
    """The series chosen for each role, and a notice for every series not chosen."""

    chosen: dict[SeriesRole, Series]
    notices: list[Notice] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------
# Analysis results (DESIGN.md §4 names). Lengths in mm, areas in mm², volumes in mL, angles in degrees,
# points in patient coordinates (for a radiograph: in its own nominal image plane).

VERTEBRAL_LEVELS: tuple[str, ...] = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1")
MEASURED_LEVELS: tuple[str, ...] = VERTEBRAL_LEVELS[1:7]  # C2–C7: canal, cord and disc per level


class AssessmentStatus(str, enum.Enum):
    """Whether cspine could assess a modality (or the study): only assessed ones give a tumor call."""

    ASSESSED = "assessed"
    NOT_ASSESSABLE = "not_assessable"


class CompetenceLayer(str, enum.Enum):
    """The layer of the competence checks a reason comes from (docs/competence.md)."""

    INPUT = "input"  # the images and their headers, before any model runs
    ANATOMY = "anatomy"  # the segmented anatomy: is there a plausible cervical spine
    DISTRIBUTION = "distribution"  # the segmentation model's features against those of its training data
    STUDY = "study"  # the study as a whole


class ReasonCode(str, enum.Enum):
    """Closed set of reasons a modality or the study is not assessable (docs/competence.md)."""

    # input: the images are not what the models read
    DERIVED_IMAGE = "derived_image"  # ImageType DERIVED or SECONDARY: a computed map or capture, not acquired pixels
    LOCALIZER = "localizer"  # a localizer / scout / topogram
    TOO_FEW_SLICES = "too_few_slices"  # a CT or MR "volume" of one or a few slices
    INSUFFICIENT_COVERAGE = "insufficient_coverage"  # the images do not span C2–C7
    WRONG_ORIENTATION = "wrong_orientation"  # no axial CT, sagittal MR or lateral radiograph of this modality
    UNKNOWN_WEIGHTING = "unknown_weighting"  # MR neither T1- nor T2-weighted by timing or description
    UNSUPPORTED_PIXELS = "unsupported_pixels"  # colour, no spacing or position, or pixels ingest cannot place
    # anatomy: no plausible cervical spine in the segmentation
    NO_VERTEBRAL_COLUMN = "no_vertebral_column"  # too few vertebral bodies of plausible size in a column
    NO_DISCS = "no_discs"  # no intervertebral discs between the bodies
    NO_CANAL = "no_canal"  # no spinal canal behind the bodies
    LEVELS_UNASSIGNABLE = "levels_unassignable"  # C2 … C7 cannot be named with confidence
    # distribution: unlike the training data
    OUT_OF_DISTRIBUTION = "out_of_distribution"  # the model's features lie outside those of its training data
    # study
    NO_ASSESSABLE_MODALITY = "no_assessable_modality"  # no modality of the study could be assessed

    @property
    def layer(self) -> CompetenceLayer:
        return _REASON_LAYER[self]


_REASON_LAYER = {
    **{
        r: CompetenceLayer.INPUT
        for r in (
            ReasonCode.DERIVED_IMAGE,
            ReasonCode.LOCALIZER,
            ReasonCode.TOO_FEW_SLICES,
            ReasonCode.INSUFFICIENT_COVERAGE,
            ReasonCode.WRONG_ORIENTATION,
            ReasonCode.UNKNOWN_WEIGHTING,
            ReasonCode.UNSUPPORTED_PIXELS,
        )
    },
    **{
        r: CompetenceLayer.ANATOMY
        for r in (
            ReasonCode.NO_VERTEBRAL_COLUMN,
            ReasonCode.NO_DISCS,
            ReasonCode.NO_CANAL,
            ReasonCode.LEVELS_UNASSIGNABLE,
        )
    },
    ReasonCode.OUT_OF_DISTRIBUTION: CompetenceLayer.DISTRIBUTION,
    ReasonCode.NO_ASSESSABLE_MODALITY: CompetenceLayer.STUDY,
}


@dataclass(frozen=True)
class Reason:
    """One reason something is not assessable: a code from the closed set and what it means here, in words."""

    code: ReasonCode
    message: str


@dataclass(frozen=True)
class OodScore:
    """How unlike the training data a modality's images are to its segmentation model: a Mahalanobis
    distance of the model's pooled encoder features; above ``threshold`` the modality is not assessable."""

    score: float
    threshold: float


@dataclass(frozen=True)
class ClassProbability:
    label: str
    probability: float


@dataclass(frozen=True)
class Assessment:
    """A tumor assessment: detection (is there a tumor, how sure) apart from classification (which class)."""

    tumor_detected: bool
    detection_score: float | None  # calibrated probability that a tumor is present, 0–1; None: not assessable
    probabilities: tuple[ClassProbability, ...] = ()  # empty when no lesion was classified
    uncertainty: float = 1.0  # normalised entropy of the probabilities: 0 certain, 1 uniform (or none)
    status: AssessmentStatus = AssessmentStatus.ASSESSED
    reasons: tuple[Reason, ...] = ()  # why not assessable; empty when assessed
    # the modalities whose lesions the probabilities come from, in Modality order; empty when none were classified
    classified_from: tuple[Modality, ...] = ()

    @classmethod
    def not_assessable(cls, reasons: tuple[Reason, ...]) -> Assessment:
        """No tumor call at all: neither detected nor ruled out."""
        return cls(False, None, status=AssessmentStatus.NOT_ASSESSABLE, reasons=tuple(reasons))

    @property
    def assessed(self) -> bool:
        return self.status is AssessmentStatus.ASSESSED

    @property
    def status_message(self) -> str:
        """The human-readable summary of the status."""
        if self.assessed:
            return "assessed"
        return "not assessable: " + "; ".join(r.message for r in self.reasons)

    @property
    def label(self) -> str | None:
        return max(self.probabilities, key=lambda p: p.probability).label if self.probabilities else None

    def probability(self, label: str) -> float:
        return next((p.probability for p in self.probabilities if p.label == label), 0.0)


@dataclass(frozen=True)
class Lesion:
    """One connected lesion found in one modality."""

    vertebral_level: str  # the level holding most of it
    levels: tuple[str, ...]  # every level holding at least 10 % of it
    max_diameter_mm: float  # largest distance across it (Feret); in the image plane for a radiograph
    volume_ml: float | None  # None on a radiograph (a projection has no volume)
    area_mm2: float | None  # projected area on a radiograph; None otherwise
    centre_mm: tuple[float, float, float]
    bbox_min_mm: tuple[float, float, float]  # patient-axis-aligned box around it
    bbox_max_mm: tuple[float, float, float]
    series_instance_uid: str
    assessment: Assessment | None = None
    embedding: np.ndarray | None = field(default=None, repr=False, compare=False)  # lesion_embed output


@dataclass(frozen=True)
class SeriesUsed:
    role: SeriesRole
    series_instance_uid: str
    description: str
    slices: int


@dataclass(eq=False)
class ModalityResult:
    """What one modality gave: the series used, its lesions (largest first), its own assessment, and the
    label maps on each source series (for DICOM SEG and overlays)."""

    modality: Modality
    series: tuple[SeriesUsed, ...]
    lesions: list[Lesion]
    assessment: Assessment  # its status says whether the modality was assessed, and if not, why
    labels: Mapping[SeriesRole, np.ndarray] = field(default_factory=dict, repr=False)  # on each source series
    ood: OodScore | None = None  # None when no model ran (an input check failed first)


@dataclass(frozen=True)
class LevelMeasurement:
    """Spine measurements at one level; None where no analysed modality could measure it."""

    level: str
    canal_area_mm2: float | None = None  # free canal (CSF + cord) on the plane through the body centre
    cord_area_mm2: float | None = None
    cord_compression_ratio: float | None = None  # cord AP / LR diameter
    disc_height_mm: float | None = None  # disc below this level, at its centre
    canal_source: Modality | None = None
    cord_source: Modality | None = None
    disc_source: Modality | None = None


@dataclass(frozen=True)
class OpllMeasurement:
    present: bool
    occupying_ratio: float  # thickness over the bony canal AP diameter, at the worst level
    max_thickness_mm: float
    levels: tuple[str, ...]


@dataclass(eq=False)
class SpineMeasurements:
    levels: list[LevelMeasurement] = field(default_factory=list)
    cobb_angle_deg: float | None = None  # C2–C7, positive = lordosis
    cobb_source: Modality | None = None  # XR (endplates of C2 and C7), else MR (sagittal alignment)
    opll: OpllMeasurement | None = None  # from CT; None without CT

    def level(self, name: str) -> LevelMeasurement | None:
        return next((m for m in self.levels if m.level == name), None)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str


@dataclass(frozen=True)
class Disclosure:
    """What the served models were trained on and what they are for, stated with every result."""

    trained_on: str
    intended_use: str

    @property
    def text(self) -> str:
        return f"Models trained on {self.trained_on}. {self.intended_use}"


@dataclass(eq=False)
class StudyAnalysis:
    study_instance_uid: str
    modalities: list[ModalityResult]
    fused: Assessment
    spine: SpineMeasurements
    prototype_set_version: str
    models: list[ModelVersion]
    notices: list[Notice] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per pipeline stage
    dicom_seg: bytes | None = None
    dicom_sr: bytes | None = None
    disclosure: Disclosure | None = None  # what the models were trained on and are meant for

    def modality(self, modality: Modality) -> ModalityResult | None:
        return next((m for m in self.modalities if m.modality is modality), None)

    def primary_lesion(self) -> Lesion | None:
        """The largest lesion of the modality that measures best (``MEASURING_ORDER``)."""
        for modality in MEASURING_ORDER:
            result = self.modality(modality)
            if result is not None and result.assessment.assessed and result.lesions:
                return result.lesions[0]
        return None
