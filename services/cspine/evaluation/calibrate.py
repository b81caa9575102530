"""``cspine calibrate``: what the pipeline ships beside the models, measured on SYNTHETIC phantom data
disjoint from training and evaluation.

1. The default support set: lesions of every subtype from the phantom's lesion bank, embedded with the
   shipped ``lesion_embed`` (``fewshot/data/default_support.npz``).
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
import logging
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from cspine.analysis.fusion import Calibration, DetectionCurve
from cspine.domain import Modality
from cspine.fewshot.prototypes import SupportSet
from cspine.inference.runner import onnx_session
from cspine.inference.specs import MODALITY_ORDER
from cspine.modeling.data import CLASSES, lesion_bank
from cspine.phantom.tumors import TumorSubtype

logger = logging.getLogger(__name__)

SUPPORT_SEED = 9200
L2 = 1e-2  # a little ridge: with few cases the curves would otherwise grow without bound
WEIGHT_RESAMPLES = 200  # bootstrap refits behind the classification weights' intervals


def build_default_support(cache: Path, embed_model: Path, per_subtype: int = 12, workers: int = 1) -> SupportSet:
    """The shipped SYNTHETIC support set: ``per_subtype`` lesions of each subtype, every modality embedded."""
    bank = lesion_bank(cache, SUPPORT_SEED, list(TumorSubtype), per_subtype, workers=workers)
    session = onnx_session(embed_model)
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    embeddings = np.zeros((len(bank), len(MODALITY_ORDER), 64), dtype=np.float32)
    for m in range(len(MODALITY_ORDER)):
        for i in range(0, len(bank), 32):
            rois = bank.rois[i : i + 32, m].astype(np.float32)
            embeddings[i : i + len(rois), m] = session.run(
                None, {"roi": rois, "modality": np.tile(onehots[m], (len(rois), 1))}
            )[0]
    return SupportSet(embeddings, tuple(CLASSES[c] for c in bank.classes), synthetic=True)


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
    return Calibration(
        detection=detection,
        detection_weights=detection_weights,
        classification_weights=classification_weights,
        fitted_on=f"{fitted_on}; {len(records)} studies",
        classification_fitted_on=f"{fitted_on}; the {len(classified)} studies with a tumor and a classified main "
        "lesion; matched lesions: " + ", ".join(f"{m.value} {n}" for m, n in lesions.items()),
        embed_model_sha256=hashlib.sha256(embed_model.read_bytes()).hexdigest(),
        classification_weights_ci95=intervals,
    )


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
