"""Detection scoring and fusion: each lesion's assessment (with its class probabilities when classified), one
modality's assessment from its largest lesion, and the per-modality results fused into one assessment,
weighting each modality by its measured reliability. A tumor is detected when a score reaches
``DETECTION_THRESHOLD``, whether one modality's or the fused one.

Both detection and classification use weighted log-linear pooling: the fused log-odds (or
log-probabilities) are the weighted sum of each available modality's, so any subset of modalities works and
fewer modalities give a less confident answer. Detection pools each modality's largest lesion; classification
pools the lesions matched across modalities (``matched_lesions``): the main lesion and, from each other
modality, its largest lesion at one of the main lesion's levels. The weights, and each modality's detection
curve, are fitted on held-out SYNTHETIC phantom studies by ``cspine calibrate`` and stored beside the models
(``model_repository/calibration.json``), never written into the code.

Where one modality alone classified better than pooling on the calibration cohort beyond doubt, the calibration
names an order of modalities (``classification_order``; the shipped one names none): the study's class
probabilities are then those of the first modality of that order with a classified matched lesion. Every
assessment says which modalities its probabilities came from (``classified_from``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cspine.analysis.competence import no_assessable_modality
from cspine.domain import (
    MEASURING_ORDER,
    Assessment,
    ClassProbability,
    Lesion,
    Modality,
    ModalityResult,
    Notice,
    NoticeCode,
)
from cspine.inference.model_config import version_file

CALIBRATION_FILE = "calibration.json"
DETECTION_THRESHOLD = 0.5  # a detection score at or above this reports a tumor detected


@dataclass(frozen=True)
class DetectionCurve:
    """P(tumor | largest lesion size s) = sigmoid(intercept + slope · log1p(s)) for one modality; s in mL
    (CT, MR) or cm² (radiograph)."""

    intercept: float
    slope: float

    def logit(self, size: float) -> float:
        return self.intercept + self.slope * float(np.log1p(max(size, 0.0)))


@dataclass(frozen=True)
class Calibration:
    """Per-modality reliability, fitted on held-out SYNTHETIC studies."""

    detection: dict[Modality, DetectionCurve]
    detection_weights: dict[Modality, float]
    classification_weights: dict[Modality, float]
    fitted_on: str = ""  # what the figures were measured on
    classification_fitted_on: str = ""  # what the classification weights were (empty: as fitted_on)
    embed_model_sha256: str = ""  # lesion_embed model the classification weights belong to
    # 95 % bootstrap interval of each classification weight (empty: not measured)
    classification_weights_ci95: dict[Modality, tuple[float, float]] = field(default_factory=dict)
    # the study's class probabilities: pooled (``classification_order`` empty) or those of the first modality of
    # ``classification_order`` with a classified matched lesion, chosen on the calibration cohort
    # (``classification_choice``: each rule's class accuracy there, and on how many studies)
    classification_order: tuple[Modality, ...] = ()
    classification_choice: dict = field(default_factory=dict)

    @property
    def detection_threshold(self) -> float:
        """The score at or above which a tumor is detected: ``DETECTION_THRESHOLD``, whatever the fit."""
        return DETECTION_THRESHOLD

    @staticmethod
    def uniform() -> Calibration:
        """Equal weights and a plain size rule: what an uncalibrated install (and calibration itself) uses."""
        return Calibration(
            detection={m: DetectionCurve(-4.0, 40.0) for m in Modality},
            detection_weights={m: 1.0 for m in Modality},
            classification_weights={m: 1.0 for m in Modality},
            fitted_on="uncalibrated: equal weights",
        )

    def to_json(self) -> dict:
        return {
            "note": "fitted by `cspine calibrate` on SYNTHETIC phantom studies; see docs/pipeline.md",
            "fitted_on": self.fitted_on,
            "classification_fitted_on": self.classification_fitted_on,
            "embed_model_sha256": self.embed_model_sha256,
            "detection": {m.value: {"intercept": c.intercept, "slope": c.slope} for m, c in self.detection.items()},
            "detection_weights": {m.value: w for m, w in self.detection_weights.items()},
            "classification_weights": {m.value: w for m, w in self.classification_weights.items()},
            "classification_weights_ci95": {m.value: list(ci) for m, ci in self.classification_weights_ci95.items()},
            "classification_order": [m.value for m in self.classification_order],
            "classification_choice": self.classification_choice,
        }

    @staticmethod
    def from_json(data: dict) -> Calibration:
        return Calibration(
            detection={
                Modality(k): DetectionCurve(float(v["intercept"]), float(v["slope"]))
                for k, v in data["detection"].items()
            },
            detection_weights={Modality(k): float(v) for k, v in data["detection_weights"].items()},
            classification_weights={Modality(k): float(v) for k, v in data["classification_weights"].items()},
            fitted_on=str(data.get("fitted_on", "")),
            classification_fitted_on=str(data.get("classification_fitted_on", "")),
            embed_model_sha256=str(data.get("embed_model_sha256", "")),
            classification_weights_ci95={
                Modality(k): (float(v[0]), float(v[1])) for k, v in data.get("classification_weights_ci95", {}).items()
            },
            classification_order=tuple(Modality(m) for m in data.get("classification_order", [])),
            classification_choice=dict(data.get("classification_choice", {})),
        )

    @staticmethod
    def load(repository: Path) -> Calibration:
        """The calibration of the repository's served version set (model_config.version_file)."""
        path = version_file(repository, CALIBRATION_FILE)
        return Calibration.from_json(json.loads(path.read_text())) if path.exists() else Calibration.uniform()

    def save(self, repository: Path, version: int | None = None) -> Path:
        """Write the calibration of version set ``version`` (default: the served one)."""
        path = version_file(repository, CALIBRATION_FILE, version)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def normalised_entropy(p: np.ndarray) -> float:
    """Entropy of a distribution over its maximum (log K): 0 when certain, 1 when uniform."""
    p = np.clip(np.asarray(p, dtype=float), 1e-12, 1.0)
    return float(-(p * np.log(p)).sum() / np.log(len(p))) if len(p) > 1 else 0.0


def detection_logit(modality: Modality, size: float, calibration: Calibration) -> float:
    return calibration.detection[modality].logit(size)


def lesion_size(lesion: Lesion) -> float:
    """A lesion's size for detection: mL, or cm² on a radiograph."""
    return float(lesion.volume_ml) if lesion.volume_ml is not None else float(lesion.area_mm2 or 0.0) / 100.0


def modality_assessment(
    modality: Modality,
    size: float,
    calibration: Calibration,
    labels: tuple[str, ...] = (),
    probabilities: np.ndarray | None = None,
) -> Assessment:
    """One modality's assessment of a lesion (or of its largest, ``size`` 0 for none): detection from the
    size alone, with the class ``probabilities`` over ``labels`` when it was classified."""
    return _assessment(_sigmoid(detection_logit(modality, size, calibration)), labels, probabilities, (modality,))


def classified(
    modality: Modality,
    lesions: Sequence[Lesion],
    embeddings: np.ndarray,
    calibration: Calibration,
    labels: tuple[str, ...],
    probabilities: np.ndarray | None,
) -> list[Lesion]:
    """The lesions with their embeddings and each one's assessment: detection from its size, and its row of
    class ``probabilities`` over ``labels`` (None when the modality has no prototypes: not classified)."""
    out = []
    for i, (lesion, embedding) in enumerate(zip(lesions, embeddings, strict=True)):
        probs = probabilities[i] if probabilities is not None else None
        assessment = modality_assessment(modality, lesion_size(lesion), calibration, labels, probs)
        out.append(replace(lesion, assessment=assessment, embedding=embedding.copy()))
    return out


def largest_lesion_assessment(
    modality: Modality, lesions: Sequence[Lesion], calibration: Calibration
) -> tuple[float, Assessment]:
    """A modality's detection size, its largest lesion's (``lesions`` largest first; 0 for none), and its
    assessment: the largest lesion's when that one was classified (the same size, so the same score)."""
    size = lesion_size(lesions[0]) if lesions else 0.0
    if lesions and lesions[0].assessment is not None:
        return size, lesions[0].assessment
    return size, modality_assessment(modality, size, calibration)


def _levels(lesion: Lesion) -> set[str]:
    return {lesion.vertebral_level, *lesion.levels}


def matched_lesions(results: Mapping[Modality, ModalityResult]) -> tuple[dict[Modality, Lesion], list[Notice]]:
    """The lesion each assessed modality contributes to the fused classification (and a support case's
    embeddings), matched by vertebral level: the main lesion, the largest of the first assessed modality with
    one in ``MEASURING_ORDER`` (CT, MR, radiograph), and from each other modality its largest lesion whose
    levels overlap the main lesion's. Levels, not positions, because the modalities' frames of reference
    differ in a real study. A modality whose lesions all lie at other levels found something else (on the
    radiograph, often a misplaced lesion): it is left out, with a ``lesion_not_matched`` notice."""
    found = {m: r for m, r in results.items() if r.assessment.assessed and r.lesions}
    main = next((m for m in MEASURING_ORDER if m in found), None)
    if main is None:
        return {}, []
    anchor = found[main].lesions[0]
    matched, notices = {main: anchor}, []
    for modality, result in found.items():
        if modality is main:
            continue
        lesion = next((x for x in result.lesions if _levels(x) & _levels(anchor)), None)
        if lesion is not None:
            matched[modality] = lesion
            continue
        largest = result.lesions[0]
        notices.append(
            Notice(
                NoticeCode.LESION_NOT_MATCHED,
                f"no {modality.value} lesion lies at the level of the {main.value} lesion "
                f"({', '.join(sorted(_levels(anchor)))}); the largest is at {largest.vertebral_level}: "
                f"{modality.value} is left out of the fused classification",
                largest.series_instance_uid,
            )
        )
    return matched, notices


def matched_probabilities(matched: Mapping[Modality, Lesion]) -> dict[Modality, np.ndarray]:
    """The class probabilities of the matched lesions that were classified."""
    return {
        m: np.array([p.probability for p in lesion.assessment.probabilities])
        for m, lesion in matched.items()
        if lesion.assessment is not None and lesion.assessment.probabilities
    }


def _assessment(
    score: float, labels: tuple[str, ...], probabilities: np.ndarray | None, sources: tuple[Modality, ...]
) -> Assessment:
    assessment = Assessment(tumor_detected=score >= DETECTION_THRESHOLD, detection_score=round(score, 4))
    if probabilities is None:
        return assessment
    return replace(
        assessment,
        probabilities=tuple(ClassProbability(label, float(p)) for label, p in zip(labels, probabilities, strict=True)),
        uncertainty=round(normalised_entropy(probabilities), 4),
        classified_from=sources,
    )


def pool(per_modality: Mapping[Modality, np.ndarray], weights: Mapping[Modality, float]) -> np.ndarray:
    """Weighted log-linear pooling of class distributions: softmax(Σ w_m log p_m) over the modalities given."""
    total = sum(weights[m] * np.log(np.clip(p, 1e-9, 1.0)) for m, p in per_modality.items())
    total = total - np.max(total)
    fused = np.exp(total)
    return fused / fused.sum()


def assess(
    sizes: Mapping[Modality, float],
    probabilities: Mapping[Modality, np.ndarray],
    labels: tuple[str, ...],
    calibration: Calibration,
) -> Assessment:
    """One assessment from the modalities present: ``sizes`` holds each analysed modality's largest lesion
    size (0 for none found), ``probabilities`` the class distributions of the modalities that found one. The class
    probabilities are pooled, unless the calibration chose a single modality (``classification_order``): then
    they are the first of its order that ``probabilities`` holds (pooled when none is)."""
    if not sizes:
        raise ValueError("no modality to fuse")
    logit = sum(calibration.detection_weights[m] * detection_logit(m, s, calibration) for m, s in sizes.items())
    if not probabilities:
        return _assessment(_sigmoid(logit), labels, None, ())
    single = next((m for m in calibration.classification_order if m in probabilities), None)
    if single is not None:
        return _assessment(_sigmoid(logit), labels, probabilities[single], (single,))
    fused = pool(probabilities, calibration.classification_weights)
    return _assessment(_sigmoid(logit), labels, fused, tuple(m for m in Modality if m in probabilities))


def study_assessment(
    sizes: Mapping[Modality, float],
    probabilities: Mapping[Modality, np.ndarray],
    labels: tuple[str, ...],
    calibration: Calibration,
    results: Mapping[Modality, ModalityResult],
) -> Assessment:
    """The study's fused assessment (``assess``) of the modalities assessed; when none was, a not-assessable
    one saying why each of the study's modality ``results`` was not."""
    if not sizes:
        return Assessment.not_assessable((no_assessable_modality(results),))
    return assess(sizes, probabilities, labels, calibration)
