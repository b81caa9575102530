"""The lesion embedding fine-tuned on a site's cohort (``cspine train --cohort DIR --models lesion_embed``).

Each tumor study's lesion is cut as the service cuts a lesion's ROIs (``imaging.roi.lesion_roi``, per modality on
the volumes series selection chooses), about the centre of the site's own label: the largest connected tumor
segment of the labelled series, or, where the site gave only boxes, the centre of its largest box. The study's
pathology class comes from the manifest. ROIs are cached per study by its content, as the segmentation arrays are.

Fine-tuning (``modeling.train.finetune_embed``) starts from the served ``lesion_embed`` (BatchNorms frozen), keeps
the convolutional trunk and trains the last block and the projection on class episodes of the train studies (one
modality per episode), with the served ``proto_classify``'s scale: the classifier and the service are unchanged.

The held-out figures are few-shot accuracy on the held-out studies' lesions (validation and test), with the train
studies' lesions as the site's support cases: k cases per class drawn from them (many draws) or all of them make
each class's prototype; served and fine-tuned embedding on the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cspine.analysis.lesions import measure_lesions
from cspine.cohort.check import CohortReport, StudyReport, image_files, labelled_study
from cspine.cohort.training import study_digest
from cspine.config import IngestLimits
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality
from cspine.imaging.roi import lesion_roi
from cspine.inference.specs import MODALITY_ORDER, ROI_CHANNELS, ROI_SIZE, SEG_LABELS
from cspine.modeling.data import SEG_ROLES

CLASSES = ("benign", "borderline", "malignant")  # the manifest's tumor classes, in the classifier's order
HELD_OUT_SHOTS = (1, 5)
HELD_OUT_DRAWS = 200


@dataclass
class CohortLesions:
    """One lesion per tumor study: ``rois`` [N, modalities, 3, 64, 64] (NaN where the study has no labelled
    lesion of that modality) and its class index in ``CLASSES``."""

    rois: np.ndarray
    classes: np.ndarray

    def present(self, m: int) -> np.ndarray:
        return ~np.isnan(self.rois[:, m]).any(axis=(1, 2, 3))

    def counts(self) -> dict[str, dict[str, int]]:
        """Lesions per modality and class."""
        return {
            modality.value: {c: int((self.present(m) & (self.classes == i)).sum()) for i, c in enumerate(CLASSES)}
            for m, modality in enumerate(MODALITY_ORDER)
        }


def study_rois(folder: Path, report: StudyReport, limits: IngestLimits = IngestLimits()) -> np.ndarray:
    """A checked study's lesion ROIs [modalities, 3, 64, 64] about the centre of its labelled lesion per modality
    (module docstring); NaN for a modality without one."""
    study = ingest_paths(image_files(folder), limits)
    chosen = select_series(study).chosen
    role_of = {series.series_instance_uid: role for role, series in chosen.items()}
    centres: dict[Modality, np.ndarray] = {}
    for lab in report.labels:
        role = role_of.get(lab.series_instance_uid)
        if role is None or lab.labels is None or role.modality in centres:
            continue
        volume = chosen[role].volume
        assert volume is not None  # series selection chooses series with a volume
        tumor = lab.labels == SEG_LABELS[lab.modality].index("tumor")
        lesions = measure_lesions(tumor, volume, None, lab.series_instance_uid) if tumor.any() else []
        if lesions:
            centres[role.modality] = np.array(lesions[0].centre_mm)
    sized = []
    for box in report.boxes:
        role = role_of.get(box.series_instance_uid)
        if role is not None and role.modality not in centres:
            sized.append((int(np.prod(np.array(box.last) - np.array(box.first) + 1)), role, box))
    for _, role, box in sorted(sized, key=lambda s: -s[0]):
        if role.modality not in centres:
            volume = chosen[role].volume
            assert volume is not None
            middle = (np.array(box.first, dtype=float) + np.array(box.last, dtype=float)) / 2.0
            centres[role.modality] = volume.index_to_patient(middle)[0]
    rois = np.full((len(MODALITY_ORDER), ROI_CHANNELS, ROI_SIZE, ROI_SIZE), np.nan, dtype=np.float32)
    for modality, centre in centres.items():
        volumes = {}
        for role in SEG_ROLES[modality]:
            volume = chosen[role].volume if role in chosen else None
            if volume is not None:
                volumes[role] = volume
        rois[MODALITY_ORDER.index(modality)] = lesion_roi(modality, volumes, centre)
    return rois


def cohort_lesions(
    report: CohortReport,
    splits: tuple[str, ...],
    cache: Path,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
) -> CohortLesions:
    """The lesions of the cohort's tumor studies in ``splits`` (cut when not cached)."""
    cache.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in report.studies if s.row is not None and s.row.split in splits and s.row.tumor_class in CLASSES]
    rois, classes = [], []
    for study in tqdm(chosen, desc="cohort lesions", unit="study", disable=not progress):
        assert study.row is not None
        folder = report.folder / study.name
        path = cache / f"{study.name}-{study_digest(folder, report.folder)}-lesion.npz"
        if not path.exists():
            partial = path.with_suffix(".partial.npz")
            np.savez_compressed(partial, rois=study_rois(folder, labelled_study(report, study, limits), limits))
            partial.rename(path)
        with np.load(path) as npz:
            rois.append(npz["rois"])
        classes.append(CLASSES.index(study.row.tumor_class))
    shape = (0, len(MODALITY_ORDER), ROI_CHANNELS, ROI_SIZE, ROI_SIZE)
    return CohortLesions(np.stack(rois) if rois else np.zeros(shape, np.float32), np.array(classes, dtype=int))


def embed_all(lesions: CohortLesions, embed) -> np.ndarray:
    """[N, modalities, D] embeddings of every ROI by ``embed`` (rois, one-hot → embeddings); NaN where absent."""
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    out = None
    for m in range(len(MODALITY_ORDER)):
        present = lesions.present(m)
        if not present.any():
            continue
        found = embed(lesions.rois[present, m].astype(np.float32), np.tile(onehots[m], (int(present.sum()), 1)))
        if out is None:
            out = np.full((len(lesions.classes), len(MODALITY_ORDER), found.shape[1]), np.nan, dtype=np.float32)
        out[present, m] = found
    return out if out is not None else np.zeros((len(lesions.classes), len(MODALITY_ORDER), 0), np.float32)


def few_shot_figures(
    support: np.ndarray,
    support_classes: np.ndarray,
    queries: np.ndarray,
    query_classes: np.ndarray,
    scale: float,
    shots: tuple[int, ...] = HELD_OUT_SHOTS,
    draws: int = HELD_OUT_DRAWS,
    seed: int = 0,
) -> dict:
    """Per modality, the queries' accuracy and balanced accuracy with prototypes made of k support cases per class
    (the mean over ``draws`` draws), and of all of them (``"all"``); NaN rows are cases without that modality.
    The classes are those with support cases of the modality; queries of other classes are left out."""
    from cspine.fewshot.adapt import balanced_accuracy, softmax_probabilities

    out: dict[str, dict] = {}
    for m, modality in enumerate(MODALITY_ORDER):
        have_s = ~np.isnan(support[:, m]).any(axis=1) if support.size else np.zeros(len(support), bool)
        have_q = ~np.isnan(queries[:, m]).any(axis=1) if queries.size else np.zeros(len(queries), bool)
        kinds = sorted({int(c) for c in support_classes[have_s]})
        members = [np.nonzero(have_s & (support_classes == c))[0] for c in kinds]
        have_q &= np.isin(query_classes, kinds)
        q, truth = queries[have_q, m], np.searchsorted(kinds, query_classes[have_q])
        if len(kinds) < 2 or not len(q):
            continue
        figures: dict[str, object] = {"queries": int(len(q)), "classes": [CLASSES[c] for c in kinds]}

        def score(prototypes: np.ndarray, q: np.ndarray = q, truth: np.ndarray = truth) -> tuple[float, float]:
            predicted = softmax_probabilities(q, prototypes, scale).argmax(1)
            return float((predicted == truth).mean()), balanced_accuracy(predicted, truth, int(truth.max()) + 1)

        for k in shots:
            if min(len(x) for x in members) < k:
                continue
            rng = np.random.default_rng([seed, k, m])
            scores = [
                score(np.stack([support[rng.choice(x, size=k, replace=False), m].mean(0) for x in members]))
                for _ in range(draws)
            ]
            figures[str(k)] = {
                "accuracy": round(float(np.mean([s[0] for s in scores])), 4),
                "balanced_accuracy": round(float(np.mean([s[1] for s in scores])), 4),
            }
        accuracy, balanced = score(np.stack([support[x, m].mean(0) for x in members]))
        figures["all"] = {"accuracy": round(accuracy, 4), "balanced_accuracy": round(balanced, 4)}
        out[modality.value] = figures
    return out
