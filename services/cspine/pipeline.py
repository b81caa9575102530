"""The study analysis pipeline (DESIGN.md §2): an ingested study in, a ``StudyAnalysis`` out.

Per modality present: select series → preprocess → segmentation on Triton (all slices of a series in one
batched call, modalities concurrently) → measurements → lesion ROIs → embedding + prototype classification
on Triton (the ``lesion_classify`` ensemble) → fusion across modalities. CPU work runs in worker threads so
the event loop (and a gRPC server on it) stays responsive.

Competence (analysis/competence.py) decides per modality whether it is assessed at all: the input checks
before any model runs, then the anatomy and distribution checks on the segmentation. A modality that is
not assessable gives a result that says why and nothing else — no lesions, measurements or probabilities,
and no part in the fused assessment; a study with no assessable modality gets a fused assessment that says
so. A modality that fails inside cspine degrades the result with a notice; when every modality that ran
failed that way, the study fails as a server fault (``AnalysisFailedError``), never as the caller's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cspine.analysis import alignment
from cspine.analysis.canal import OPLL_MIN_MM, canal_section, opll_section
from cspine.analysis.competence import CompetenceReference, InputVerdict, anatomy_reasons, input_verdicts
from cspine.analysis.discs import disc_height
from cspine.analysis.fusion import Calibration, assess, detection_logit, normalised_entropy
from cspine.analysis.lesions import clean_tumor_labels, measure_lesions, split_above_c2
from cspine.analysis.levels import SpineFrame, frame_from_discs, frame_from_radiograph
from cspine.analysis.masks import LabelMasks, largest_component, mask_points
from cspine.budget import plan_study
from cspine.config import IngestLimits
from cspine.dicom.selection import select_series
from cspine.domain import (
    MEASURED_LEVELS,
    VERTEBRAL_LEVELS,
    Assessment,
    ClassProbability,
    Lesion,
    LevelMeasurement,
    Modality,
    ModalityResult,
    ModelVersion,
    Notice,
    NoticeCode,
    OpllMeasurement,
    Reason,
    ReasonCode,
    Series,
    SeriesRole,
    SeriesUsed,
    SpineMeasurements,
    Study,
    StudyAnalysis,
    Volume,
)
from cspine.errors import (
    AnalysisFailedError,
    CspineError,
    DeadlineExceededError,
    TritonUnavailableError,
)
from cspine.fewshot.prototypes import PrototypeSet
from cspine.imaging.roi import lesion_roi, modality_one_hot
from cspine.imaging.seg_input import SegGrid, SourceLabelMaps, seg_inputs
from cspine.inference.client import TritonClient
from cspine.inference.specs import (
    LESION_CLASSIFY,
    LESION_EMBED,
    MAX_EMBEDDINGS,
    MODALITY_ORDER,
    MODELS,
    SEG_LABELS,
    seg_spec,
)

logger = logging.getLogger(__name__)

# Which modality measures what best, in order of preference.
CANAL_SOURCES = (Modality.CT, Modality.MR)  # CT: the bony canal's edge is sharp; MR: 3 mm sagittal slices
CORD_SOURCES = (Modality.MR,)  # only MR tells cord from CSF
DISC_SOURCES = (Modality.MR, Modality.CT, Modality.XR)  # MR: the disc axis lies in its fine sagittal plane
STAGES = ("select", "preprocess", "segment", "measure", "classify", "fuse", "dicom")


@dataclass(frozen=True)
class AnalysisOptions:
    return_dicom_seg: bool = False
    return_dicom_sr: bool = False
    modalities: frozenset[Modality] | None = None  # analyse only these (None: every modality present)
    deadline_s: float | None = None  # time left for the whole analysis


@dataclass
class _Timer:
    """Seconds spent per stage, summed over modalities (work time, not wall time, when they overlap)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @contextmanager
    def stage(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start


@dataclass
class _Measured:
    """One modality's result and what it measured for the spine."""

    result: ModalityResult
    size: float  # largest lesion: mL (CT, MR) or cm² (radiograph); 0 when none
    probabilities: np.ndarray | None
    levels: dict[str, LevelMeasurement]
    cobb: float | None = None
    opll: OpllMeasurement | None = None
    notices: list[Notice] = field(default_factory=list)


def model_versions(repository: Path) -> list[ModelVersion]:
    """Each served model's version: Triton's version folder and the ONNX file's SHA-256 prefix."""
    out = []
    for name in MODELS:
        path = repository / name / "1" / "model.onnx"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"
        out.append(ModelVersion(name, f"1 (sha256:{digest})"))
    return out


class Deadline:
    def __init__(self, seconds: float | None) -> None:
        self.at = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float | None:
        if self.at is None:
            return None
        left = self.at - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError("the deadline passed during the analysis")
        return left


async def analyze(
    study: Study,
    triton: TritonClient,
    prototypes: PrototypeSet,
    calibration: Calibration,
    options: AnalysisOptions = AnalysisOptions(),
    models: list[ModelVersion] | None = None,
    competence: CompetenceReference | None = None,
    *,
    limits: IngestLimits = IngestLimits(),
) -> StudyAnalysis:
    """Analyse an ingested study. Without ``competence`` the distribution check is not made (and the result
    discloses nothing about the models' training data): the service always passes it.

    A study without a CT, MR or radiograph image cspine reads is not assessable (the fused assessment says
    so); ``AnalysisFailedError`` when every modality that ran failed inside cspine; ``StudyTooLargeError``,
    before anything is resampled, when the chosen series would take more than ``limits.max_study_model_bytes``
    (cspine/budget.py)."""
    timer = _Timer()
    deadline = Deadline(options.deadline_s)
    start = time.perf_counter()
    with timer.stage("select"):
        selection = select_series(study)
        verdicts = input_verdicts(study, selection)
    chosen = selection.chosen
    notices = list(study.notices) + list(selection.notices)
    wanted = [m for m in verdicts if options.modalities is None or m in options.modalities]
    running = [m for m in wanted if verdicts[m].assessable]
    # what the analysis allocates follows the model grids' slices, not the upload's size: refused before it is
    plan_study({r: chosen[r] for m in running for r in verdicts[m].roles}, options.return_dicom_seg).check(
        limits.max_study_model_bytes
    )
    outcomes = await asyncio.gather(
        *(
            _analyse_modality(m, verdicts[m], chosen, triton, prototypes, calibration, competence, deadline, timer)
            for m in running
        ),
        return_exceptions=True,
    )
    results: dict[Modality, ModalityResult] = {
        m: _not_assessable_result(verdicts[m], None) for m in wanted if not verdicts[m].assessable
    }
    measured: dict[Modality, _Measured] = {}
    failures: list[str] = []
    for modality, outcome in zip(running, outcomes, strict=True):
        if isinstance(outcome, (DeadlineExceededError, TritonUnavailableError)):
            raise outcome  # the service, not the images, failed: nothing partial is worth returning
        if isinstance(outcome, BaseException):
            reason = str(outcome) if isinstance(outcome, CspineError) else "an internal error"
            if not isinstance(outcome, CspineError):
                logger.error("%s analysis failed", modality.value, exc_info=outcome)
            failures.append(f"{modality.value} could not be analysed: {reason}")
            notices.append(Notice(NoticeCode.MODALITY_FAILED, failures[-1]))
            continue
        results[modality] = outcome.result
        notices.extend(outcome.notices)
        if outcome.result.assessment.assessed:
            measured[modality] = outcome
    if failures and not results:
        raise AnalysisFailedError("no modality of the study could be analysed: " + "; ".join(failures))
    for result in results.values():
        if not result.assessment.assessed:
            notices.append(Notice(NoticeCode.NOT_ASSESSABLE, result.assessment.status_message))

    with timer.stage("fuse"):
        if measured:
            fused = assess(
                {m: r.size for m, r in measured.items()},
                {m: r.probabilities for m, r in measured.items() if r.probabilities is not None},
                prototypes.labels,
                calibration,
            )
        else:
            fused = Assessment.not_assessable((_nothing_assessable(results),))
        spine = _spine(measured, notices)
    analysis = StudyAnalysis(
        study_instance_uid=study.study_instance_uid,
        modalities=[results[m] for m in MODALITY_ORDER if m in results],
        fused=fused,
        spine=spine,
        prototype_set_version=prototypes.version,
        models=list(models or []),
        notices=notices,
        disclosure=competence.disclosure if competence is not None else None,
    )
    if options.return_dicom_seg or options.return_dicom_sr:
        with timer.stage("dicom"):
            await asyncio.to_thread(_dicom_outputs, analysis, chosen, options)
    analysis.stage_seconds = {name: round(timer.seconds.get(name, 0.0), 4) for name in STAGES}
    analysis.stage_seconds["total"] = round(time.perf_counter() - start, 4)
    return analysis


def _nothing_assessable(results: Mapping[Modality, ModalityResult]) -> Reason:
    if not results:
        what = "the study holds no CT, MR or radiograph image cspine reads"
    else:
        what = "; ".join(
            f"{m.value}: " + ", ".join(r.code.value for r in res.assessment.reasons) for m, res in results.items()
        )
    return Reason(ReasonCode.NO_ASSESSABLE_MODALITY, f"no modality of the study could be assessed ({what})")


def _not_assessable_result(verdict: InputVerdict, ood, reasons: tuple[Reason, ...] | None = None) -> ModalityResult:
    """A modality that gives no tumor call: the series it was judged on and why, nothing else."""
    series = tuple(
        SeriesUsed(role, s.series_instance_uid, s.description, s.volume.shape[0] if s.volume is not None else 0)
        for role, s in verdict.judged
    )
    return ModalityResult(verdict.modality, series, [], Assessment.not_assessable(reasons or verdict.reasons), ood=ood)


def _dicom_outputs(analysis: StudyAnalysis, chosen: Mapping[SeriesRole, Series], options: AnalysisOptions) -> None:
    """The requested DICOM SEG and SR (the SR referencing the SEG when there is one). One that cannot be
    written is left out with an ``output_unavailable`` notice: an output never costs the analysis. A source value
    one leaves out (invalid for its VR) is told in an ``output_value_omitted`` notice."""
    from cspine.dicom.outputs import OutputUnavailableError, build_seg, build_sr

    notices = analysis.notices
    writers = (
        ("SEG", "dicom_seg", options.return_dicom_seg, lambda: build_seg(analysis, chosen, notices)),
        ("SR", "dicom_sr", options.return_dicom_sr, lambda: build_sr(analysis, chosen, analysis.dicom_seg, notices)),
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


async def _analyse_modality(
    modality: Modality,
    verdict: InputVerdict,
    chosen: Mapping[SeriesRole, Series],
    triton: TritonClient,
    prototypes: PrototypeSet,
    calibration: Calibration,
    competence: CompetenceReference | None,
    deadline: Deadline,
    timer: _Timer,
) -> _Measured:
    roles = list(verdict.roles)
    volumes = {r: chosen[r].volume for r in roles}
    spec = seg_spec(modality)
    grids: dict[SeriesRole, SegGrid] = {}

    async def segment(role: SeriesRole) -> tuple[np.ndarray, np.ndarray]:
        with timer.stage("preprocess"):
            inputs, grid = await asyncio.to_thread(seg_inputs, modality, volumes[role])
        with timer.stage("segment"):
            out = await triton.infer(spec, {"image": inputs}, deadline_s=deadline.left())
        with timer.stage("measure"):
            labels = await asyncio.to_thread(_grid_labels, modality, out["labels"], grid, volumes[role])
        grids[role] = grid
        return labels, out["features"]

    segmented = dict(zip(roles, await asyncio.gather(*(segment(r) for r in roles)), strict=True))
    label_maps = {role: labels for role, (labels, _) in segmented.items()}
    # Measurements are made on the model grid (bounded whatever the source matrix), in patient mm.
    on_grid = {r: grids[r].volume(volumes[r], label_maps[r]) for r in roles}
    main = roles[0]
    with timer.stage("measure"):
        frame, levels, cobb, opll = await asyncio.to_thread(
            _measure_spine, modality, label_maps[main], on_grid[main], volumes[main]
        )
        named = sum(1 for n in MEASURED_LEVELS if frame is not None and n in frame.levels)
        reasons = await asyncio.to_thread(anatomy_reasons, modality, label_maps[main], on_grid[main], named)
    ood = competence.ood(modality, segmented[main][1]) if competence is not None else None
    if ood is not None and ood.score > ood.threshold:
        reasons.append(
            Reason(
                ReasonCode.OUT_OF_DISTRIBUTION,
                f"{modality.value}: the images are unlike the models' training data (score {ood.score:.2f}, "
                f"threshold {ood.threshold:.2f})",
            )
        )
    if reasons:
        return _Measured(_not_assessable_result(verdict, ood, tuple(reasons)), 0.0, None, {})
    with timer.stage("measure"):
        lesion_mask = _lesion_mask(modality, label_maps, on_grid)
        lesions = await asyncio.to_thread(
            measure_lesions, lesion_mask, on_grid[main], frame, chosen[main].series_instance_uid
        )
        lesions, above = split_above_c2(lesions, frame)
    notices = [
        Notice(
            NoticeCode.OUTSIDE_ANALYSED_LEVELS,
            f"{modality.value}: a finding of {lesion.max_diameter_mm:.0f} mm above the C2 body (dens, C1 or skull "
            "base) was not counted: cspine analyses C2 to T1",
            chosen[main].series_instance_uid,
        )
        for lesion in above
    ]
    probabilities = None
    if lesions:  # embedded even without prototypes: AddCase builds the first ones from these embeddings
        lesions, probabilities = await _classify(
            modality, lesions, volumes, triton, prototypes, calibration, deadline, timer
        )
    size = _size(lesions[0]) if lesions else 0.0
    score = _detection_score(modality, size, calibration)
    assessment = Assessment(tumor_detected=score >= 0.5, detection_score=round(score, 4))
    if lesions and lesions[0].assessment is not None:
        assessment = lesions[0].assessment  # the largest lesion's: the same size, so the same score
    series = tuple(
        SeriesUsed(r, chosen[r].series_instance_uid, chosen[r].description, volumes[r].shape[0]) for r in roles
    )
    source_maps = SourceLabelMaps({r: (label_maps[r], grids[r]) for r in roles})  # made when SEG/overlays read them
    result = ModalityResult(modality, series, lesions, assessment, source_maps, ood)
    return _Measured(result, size, probabilities, levels, cobb, opll, notices)


def _grid_labels(modality: Modality, labels: np.ndarray, grid: SegGrid, volume: Volume) -> np.ndarray:
    """Model-grid labels without tumor specks too small to be lesions (sizes in mm on the model grid)."""
    tumor = SEG_LABELS[modality].index("tumor")
    return clean_tumor_labels(labels, tumor, grid.volume(volume, labels).spacing, volume.projection)


def _detection_score(modality: Modality, size: float, calibration: Calibration) -> float:
    """The calibrated probability that a tumor is present, given this modality's lesion size alone."""
    return float(1.0 / (1.0 + np.exp(-detection_logit(modality, size, calibration))))


def _size(lesion: Lesion) -> float:
    """A lesion's size for detection: mL, or cm² on a radiograph."""
    return float(lesion.volume_ml) if lesion.volume_ml is not None else float(lesion.area_mm2 or 0.0) / 100.0


def _lesion_mask(
    modality: Modality, label_maps: dict[SeriesRole, np.ndarray], volumes: dict[SeriesRole, Volume]
) -> np.ndarray:
    """The tumor mask lesions are measured on: the first role's, joined with the other MR contrast's when
    both lie on the same grid (a lesion bright on T2 may be faint on T1 and the other way round)."""
    tumor = SEG_LABELS[modality].index("tumor")
    roles = list(label_maps)
    mask = label_maps[roles[0]] == tumor
    for role in roles[1:]:
        if _same_grid(volumes[roles[0]], volumes[role]):
            mask = mask | (label_maps[role] == tumor)
    return mask


def _same_grid(a: Volume, b: Volume) -> bool:
    return (
        a.shape == b.shape
        and np.allclose(a.origin, b.origin, atol=0.01)
        and np.allclose(a.row_direction, b.row_direction, atol=1e-4)
        and np.allclose(a.column_direction, b.column_direction, atol=1e-4)
        and np.allclose(a.pixel_spacing, b.pixel_spacing, atol=1e-4)
        and np.allclose(a.slice_offsets, b.slice_offsets, atol=0.01)
    )


async def _classify(
    modality: Modality,
    lesions: list[Lesion],
    volumes: Mapping[SeriesRole, Volume],
    triton: TritonClient,
    prototypes: PrototypeSet,
    calibration: Calibration,
    deadline: Deadline,
    timer: _Timer,
) -> tuple[list[Lesion], np.ndarray | None]:
    """Embed the lesions (largest first; beyond MAX_EMBEDDINGS they stay unclassified) and classify them
    against the modality's prototypes in one ``lesion_classify`` call; returns the lesions with their
    assessments and the probabilities of the largest. Without prototypes for the modality (an emptied
    support set) only ``lesion_embed`` runs: the lesions get embeddings, no class probabilities (None)."""
    lesions, rest = lesions[:MAX_EMBEDDINGS], lesions[MAX_EMBEDDINGS:]
    with timer.stage("preprocess"):
        rois = await asyncio.to_thread(
            lambda: np.stack([lesion_roi(modality, volumes, np.array(lesion.centre_mm)) for lesion in lesions])
        )
    onehot = np.tile(modality_one_hot(modality), (len(lesions), 1))
    inputs = {"roi": rois.astype(np.float32), "modality": onehot}
    classes = prototypes.prototypes.get(modality)
    with timer.stage("classify"):
        if classes is None:
            out = await triton.infer(LESION_EMBED, inputs, deadline_s=deadline.left())
        else:
            out = await triton.infer(LESION_CLASSIFY, {**inputs, "prototypes": classes}, deadline_s=deadline.left())
    classified = []
    for i, (lesion, emb) in enumerate(zip(lesions, out["embedding"], strict=True)):
        score = _detection_score(modality, _size(lesion), calibration)
        assessment = Assessment(tumor_detected=score >= 0.5, detection_score=round(score, 4))
        if classes is not None:
            probs = out["probabilities"][i]
            assessment = dataclasses.replace(
                assessment,
                probabilities=tuple(
                    ClassProbability(label, float(p)) for label, p in zip(prototypes.labels, probs, strict=True)
                ),
                uncertainty=round(normalised_entropy(probs), 4),
            )
        classified.append(dataclasses.replace(lesion, assessment=assessment, embedding=emb.copy()))
    if classes is None:
        return classified + rest, None
    return classified + rest, out["probabilities"][0].astype(np.float64)


# ------------------------------------------------------------------------------------------------------
# Spine measurements per modality, then the best source for each


_CANAL_LABELS = {Modality.CT: ("canal",), Modality.MR: ("csf", "cord")}
_CORD_LABEL = {Modality.MR: "cord"}


def _measure_spine(modality: Modality, labels: np.ndarray, volume: Volume, image: Volume | None = None):
    """Levels, canal/cord/disc per level, Cobb angle and OPLL from ``labels`` on ``volume``'s grid (the model
    grid in the pipeline); OPLL reads the CT numbers of ``image`` (the source series; default ``volume``)."""
    image = volume if image is None else image
    names = SEG_LABELS[modality]
    levels: dict[str, LevelMeasurement] = {}
    cobb = None
    opll = None
    if modality is Modality.XR:
        frame = frame_from_radiograph(labels, volume)
        if frame is not None:
            cobb = _xr_cobb(labels, volume)
            levels = _xr_discs(labels, volume, frame)
        return frame, levels, cobb, opll
    frame = frame_from_discs(labels, volume, names.index("disc"), names.index("vertebral_body"))
    if frame is None:
        return None, levels, cobb, opll
    masks = LabelMasks(labels, volume)
    canal = tuple(names.index(n) for n in _CANAL_LABELS[modality])
    cord = names.index(_CORD_LABEL[modality]) if modality in _CORD_LABEL else None
    opll_levels: dict[str, float] = {}
    opll_ratio: dict[str, float] = {}
    for name in MEASURED_LEVELS:
        level = frame.levels.get(name)
        if level is None:
            continue
        section = canal_section(masks, level, canal, cord)
        disc = frame.discs.get(name)
        height = None
        if disc is not None and disc.found:
            across = np.cross(disc.axis, np.array([0.0, 1.0, 0.0]))
            across = across / max(np.linalg.norm(across), 1e-9)
            height = disc_height(masks, disc.centre, disc.axis, names.index("disc"), across)
        levels[name] = LevelMeasurement(
            level=name,
            canal_area_mm2=section.canal_area_mm2 if section else None,
            cord_area_mm2=section.cord_area_mm2 if section else None,
            cord_compression_ratio=section.cord_compression_ratio if section else None,
            disc_height_mm=height,
            canal_source=modality if section else None,
            cord_source=modality if section and section.cord_area_mm2 is not None else None,
            disc_source=modality if height is not None else None,
        )
        if modality is Modality.CT:
            found = opll_section(masks, image, level, canal[0])
            if found is not None:
                opll_levels[name], opll_ratio[name] = found.thickness_mm, found.occupying_ratio
    if modality is Modality.CT and opll_levels:
        worst = max(opll_levels, key=opll_levels.get)
        present = opll_levels[worst] >= OPLL_MIN_MM
        opll = OpllMeasurement(
            present=present,
            occupying_ratio=opll_ratio[worst] if present else 0.0,
            max_thickness_mm=opll_levels[worst] if present else 0.0,
            levels=tuple(n for n in MEASURED_LEVELS if opll_levels.get(n, 0.0) >= OPLL_MIN_MM),
        )
    if modality is Modality.MR:
        cobb = _mr_cobb(labels, volume, frame, names)
    return frame, levels, cobb, opll


def _xr_cobb(labels: np.ndarray, volume: Volume) -> float | None:
    names = SEG_LABELS[Modality.XR]
    points = {}
    for level in ("c2", "c7"):
        body = largest_component(labels[0] == names.index(f"{level}_body"))
        if body.sum() < 30:
            return None
        points[level] = mask_points(body, volume, 0)[:, 1:3]  # at 0.25 mm, whatever the grid's pixels
    return alignment.cobb_angle(points["c2"], points["c7"])


def _mr_cobb(labels: np.ndarray, volume: Volume, frame: SpineFrame, names: tuple[str, ...]) -> float | None:
    """Cobb angle on the mid-sagittal MR slice: the one crossing the most cord."""
    cord = labels == names.index("cord")
    if not cord.any():
        return None
    k = int(np.argmax(cord.sum(axis=(1, 2))))
    pts = mask_points(labels[k] == names.index("vertebral_body"), volume, k)
    if not len(pts):
        return None
    slab = frame.level_index(pts)
    c2 = pts[slab == VERTEBRAL_LEVELS.index("C2")][:, 1:3]
    c7 = pts[slab == VERTEBRAL_LEVELS.index("C7")][:, 1:3]
    return alignment.cobb_angle(c2, c7)


def _xr_discs(labels: np.ndarray, volume: Volume, frame: SpineFrame) -> dict[str, LevelMeasurement]:
    """Disc heights on the radiograph: along the line between neighbouring body centres."""
    disc = SEG_LABELS[Modality.XR].index("disc")
    masks = LabelMasks(labels, volume)
    out = {}
    names = [n for n in MEASURED_LEVELS if n in frame.levels]
    normal = np.cross(volume.row_direction, volume.column_direction)
    for upper, lower in zip(names, names[1:], strict=False):
        a, b = frame.levels[upper].centre, frame.levels[lower].centre
        axis = (a - b) / np.linalg.norm(a - b)
        across = np.cross(normal, axis)
        height = disc_height(masks, (a + b) / 2, axis, disc, across)
        if height is not None:
            out[upper] = LevelMeasurement(level=upper, disc_height_mm=height, disc_source=Modality.XR)
    return out


def _spine(measured: dict[Modality, _Measured], notices: list[Notice]) -> SpineMeasurements:
    levels = []
    for name in MEASURED_LEVELS:
        canal = _first(measured, CANAL_SOURCES, name, "canal_area_mm2")
        cord = _first(measured, CORD_SOURCES, name, "cord_area_mm2")
        disc = _first(measured, DISC_SOURCES, name, "disc_height_mm")
        levels.append(
            LevelMeasurement(
                level=name,
                canal_area_mm2=canal.canal_area_mm2 if canal else None,
                cord_area_mm2=cord.cord_area_mm2 if cord else None,
                cord_compression_ratio=cord.cord_compression_ratio if cord else None,
                disc_height_mm=disc.disc_height_mm if disc else None,
                canal_source=canal.canal_source if canal else None,
                cord_source=cord.cord_source if cord else None,
                disc_source=disc.disc_source if disc else None,
            )
        )
    cobb, cobb_source = None, None
    for modality in (Modality.XR, Modality.MR):
        if modality in measured and measured[modality].cobb is not None:
            cobb, cobb_source = measured[modality].cobb, modality
            break
    if cobb is None and (Modality.XR in measured or Modality.MR in measured):
        notices.append(Notice(NoticeCode.MEASUREMENT_UNAVAILABLE, "the C2–C7 Cobb angle could not be measured"))
    opll = measured[Modality.CT].opll if Modality.CT in measured else None
    return SpineMeasurements(levels=levels, cobb_angle_deg=cobb, cobb_source=cobb_source, opll=opll)


def _first(measured: dict[Modality, _Measured], sources: tuple[Modality, ...], level: str, attribute: str):
    for modality in sources:
        found = measured.get(modality)
        if found is not None and level in found.levels and getattr(found.levels[level], attribute) is not None:
            return found.levels[level]
    return None
