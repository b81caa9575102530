"""Lesion ROIs cut the way the service cuts them.

``lesion_bank`` (modeling/data.py) renders a window about each SYNTHETIC lesion and cuts its ROIs about the true
lesion's centre. The service cuts them about the lesions its segmentation models find, with their errors of place
and extent, and per modality keeps the lesion matched to the main one by level (``analysis.fusion.matched_lesions``).
This bank does what the service does: SYNTHETIC phantom studies of one subtype each are ingested from their DICOM
files and analysed by the pipeline on a local Triton (the shipped models, competence reference and default
support), and each modality's ROI is cut about its matched lesion as ``lesion_classify``'s inputs are
(``analysis.lesions.classify_inputs``). A modality without a matched lesion is NaN. Each study also records
whether the pipeline detected a tumor (AddCase refuses a case without one) and whether the main lesion lies at
a level of the true tumor (otherwise it is a false lesion carrying the study's label, as a site case would).

Banks are cached per seed, subtype and size, keyed by the segmentation models they were cut with.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cspine.analysis.competence import CompetenceReference, input_verdicts
from cspine.analysis.fusion import Calibration, matched_lesions
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Study, StudyAnalysis
from cspine.evaluation.cohort import ensure_cohort
from cspine.fewshot.prototypes import default_prototypes
from cspine.imaging.roi import lesion_roi
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository
from cspine.inference.model_config import model_versions, served_model_file
from cspine.inference.specs import MODALITY_ORDER, ROI_CHANNELS, ROI_SIZE
from cspine.modeling.data import CLASSES, LesionBank
from cspine.phantom.generate import PhantomOptions
from cspine.phantom.tumors import SUBTYPES, TumorSubtype
from cspine.pipeline import AnalysisOptions, analyze

SEG_MODELS = ("seg_ct", "seg_mr", "seg_xr")


@dataclass
class ServiceCutBank:
    """``bank`` as LesionBank (rois [N, modalities, 3, 64, 64], NaN where a modality has no matched lesion), and
    per study whether a tumor was detected and whether the main lesion lies at a level of the true tumor."""

    bank: LesionBank
    detected: np.ndarray
    at_true_level: np.ndarray

    def usable(self, true_level_only: bool = False) -> LesionBank:
        """The studies AddCase would accept (a tumor detected, a matched lesion), optionally only those whose main
        lesion is the true tumor."""
        keep = self.detected & ~np.isnan(self.bank.rois).all(axis=(1, 2, 3, 4))
        if true_level_only:
            keep &= self.at_true_level
        return LesionBank(self.bank.rois[keep], self.bank.subtypes[keep], self.bank.classes[keep])


def models_key(repository: Path) -> str:
    """A short digest of the segmentation models the ROIs' lesions were found with."""
    digest = hashlib.sha256()
    for model in SEG_MODELS:
        digest.update(served_model_file(repository, model).read_bytes())
    return digest.hexdigest()[:12]


def matched_rois(study: Study, analysis: StudyAnalysis) -> np.ndarray:
    """The study's ROIs [modalities, 3, 64, 64] about the lesions ``analysis`` matched across modalities, cut from
    the volumes the pipeline analysed; NaN for a modality without a matched lesion."""
    rois = np.full((len(MODALITY_ORDER), ROI_CHANNELS, ROI_SIZE, ROI_SIZE), np.nan, dtype=np.float32)
    matched, _ = matched_lesions({result.modality: result for result in analysis.modalities})
    verdicts = input_verdicts(study, select_series(study))
    for modality, lesion in matched.items():
        volumes = verdicts[modality].volumes()
        rois[MODALITY_ORDER.index(modality)] = lesion_roi(modality, volumes, np.array(lesion.centre_mm))
    return rois


def _at_true_level(case_dir: Path, analysis: StudyAnalysis) -> bool:
    """Whether the main lesion lies at a level of the case's true tumor (truth.json)."""
    truth = json.loads((case_dir / "truth.json").read_text())["tumor"]
    main = analysis.primary_lesion()
    return bool(truth and main and {main.vertebral_level, *main.levels} & set(truth["levels"]))


async def _cut(cases: list[Path], url: str, repository: Path, progress: bool, what: str) -> list:
    prototypes, calibration = default_prototypes(), Calibration.load(repository)
    competence, models = CompetenceReference.load(repository), model_versions(repository)
    out = []
    async with TritonClient(url) as client:
        await client.check_ready()
        for case_dir in tqdm(cases, desc=f"cut {what}", unit="study", disable=not progress):
            study = await asyncio.to_thread(ingest_paths, [case_dir / f for f in ("ct", "mr", "xr")])
            analysis = await analyze(study, client, prototypes, calibration, AnalysisOptions(), models, competence)
            rois = matched_rois(study, analysis)
            out.append((rois, bool(analysis.fused.tumor_detected), _at_true_level(case_dir, analysis)))
    return out


def service_cut_bank(
    cache: Path,
    seed: int,
    subtypes: Iterable[TumorSubtype],
    per_subtype: int,
    workers: int = 1,
    progress: bool = True,
    triton_url: str | None = None,
) -> ServiceCutBank:
    """``per_subtype`` SYNTHETIC studies of each subtype (phantom seed ``seed`` × 100 + the subtype's index), run
    through the pipeline with the shipped models, and their ROIs cut about the matched lesions."""
    repository = default_repository()
    root = cache / "service-cut"
    folder = root / f"seed{seed}-models-{models_key(repository)}"
    folder.mkdir(parents=True, exist_ok=True)
    all_subtypes = list(TumorSubtype)
    parts = []
    with ExitStack() as stack:
        url = triton_url
        for subtype in subtypes:
            path = folder / f"{subtype.value}-{per_subtype}.npz"
            if not path.exists():
                code = all_subtypes.index(subtype)
                cohort = root / "cohorts" / f"seed{seed}" / f"{subtype.value}-{per_subtype}"
                options = PhantomOptions(tumor=subtype.value)
                cases = ensure_cohort(cohort, per_subtype, seed * 100 + code, workers, progress, options)
                if url is None:
                    url = stack.enter_context(LocalTriton(repository, TritonPorts.free())).grpc_url
                cut = asyncio.run(_cut(cases, url, repository, progress, subtype.value))
                partial = path.with_suffix(".partial.npz")
                np.savez_compressed(
                    partial,
                    rois=np.stack([c[0] for c in cut]).astype(np.float16),
                    detected=np.array([c[1] for c in cut]),
                    at_true_level=np.array([c[2] for c in cut]),
                )
                partial.rename(path)
            with np.load(path) as npz:
                parts.append((subtype, npz["rois"].astype(np.float32), npz["detected"], npz["at_true_level"]))
    rois = np.concatenate([p[1] for p in parts])
    subs = np.concatenate([np.full(len(p[1]), all_subtypes.index(p[0])) for p in parts])
    classes = np.concatenate([np.full(len(p[1]), CLASSES.index(SUBTYPES[p[0]].tumor_class.value)) for p in parts])
    bank = LesionBank(rois, subs, classes)
    return ServiceCutBank(bank, np.concatenate([p[2] for p in parts]), np.concatenate([p[3] for p in parts]))


def episode_accuracy(
    bank: LesionBank,
    embed: Callable[[np.ndarray, np.ndarray], np.ndarray],
    classify: Callable[[np.ndarray, np.ndarray], np.ndarray],
    shots: Iterable[int] = (1, 5),
    episodes: int = 300,
    seed: int = 0,
) -> dict:
    """Prototype-classifier accuracy on ``bank``'s lesions, per modality and k: in each episode k lesions per class
    (of those with an ROI of the modality) make the prototypes and every other one is a query. Mean accuracy and
    balanced accuracy over the episodes, and the lesions per class the episodes drew from (episodes share
    lesions: the spread over episodes is not a confidence interval)."""
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    out: dict[str, dict] = {}
    for m, modality in enumerate(MODALITY_ORDER):
        present = ~np.isnan(bank.rois[:, m]).any(axis=(1, 2, 3))
        embeddings = np.zeros((len(bank), 0), dtype=np.float32)
        if present.any():
            found = embed(bank.rois[present, m].astype(np.float32), np.tile(onehots[m], (int(present.sum()), 1)))
            embeddings = np.zeros((len(bank), found.shape[1]), dtype=np.float32)
            embeddings[present] = found
        members = [np.nonzero(present & (bank.classes == c))[0] for c in range(len(CLASSES))]
        figures: dict[str, object] = {"lesions_per_class": dict(zip(CLASSES, (len(x) for x in members), strict=True))}
        for k in shots:
            if min(len(x) for x in members) <= k:
                continue  # a class without a query left
            accuracy, balanced = [], []
            for episode in range(episodes):
                rng = np.random.default_rng([seed, k, episode, m])
                drawn = [rng.permutation(x) for x in members]
                prototypes = np.stack([embeddings[d[:k]].mean(0) for d in drawn])
                queries = np.concatenate([d[k:] for d in drawn])
                truth = np.concatenate([np.full(len(d) - k, c) for c, d in enumerate(drawn)])
                predicted = classify(embeddings[queries], prototypes).argmax(1)
                accuracy.append(float((predicted == truth).mean()))
                balanced.append(float(np.mean([(predicted[truth == c] == c).mean() for c in range(len(CLASSES))])))
            figures[str(k)] = {
                "accuracy": round(float(np.mean(accuracy)), 4),
                "balanced_accuracy": round(float(np.mean(balanced)), 4),
            }
        out[modality.value] = figures
    return out
