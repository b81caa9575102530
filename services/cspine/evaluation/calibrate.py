"""``cspine calibrate``: what the pipeline ships beside the models, measured on SYNTHETIC phantom data
disjoint from training and evaluation.

1. The default support set: SYNTHETIC studies of every subtype run through the pipeline, their ROIs cut about
   the lesions the service finds and matches (evaluation/service_cut.py), embedded with the shipped
   ``lesion_embed`` (``fewshot/data/default_support.npz``). The evaluations on ground-truth ROIs use a set cut
   the way they cut their queries, about the true lesion centres (``modeling.data.ground_truth_support``).
2. Fusion reliability (``model_repository/calibration.json``): the pipeline runs on a calibration cohort
   with equal weights; each modality's detection curve is a logistic fit of tumor presence on its largest
   lesion's size, and the modality weights of detection and classification are fitted (non-negative,
   by maximum likelihood) on the per-modality answers: for classification, those of the lesions matched
   across modalities (``analysis.fusion.matched_lesions``), pooled as the service pools them, whichever
   modalities a study has. The classification weights' 95 % intervals come from refitting on bootstrap
   resamples of the studies.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from cspine.analysis.fusion import Calibration, DetectionCurve, pool
from cspine.domain import MEASURING_ORDER, Modality
from cspine.fewshot.prototypes import SupportSet
from cspine.inference.specs import MODALITY_ORDER
from cspine.modeling.data import CLASSES, SUPPORT_SEED, embed_bank
from cspine.phantom.tumors import TumorSubtype

logger = logging.getLogger(__name__)

L2 = 1e-2  # a little ridge: with few cases the curves would otherwise grow without bound
WEIGHT_RESAMPLES = 200  # bootstrap refits behind the classification weights' intervals


def build_default_support(
    cache: Path, embed_model: Path, per_subtype: int = 12, workers: int = 1, triton_url: str | None = None
) -> SupportSet:
    """The shipped SYNTHETIC support set, cut the way the service cuts: ``per_subtype`` phantom studies of each
    subtype through the pipeline (evaluation/service_cut.py), each kept as AddCase would keep it (a tumor detected;
    per modality the embedding of the lesion matched to the main one, none where there is none)."""
    from cspine.evaluation.service_cut import service_cut_bank  # the pipeline and Triton: only this path needs them

    bank = service_cut_bank(cache, SUPPORT_SEED, list(TumorSubtype), per_subtype, workers, triton_url=triton_url)
    usable = bank.usable()
    return SupportSet(embed_bank(usable, embed_model), tuple(CLASSES[c] for c in usable.classes), synthetic=True)


def _fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    def loss(params: np.ndarray) -> float:
        z = params[0] + params[1] * x
        return float(np.mean(np.logaddexp(0.0, z) - y * z) + L2 * params[1] ** 2)

    result = minimize(loss, np.array([0.0, 1.0]), method="L-BFGS-B")
    return float(result.x[0]), float(result.x[1])


def _fit_weights(logits: dict[Modality, np.ndarray], target, nll) -> dict[Modality, float]:
    """Non-negative weights of each modality's evidence that minimise the pooled negative log-likelihood."""
    modalities = list(logits)

    def loss(w: np.ndarray) -> float:
        return nll({m: w[i] for i, m in enumerate(modalities)}) + L2 * float(np.sum((w - 1.0) ** 2))

    result = minimize(loss, np.ones(len(modalities)), bounds=[(0.0, 5.0)] * len(modalities), method="L-BFGS-B")
    return {m: round(float(result.x[i]), 4) for i, m in enumerate(modalities)}


def fit_calibration(records: list[dict], embed_model: Path, fitted_on: str) -> Calibration:
    """Fit detection curves and modality weights on pipeline records (see evaluation.cohort.case_record)."""
    detection: dict[Modality, DetectionCurve] = {}
    det_logits: dict[Modality, np.ndarray] = {}
    y = np.array([r["truth"]["tumor"] for r in records], dtype=float)
    for modality in MODALITY_ORDER:
        key = modality.value
        sizes = np.array([r["modalities"][key]["size"] for r in records])
        intercept, slope = _fit_logistic(np.log1p(sizes), y)
        detection[modality] = DetectionCurve(round(intercept, 4), round(slope, 4))
        det_logits[modality] = intercept + slope * np.log1p(sizes)

    def detection_nll(w: dict[Modality, float]) -> float:
        z = sum(w[m] * det_logits[m] for m in det_logits)
        return float(np.mean(np.logaddexp(0.0, z) - y * z))

    detection_weights = _fit_weights(det_logits, y, detection_nll)

    # classification: the studies with a tumor and a classified main lesion, each modality's matched lesion
    classified = [r for r in records if r["truth"]["tumor"] and any(_class_evidence(r, m) for m in MODALITY_ORDER)]
    classification_weights = {m: 1.0 for m in MODALITY_ORDER}
    intervals: dict[Modality, tuple[float, float]] = {}
    if classified:
        classification_weights = _fit_classification(classified)
        rng = np.random.default_rng(0)
        refits = [
            _fit_classification([classified[i] for i in rng.integers(len(classified), size=len(classified))])
            for _ in range(WEIGHT_RESAMPLES)
        ]
        for m in MODALITY_ORDER:
            low, high = np.percentile([w[m] for w in refits], [2.5, 97.5])
            intervals[m] = (round(float(low), 4), round(float(high), 4))
    lesions = {m: sum(bool(_class_evidence(r, m)) for r in classified) for m in MODALITY_ORDER}
    order, choice = choose_classification(records, classification_weights)
    return Calibration(
        detection=detection,
        detection_weights=detection_weights,
        classification_weights=classification_weights,
        fitted_on=f"{fitted_on}; {len(records)} studies",
        classification_fitted_on=f"{fitted_on}; the {len(classified)} studies with a tumor and a classified main "
        "lesion; matched lesions: " + ", ".join(f"{m.value} {n}" for m, n in lesions.items()),
        embed_model_sha256=hashlib.sha256(embed_model.read_bytes()).hexdigest(),
        classification_weights_ci95=intervals,
        classification_order=order,
        classification_choice={**choice, "fitted_on": fitted_on} if choice else {},
    )


def choose_classification(records: list[dict], weights: dict[Modality, float]) -> tuple[tuple[Modality, ...], dict]:
    """Pooling or one modality, on the tumor studies of ``records`` with a classified matched lesion: the class
    accuracy of the matched lesions pooled with ``weights``; of each modality alone, on the studies it classified;
    and of the single-modality rule (each study classified by the first modality of an order that it has), on the
    same studies as pooling, for the order that classifies most of them right. Returns that order when the rule
    beats pooling beyond doubt, the 95 % bootstrap interval of its gain lying above 0 (else empty: pool), and the
    figures. A gain the interval does not establish is not taken: the weights and choices fitted on the default
    site's SYNTHETIC studies did not carry to the phantom's other sites (docs/pipeline.md)."""
    classified = [r for r in records if r["truth"]["tumor"] and any(_class_evidence(r, m) for m in MODALITY_ORDER)]
    if not classified:
        return (), {}
    truth = np.array([CLASSES.index(r["truth"]["class"]) for r in classified])
    evidence = [{m: np.array(p) for m in MODALITY_ORDER if (p := _class_evidence(r, m))} for r in classified]
    pooled = np.array([int(np.argmax(pool(e, weights))) for e in evidence]) == truth
    alone = {}
    for m in MODALITY_ORDER:
        rows = [i for i, e in enumerate(evidence) if m in e]
        if rows:
            alone[m] = (float(np.mean([np.argmax(evidence[i][m]) == truth[i] for i in rows])), len(rows))

    def rule(order: tuple[Modality, ...]) -> np.ndarray:
        return np.array([int(np.argmax(e[next(m for m in order if m in e)])) for e in evidence]) == truth

    # every order of the modalities, judged on the same studies; among equals, the first in MEASURING_ORDER's
    order = max(itertools.permutations(m for m in MEASURING_ORDER if m in alone), key=lambda o: rule(o).sum())
    single = rule(order)
    rng = np.random.default_rng(0)
    picks = rng.integers(len(truth), size=(1000, len(truth)))
    gain = np.percentile(single[picks].mean(axis=1) - pooled[picks].mean(axis=1), [2.5, 97.5])
    choice = {
        "studies": len(classified),
        "pooled_accuracy": round(float(pooled.mean()), 4),
        "single_accuracy": round(float(single.mean()), 4),
        "single_gain_ci95": [round(float(g), 4) for g in gain],
        "alone": {m.value: {"accuracy": round(a, 4), "studies": n} for m, (a, n) in alone.items()},
        "order": [m.value for m in order],
        # one modality only where its gain over pooling is clear: the lower end of its interval above 0
        "chosen": "single" if gain[0] > 0 else "pooled",
    }
    return (order if choice["chosen"] == "single" else ()), choice


def _class_evidence(record: dict, modality: Modality) -> list[float] | None:
    """The class probabilities of the modality's lesion matched to the main one (None: none matched)."""
    return record["modalities"][modality.value]["probabilities"]


def _fit_classification(records: list[dict]) -> dict[Modality, float]:
    """Classification weights maximising the likelihood of the true classes under log-linear pooling of the
    matched lesions each study has (a modality without one adds nothing to that study's sum)."""
    truth = np.array([CLASSES.index(r["truth"]["class"]) for r in records])
    log_p = {
        m: np.array([np.log(np.clip(_class_evidence(r, m) or [1.0] * len(CLASSES), 1e-9, 1)) for r in records])
        for m in MODALITY_ORDER
    }

    def class_nll(w: dict[Modality, float]) -> float:
        z = np.sum([w[m] * log_p[m] for m in log_p], axis=0)
        z = z - z.max(axis=1, keepdims=True)
        log_norm = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-np.mean(log_norm[np.arange(len(truth)), truth]))

    return _fit_weights(log_p, truth, class_nll)
