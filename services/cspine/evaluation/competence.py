"""The competence reference and its evaluation (docs/competence.md).

``fit_competence`` (``cspine calibrate --competence-only``): the segmentation models' pooled encoder
features of every slice of a SYNTHETIC reference cohort (the phantom the models were trained on, with seeds
disjoint from training and evaluation), per modality; their mean and whitening matrix; and the threshold
on the out-of-distribution score, calibrated by 5-fold cross-validation over studies: each study is scored
against a reference fitted without it, and the threshold is the ``pass_rate`` quantile of a log-normal
fitted to those held-out scores.

``evaluate_competence`` (``cspine evaluate competence``): the full pipeline on the local Triton over three
corpora — held-out in-domain SYNTHETIC studies, REAL out-of-domain DICOM files from public packages, and
SYNTHETIC out-of-domain studies — giving the in-domain pass rate, the out-of-domain catch rate per layer,
and the ROC AUC of the OOD score.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cspine.analysis.competence import (
    CompetenceReference,
    FeatureReference,
    input_verdicts,
    lognormal_threshold,
    model_sha256,
    whitening,
)
from cspine.analysis.fusion import Calibration
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import CompetenceLayer, Disclosure, Modality, StudyAnalysis, Volume
from cspine.evaluation.cohort import CohortRun, ensure_cohort, evaluate, metrics
from cspine.fewshot.prototypes import default_prototypes
from cspine.imaging.seg_input import seg_inputs
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository
from cspine.inference.model_config import model_versions, served_model_file
from cspine.inference.runner import OnnxRunner
from cspine.inference.specs import FEATURES_TENSOR, IMAGE_TENSOR, MODALITY_ORDER, seg_spec
from cspine.pipeline import AnalysisOptions, analyze

logger = logging.getLogger(__name__)

REFERENCE_SEED = 9500  # disjoint from training (1…), model evaluation (9001, 9002), support (9200), 9300, 9400
REFERENCE_CASES = 30
PASS_RATE = 0.9999  # per modality, on in-domain studies
FOLDS = 5
SYNTHETIC_OOD_SEED = 9700
DISCLOSURE = Disclosure(
    trained_on="SYNTHETIC cervical spine phantom data only (cspine phantom; no patient images)",
    intended_use="Research and engineering use only; not for clinical use or diagnosis.",
)


def seg_runners(repository: Path) -> dict[Modality, OnnxRunner]:
    return {m: OnnxRunner(seg_spec(m), served_model_file(repository, seg_spec(m).name), 2) for m in MODALITY_ORDER}


def series_features(modality: Modality, volume: Volume, runner: OnnxRunner) -> np.ndarray:
    """The pooled encoder features (slices × D) of a volume, preprocessed as the pipeline does."""
    inputs, _ = seg_inputs(modality, volume)
    return np.concatenate(
        [runner.run({IMAGE_TENSOR: inputs[i : i + 32]})[FEATURES_TENSOR] for i in range(0, len(inputs), 32)]
    )


def study_features(paths: list[Path], runners: dict[Modality, OnnxRunner]) -> dict[Modality, np.ndarray]:
    """Per modality, the features of the series the pipeline would score, of the study in ``paths``."""
    study = ingest_paths(paths)
    selection = select_series(study)
    out = {}
    for modality, verdict in input_verdicts(study, selection).items():
        if verdict.assessable:
            volume = selection.chosen[verdict.roles[0]].volume
            assert volume is not None  # only image series are chosen
            out[modality] = series_features(modality, volume, runners[modality])
    return out


def every_series_score(studies, competence: CompetenceReference, runners) -> dict[str, list[float]]:
    """The OOD score of every image series of the studies, whether or not an input check stopped it before
    the models: how well the score alone separates them."""
    out: dict[str, list[float]] = {m.value: [] for m in MODALITY_ORDER}
    for study in studies:
        for series in ingest_paths(list(study.files)).image_series():
            modality, volume = series.modality, series.volume
            if modality is None or volume is None:
                continue
            ood = competence.ood(modality, series_features(modality, volume, runners[modality]))
            if ood is not None:  # None: no reference for the modality
                out[modality.value].append(ood.score)
    return out


def fit_competence(
    repository: Path, cohort: Path, cases: int = REFERENCE_CASES, seed: int = REFERENCE_SEED, workers: int = 1
) -> CompetenceReference:
    """Fit the feature references and thresholds on a SYNTHETIC reference cohort (generated when absent)."""
    folders = ensure_cohort(cohort, cases, seed, workers, progress=True)
    studies = [[p for p in sorted(folder.iterdir()) if p.is_dir()] for folder in folders]
    sha256 = {m: model_sha256(repository, m) for m in MODALITY_ORDER}
    return fit_references(studies, seg_runners(repository), f"SYNTHETIC phantom cohort seed {seed}", sha256, DISCLOSURE)


def fit_references(
    studies: list[list[Path]],
    runners: dict[Modality, OnnxRunner],
    source: str,
    sha256: dict[Modality, str],
    disclosure: Disclosure,
    progress: bool = True,
) -> CompetenceReference:
    """Fit the feature references and thresholds on in-domain studies (each given as its files or folders): per
    modality, the whitening of every slice's features, and a threshold at ``PASS_RATE`` of the scores of studies
    held out of ``FOLDS`` folds."""
    per_study: dict[Modality, list[np.ndarray]] = {m: [] for m in MODALITY_ORDER}
    for paths in tqdm(studies, desc="features", unit="study", disable=not progress):
        for modality, features in study_features(paths, runners).items():
            per_study[modality].append(features.astype(np.float64))
    references = {}
    for modality, features_per_study in per_study.items():
        if len(features_per_study) < FOLDS:
            logger.warning("%s: %d studies, too few for a reference", modality.value, len(features_per_study))
            continue
        held_out = []
        for fold in range(FOLDS):
            train = np.concatenate([f for i, f in enumerate(features_per_study) if i % FOLDS != fold])
            mean, whiten = whitening(train)
            reference = FeatureReference(mean, whiten, 0.0, PASS_RATE, "")
            held_out += [reference.score(f) for i, f in enumerate(features_per_study) if i % FOLDS == fold]
        mean, whiten = whitening(np.concatenate(features_per_study))
        threshold = lognormal_threshold(held_out, PASS_RATE)
        fitted_on = (
            f"{source}: {len(features_per_study)} studies, "
            f"{sum(len(f) for f in features_per_study)} slices; held-out scores median {np.median(held_out):.3f}, "
            f"max {max(held_out):.3f}"
        )
        references[modality] = FeatureReference(mean, whiten, round(threshold, 4), PASS_RATE, fitted_on)
        logger.info("%s: threshold %.3f (%s)", modality.value, threshold, fitted_on)
    return CompetenceReference(disclosure, references, {m: sha256[m] for m in references})


# -- evaluation ------------------------------------------------------------------------------------------


def _caught_by(analysis: StudyAnalysis) -> dict:
    """What the study got: a tumor call or not, and the layers whose reasons stopped each modality."""
    layers = sorted({r.code.layer.value for m in analysis.modalities for r in m.assessment.reasons})
    return {
        "tumor_call": analysis.fused.assessed,
        "tumor_detected": analysis.fused.tumor_detected,
        "reasons": {m.modality.value: [r.code.value for r in m.assessment.reasons] for m in analysis.modalities},
        "fused_reasons": [r.code.value for r in analysis.fused.reasons],
        "layers": layers,
        "ood_scores": {m.modality.value: m.ood.score for m in analysis.modalities if m.ood is not None},
        "lesions": sum(len(m.lesions) for m in analysis.modalities),
    }


async def _run_corpus(studies, url: str, competence: CompetenceReference, progress: bool) -> list[dict]:
    repository = default_repository()
    prototypes, calibration, models = default_prototypes(), Calibration.load(repository), model_versions(repository)
    out = []
    async with TritonClient(url) as client:
        await client.check_ready()
        for study in tqdm(studies, desc="out of domain", unit="study", disable=not progress):
            ingested = await asyncio.to_thread(ingest_paths, list(study.files))
            analysis = await analyze(ingested, client, prototypes, calibration, AnalysisOptions(), models, competence)
            out.append({"name": study.name, "source": study.source, "expected": study.expected, **_caught_by(analysis)})
    return out


def _auroc(in_domain: list[float], out_of_domain: list[float]) -> float | None:
    if not in_domain or not out_of_domain:
        return None
    a, b = np.array(out_of_domain)[:, None], np.array(in_domain)[None, :]
    return round(float(((a > b).sum() + 0.5 * (a == b).sum()) / (a.size * b.size)), 4)


def _catch(records: list[dict]) -> dict:
    """Share of studies with no tumor call, and per layer the share of studies a reason of it stopped."""
    n = len(records)
    by_layer = {
        layer.value: round(sum(layer.value in r["layers"] for r in records) / n, 4) for layer in CompetenceLayer
    }
    return {
        "studies": n,
        "no_tumor_call": round(sum(not r["tumor_call"] for r in records) / n, 4) if n else None,
        "tumor_detected": sum(r["tumor_detected"] for r in records),
        "caught_by_layer": by_layer,
    }


def evaluate_competence(
    in_domain: CohortRun, triton_url: str | None, progress: bool = True, synthetic_seed: int = SYNTHETIC_OOD_SEED
) -> dict:
    """In-domain pass rate, out-of-domain catch rate per layer and the OOD score's AUROC (see module doc)."""
    from cspine.evaluation.ood_corpus import real_ood_studies, synthetic_ood_studies

    repository = default_repository()
    competence = CompetenceReference.load(repository)
    with ExitStack() as stack:
        url = triton_url or stack.enter_context(LocalTriton(repository, TritonPorts.free())).grpc_url
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cspine-competence-")))
        records = evaluate(dataclasses.replace(in_domain, triton_url=url), competence=competence)
        real_studies = real_ood_studies(work / "real")
        synthetic_studies = synthetic_ood_studies(work / "synthetic", synthetic_seed)
        real = asyncio.run(_run_corpus(real_studies, url, competence, progress))
        synthetic = asyncio.run(_run_corpus(synthetic_studies, url, competence, progress))
        every = every_series_score(real_studies + synthetic_studies, competence, seg_runners(repository))
    found = metrics(records)
    in_scores = {m.value: [r["modalities"][m.value]["ood_score"] for r in records] for m in MODALITY_ORDER}
    ood_scores = {
        m.value: [r["ood_scores"][m.value] for r in real + synthetic if m.value in r["ood_scores"]]
        for m in MODALITY_ORDER
    }
    return {
        "in_domain": {
            "synthetic": True,
            "studies": found["studies"],
            "assessable_rate": found["assessable_rate"],
            "assessable_rate_per_modality": found["assessable_rate_per_modality"],
            "detection_sensitivity": found["detection_sensitivity"],
            "detection_specificity": found["detection_specificity"],
        },
        "real_out_of_domain": {**_catch(real), "studies_detail": real},
        "synthetic_out_of_domain": {**_catch(synthetic), "studies_detail": synthetic},
        # AUROC of the score over the out-of-domain series the pipeline's models ran on, and over every
        # out-of-domain image series (scored in-process even where an input check stopped it first)
        "ood_auroc": {k: _auroc([s for s in in_scores[k] if s is not None], ood_scores[k]) for k in in_scores},
        "ood_auroc_every_series": {k: _auroc([s for s in in_scores[k] if s is not None], every[k]) for k in in_scores},
        "ood_scored": {
            k: {
                "in_domain": sum(s is not None for s in in_scores[k]),
                "out_of_domain": len(ood_scores[k]),
                "every_out_of_domain_series": len(every[k]),
                "every_out_of_domain_below_threshold": sum(
                    s <= competence.references[Modality(k)].threshold for s in every[k]
                ),
            }
            for k in in_scores
        },
        "thresholds": {m.value: r.threshold for m, r in competence.references.items()},
    }


def format_competence(result: dict) -> str:
    def f(value, digits=3):
        return "n/a" if value is None else f"{value:.{digits}f}"

    d = result["in_domain"]
    lines = [
        f"in domain (SYNTHETIC phantom, {d['studies']} held-out studies, full pipeline on the local Triton):",
        f"  assessable {f(d['assessable_rate'])} (goal ≥ 0.98); per modality "
        + ", ".join(f"{k} {f(v)}" for k, v in d["assessable_rate_per_modality"].items()),
        f"  detection sensitivity {f(d['detection_sensitivity'])}, specificity {f(d['detection_specificity'])}",
    ]
    for key, title in (("real_out_of_domain", "REAL"), ("synthetic_out_of_domain", "SYNTHETIC")):
        c = result[key]
        lines.append(
            f"{title} out of domain ({c['studies']} studies): no tumor call {f(c['no_tumor_call'])}, "
            f"tumor detected in {c['tumor_detected']}; caught by layer "
            + ", ".join(f"{k} {f(v)}" for k, v in c["caught_by_layer"].items())
        )
        for r in c["studies_detail"]:
            reasons = "; ".join(f"{m}: {', '.join(codes) or 'assessed'}" for m, codes in r["reasons"].items())
            lines.append(
                f"    {r['name']}: {'NO CALL' if not r['tumor_call'] else 'CALL'} — {reasons or r['fused_reasons']}"
            )
    lines.append(
        "OOD score ROC AUC (in-domain vs out-of-domain series the models ran on): "
        + ", ".join(
            f"{k} {f(v)} ({result['ood_scored'][k]['in_domain']} vs {result['ood_scored'][k]['out_of_domain']})"
            for k, v in result["ood_auroc"].items()
        )
    )
    lines.append(
        "OOD score ROC AUC over every out-of-domain image series (scored in-process, input checks aside): "
        + ", ".join(
            f"{k} {f(v)} ({c['every_out_of_domain_series']} series, {c['every_out_of_domain_below_threshold']} "
            "below the threshold)"
            for (k, v), c in zip(result["ood_auroc_every_series"].items(), result["ood_scored"].values(), strict=True)
        )
    )
    return "\n".join(lines)
