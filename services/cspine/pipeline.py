"""The study analysis pipeline (DESIGN.md §2): an ingested study in, a ``StudyAnalysis`` out. This module
orders the stages; what each decides lives in ``analysis/``.

Per modality present: select series → preprocess → segmentation on Triton (all slices of a series in one
batched call, modalities concurrently) → measurements (``analysis/spine.py``, which also holds which modality
each measurement is taken from) → lesion ROIs → embedding + prototype classification on Triton (the
``lesion_classify`` ensemble) → detection and fusion across modalities (``analysis/fusion.py``). CPU work
runs in worker threads so the event loop (and a gRPC server on it) stays responsive.

Competence (analysis/competence.py) decides per modality whether it is assessed at all: the input checks
before any model runs, then the anatomy and distribution checks on the segmentation. A modality that is
not assessable gives a result that says why and nothing else — no lesions, measurements or probabilities,
and no part in the fused assessment; a study with no assessable modality gets a fused assessment that says
so. A modality that fails inside cspine degrades the result with a notice; when every modality that ran
failed that way, the study fails as a server fault (``AnalysisFailedError``), never as the caller's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np

from cspine.analysis.competence import (
    CompetenceReference,
    InputVerdict,
    assessed_result,
    input_verdicts,
    not_assessable_notices,
    not_assessable_result,
    segmentation_reasons,
)
from cspine.analysis.fusion import (
    Calibration,
    classified,
    largest_lesion_assessment,
    matched_lesions,
    matched_probabilities,
    study_assessment,
)
from cspine.analysis.lesions import classify_inputs, clean_grid_labels, find_lesions
from cspine.analysis.spine import ModalitySpine, combine, measure_spine, opll_where_measured, unavailable_notices
from cspine.budget import plan_study
from cspine.config import IngestLimits
from cspine.dicom.selection import select_series
from cspine.domain import (
    Lesion,
    Modality,
    ModalityResult,
    ModelVersion,
    Notice,
    NoticeCode,
    Series,
    SeriesRole,
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
from cspine.imaging.seg_input import SegGrid, SourceLabelMaps, seg_inputs
from cspine.inference.client import TritonClient
from cspine.inference.specs import (
    EMBEDDING_TENSOR,
    FEATURES_TENSOR,
    IMAGE_TENSOR,
    LABELS_TENSOR,
    LESION_CLASSIFY,
    LESION_EMBED,
    MAX_EMBEDDINGS,
    MODALITY_ORDER,
    MODALITY_TENSOR,
    PROBABILITIES_TENSOR,
    PROTO_CLASSIFY,
    PROTOTYPES_TENSOR,
    ROI_TENSOR,
    seg_spec,
)

logger = logging.getLogger(__name__)

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
    spine: ModalitySpine = field(default_factory=ModalitySpine)
    notices: list[Notice] = field(default_factory=list)


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
        m: not_assessable_result(verdicts[m]) for m in wanted if not verdicts[m].assessable
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
    notices.extend(not_assessable_notices(results))

    with timer.stage("fuse"):
        sizes = {m: r.size for m, r in measured.items()}
        matched, unmatched = matched_lesions(results)
        notices.extend(unmatched)
        probabilities = matched_probabilities(matched)
        if prototypes.fusion_weights:  # refitted to the site's cases (fewshot/prototypes.py): pooled with them
            calibration = replace(
                calibration, classification_weights=prototypes.fusion_weights, classification_order=()
            )
        fused = study_assessment(sizes, probabilities, prototypes.labels, calibration, results)
        spines = {m: r.spine for m, r in measured.items()}
        spine = combine(spines)
        notices.extend(unavailable_notices(spines, spine))
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
            from cspine.dicom.outputs import write_outputs  # highdicom, imported once an output is asked for

            seg, sr = options.return_dicom_seg, options.return_dicom_sr
            await asyncio.to_thread(write_outputs, analysis, chosen, seg=seg, sr=sr)
    analysis.stage_seconds = {name: round(timer.seconds.get(name, 0.0), 4) for name in STAGES}
    analysis.stage_seconds["total"] = round(time.perf_counter() - start, 4)
    return analysis


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
    volumes = verdict.volumes()
    spec = seg_spec(modality)
    grids: dict[SeriesRole, SegGrid] = {}

    async def segment(role: SeriesRole) -> tuple[np.ndarray, np.ndarray]:
        with timer.stage("preprocess"):
            inputs, grid = await asyncio.to_thread(seg_inputs, modality, volumes[role])
        with timer.stage("segment"):
            out = await triton.infer(spec, {IMAGE_TENSOR: inputs}, deadline_s=deadline.left())
        with timer.stage("measure"):
            labels = await asyncio.to_thread(clean_grid_labels, modality, out[LABELS_TENSOR], grid, volumes[role])
        grids[role] = grid
        return labels, out[FEATURES_TENSOR]

    segmented = dict(zip(roles, await asyncio.gather(*(segment(r) for r in roles)), strict=True))
    label_maps = {role: labels for role, (labels, _) in segmented.items()}
    # Measurements are made on the model grid (bounded whatever the source matrix), in patient mm.
    on_grid = {r: grids[r].volume(volumes[r], label_maps[r]) for r in roles}
    main = roles[0]
    with timer.stage("measure"):
        spine = await asyncio.to_thread(measure_spine, modality, label_maps[main], on_grid[main], volumes[main])
        if modality is Modality.CT:
            label_maps = {r: opll_where_measured(labels, spine.opll) for r, labels in label_maps.items()}
        ood = competence.ood(modality, segmented[main][1]) if competence is not None else None
        frame = spine.frame
        reasons = await asyncio.to_thread(segmentation_reasons, modality, label_maps[main], on_grid[main], frame, ood)
    if reasons:
        return _Measured(not_assessable_result(verdict, ood, tuple(reasons)), 0.0)
    with timer.stage("measure"):
        uid = chosen[main].series_instance_uid
        lesions, notices = await asyncio.to_thread(find_lesions, modality, label_maps, on_grid, frame, uid)
    if lesions:  # embedded even without prototypes: AddCase builds the first ones from these embeddings
        lesions = await _classify(modality, lesions, volumes, triton, prototypes, calibration, deadline, timer)
    size, assessment = largest_lesion_assessment(modality, lesions, calibration)
    source_maps = SourceLabelMaps({r: (label_maps[r], grids[r]) for r in roles})  # made when SEG/overlays read them
    result = assessed_result(verdict, lesions, assessment, source_maps, ood)
    return _Measured(result, size, spine, notices)


async def _classify(
    modality: Modality,
    lesions: list[Lesion],
    volumes: Mapping[SeriesRole, Volume],
    triton: TritonClient,
    prototypes: PrototypeSet,
    calibration: Calibration,
    deadline: Deadline,
    timer: _Timer,
) -> list[Lesion]:
    """Embed the lesions (largest first; beyond MAX_EMBEDDINGS they stay unclassified) and classify them
    against the modality's prototypes in one ``lesion_classify`` call (a client pinned to a version set asks
    ``lesion_embed`` and ``proto_classify`` in turn, inference/client.py); returns the lesions with their
    embeddings and assessments. Without prototypes for the modality (an emptied support set) only
    ``lesion_embed`` runs: the lesions get embeddings, no class probabilities."""
    lesions, rest = lesions[:MAX_EMBEDDINGS], lesions[MAX_EMBEDDINGS:]
    classes = prototypes.prototypes.get(modality)
    with timer.stage("preprocess"):
        inputs = await asyncio.to_thread(classify_inputs, modality, lesions, volumes, classes)
    with timer.stage("classify"):
        if classes is None or not triton.classifies_by_ensemble:
            embed = {name: inputs[name] for name in (ROI_TENSOR, MODALITY_TENSOR)}
            out = await triton.infer(LESION_EMBED, embed, deadline_s=deadline.left())
            if classes is not None:  # a pinned client: the two steps of the ensemble, each at the set's version
                scores = {EMBEDDING_TENSOR: out[EMBEDDING_TENSOR], PROTOTYPES_TENSOR: classes}
                out |= await triton.infer(PROTO_CLASSIFY, scores, deadline_s=deadline.left())
        else:
            out = await triton.infer(LESION_CLASSIFY, inputs, deadline_s=deadline.left())
    probabilities = out[PROBABILITIES_TENSOR] if classes is not None else None
    embedded = classified(modality, lesions, out[EMBEDDING_TENSOR], calibration, prototypes.labels, probabilities)
    return embedded + rest
