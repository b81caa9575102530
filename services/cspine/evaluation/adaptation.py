"""Few-shot adaptation at a SYNTHETIC site, measured on ground-truth lesion ROIs (not the full pipeline).

The SYNTHETIC default support set (120 lesions of the default site) gives the 0-shot prototypes. A site then
adds k of its own lesions per class, and each method turns the default cases and the site's into prototypes
for the shipped ``proto_classify``:

- ``plain``: the support rule of the service (fewshot/prototypes.py): per class, site cases weigh min(k, 5)/5
  against the default class mean;
- ``fitted``: ``plain``, then fitted to the site's cases by a few gradient steps (fewshot/adapt.py, ~1 ms);
- ``transductive``: ``plain``, then refined with the unlabelled query lesions (soft k-means);
- ``baseline``: the conventionally trained encoder with its last block and a new linear head fine-tuned on
  the site's cases (modeling/evaluate.py), for k ≥ 1.

The query lesions are the same at every k; support draws are repeated. Per method and k: accuracy, balanced
accuracy and ECE of the modalities fused (summed log-probabilities), with a bootstrap 95 % CI over the query
lesions of their repeat-averaged correctness. A new-class row adds one subtype as a fourth class with 5 site
cases and reports its recall.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cspine.fewshot.adapt import balanced_accuracy, expected_calibration_error, fitted, transductive
from cspine.fewshot.prototypes import PrototypeSet, SupportSet
from cspine.inference.specs import EMBEDDING_DIM, MODALITY_ORDER
from cspine.modeling.data import CLASSES, LesionBank
from cspine.modeling.evaluate import EmbedModel, finetune_baseline
from cspine.modeling.networks import BaselineClassifier

METHODS = ("plain", "fitted", "transductive", "baseline")
SHOTS = (0, 1, 5, 10, 20)
Classify = Callable[[np.ndarray, np.ndarray], np.ndarray]


def classifier_scale(classify: Classify) -> float:
    """The scale ``s`` of the exported classifier ``softmax(-s · d²)``, read from one call: with prototypes at
    squared distances 0 and 1, the log-ratio of the two probabilities is ``s``."""
    embedding = np.zeros((1, EMBEDDING_DIM), np.float32)
    prototypes = np.zeros((2, EMBEDDING_DIM), np.float32)
    prototypes[1, 0] = 1.0
    p = classify(embedding, prototypes)[0]
    return float(np.log(p[0] / p[1]))


def _embeddings(pool: LesionBank, embed: EmbedModel) -> np.ndarray:
    """[N, modalities, D] embeddings of every lesion of the pool."""
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    return np.stack(
        [
            embed(pool.rois[:, m].astype(np.float32), np.tile(onehots[m], (len(pool), 1)))
            for m in range(len(MODALITY_ORDER))
        ],
        axis=1,
    )


def _rule_prototypes(default: SupportSet, site: np.ndarray, site_labels: np.ndarray, names) -> np.ndarray:
    """[modalities, K, D] prototypes of the support rule from the default set and the site's cases, classes in
    the order of ``names``."""
    labels = default.labels + tuple(names[c] for c in site_labels)
    combined = SupportSet(np.concatenate([default.embeddings, site]) if len(site) else default.embeddings, labels)
    flags = np.array([True] * len(default.labels) + [False] * len(site))
    prototypes = PrototypeSet.from_cases(combined, flags)
    order = [prototypes.labels.index(name) for name in names]
    return np.stack([prototypes.prototypes[modality][order] for modality in MODALITY_ORDER])


def _fused(log_probabilities: list[np.ndarray]) -> np.ndarray:
    total = np.sum(log_probabilities, axis=0)
    total -= total.max(1, keepdims=True)
    weights = np.exp(total)
    return weights / weights.sum(1, keepdims=True)


def _bootstrap(correct: np.ndarray, rng: np.random.Generator, draws: int = 1000) -> list[float]:
    means = [correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(draws)]
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def compare(
    default: SupportSet,
    pool: LesionBank,
    embed: EmbedModel,
    classify: Classify,
    baseline: BaselineClassifier | None,
    shots: tuple[int, ...] = SHOTS,
    repeats: int = 10,
    queries_per_class: int = 10,
    finetune_steps: int = 40,
    seed: int = 0,
) -> dict:
    """Per method and k: accuracy, balanced accuracy, ECE (means over repeats) and the accuracy's CI."""
    names = CLASSES
    scale = classifier_scale(classify)
    embeddings = _embeddings(pool, embed)
    rng = np.random.default_rng(seed)
    members = [np.nonzero(pool.classes == c)[0] for c in range(len(names))]
    needed = queries_per_class + max(shots)
    if min(len(m) for m in members) < needed:
        raise ValueError(f"the pool has {[len(m) for m in members]} lesions per class; {needed} are needed")
    shuffled = [rng.permutation(m) for m in members]
    queries = np.concatenate([m[:queries_per_class] for m in shuffled])
    truth = pool.classes[queries]
    candidates = [m[queries_per_class:] for m in shuffled]
    features = _baseline_features(pool, baseline) if baseline is not None else {}
    results: dict[str, dict[str, dict]] = {method: {} for method in METHODS}
    single: dict[str, dict[str, list[float]]] = {m.value.lower(): {} for m in MODALITY_ORDER}  # plain, per modality
    for k in shots:
        runs: dict[str, list[np.ndarray]] = {method: [] for method in METHODS}
        for repeat in range(repeats if k else 1):
            draw = np.random.default_rng([seed, k, repeat])
            support = np.concatenate([draw.choice(c, size=k, replace=False) for c in candidates]).astype(int)
            labels = np.repeat(np.arange(len(names)), k)
            rule = _rule_prototypes(default, embeddings[support], labels, names)
            for method in ("plain", "fitted", "transductive"):
                log_p = []
                for m, modality in enumerate(MODALITY_ORDER):
                    prototypes = rule[m]
                    if method == "fitted" and k:
                        prototypes = fitted(embeddings[support, m], labels, prototypes, scale)
                    elif method == "transductive":
                        prototypes = transductive(
                            prototypes, embeddings[support, m], labels, embeddings[queries, m], scale
                        )
                    log_p.append(np.log(np.clip(classify(embeddings[queries, m], prototypes), 1e-9, None)))
                    if method == "plain":
                        single[modality.value.lower()].setdefault(str(k), []).append(
                            float((log_p[-1].argmax(1) == truth).mean())
                        )
                runs[method].append(_fused(log_p))
            if baseline is not None and k:
                model = finetune_baseline(baseline, features, support, labels, finetune_steps, seed + repeat)
                runs["baseline"].append(_baseline_probabilities(model, features, queries))
        for method, probabilities in runs.items():
            if probabilities:
                results[method][str(k)] = _figures(probabilities, truth, len(names), rng)
    return {
        "measured_on": "SYNTHETIC phantom lesions, ground-truth ROIs (not the full pipeline)",
        "lesions": len(pool),
        "queries": len(queries),
        "repeats": repeats,
        "methods": {method: values for method, values in results.items() if values},
        "plain_by_modality": {
            modality: {k: round(float(np.mean(v)), 4) for k, v in values.items()} for modality, values in single.items()
        },
    }


def _figures(probabilities: list[np.ndarray], truth: np.ndarray, classes: int, rng: np.random.Generator) -> dict:
    accuracy = [float((p.argmax(1) == truth).mean()) for p in probabilities]
    balanced = [balanced_accuracy(p.argmax(1), truth, classes) for p in probabilities]
    ece = [expected_calibration_error(p, truth) for p in probabilities]
    correct = np.mean([p.argmax(1) == truth for p in probabilities], axis=0)
    return {
        "accuracy": round(float(np.mean(accuracy)), 4),
        "accuracy_ci95": _bootstrap(correct, rng),
        "balanced_accuracy": round(float(np.mean(balanced)), 4),
        "ece": round(float(np.mean(ece)), 4),
    }


def _baseline_features(pool: LesionBank, baseline: BaselineClassifier) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        return {
            m: torch.cat(
                [
                    baseline.encoder.features(torch.from_numpy(pool.rois[i : i + 64, m].astype(np.float32)))
                    for i in range(0, len(pool), 64)
                ]
            )
            for m in range(len(MODALITY_ORDER))
        }


def _baseline_probabilities(
    model: BaselineClassifier, features: dict[int, torch.Tensor], queries: np.ndarray
) -> np.ndarray:
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    log_p = []
    with torch.no_grad():
        for m in features:
            onehot = torch.from_numpy(np.tile(onehots[m], (len(queries), 1)))
            log_p.append(torch.log_softmax(model.forward_features(features[m][queries], onehot), 1).numpy())
    return _fused(log_p)


def new_class_recall(
    default: SupportSet,
    pool: LesionBank,
    embed: EmbedModel,
    classify: Classify,
    subtype: int,
    cases: int = 5,
    repeats: int = 10,
    seed: int = 0,
) -> float:
    """Recall of a subtype added as a new (fourth) class with ``cases`` site cases, the other classes keeping
    the default's prototypes; the subtype's other lesions are the queries, with as many of the other classes'."""
    embeddings = _embeddings(pool, embed)
    names = (*CLASSES, "new-class")
    mine = np.nonzero(pool.subtypes == subtype)[0]
    if len(mine) < cases + 5:
        raise ValueError(f"the pool has {len(mine)} lesions of the new subtype; {cases + 5} are needed")
    recalls = []
    for repeat in range(repeats):
        draw = np.random.default_rng([seed, subtype, repeat])
        picked = draw.permutation(mine)
        support, queries = picked[:cases], picked[cases:]
        rule = _rule_prototypes(default, embeddings[support], np.full(cases, len(CLASSES)), names)
        log_p = [
            np.log(np.clip(classify(embeddings[queries, m], rule[m]), 1e-9, None)) for m in range(len(MODALITY_ORDER))
        ]
        recalls.append(float((_fused(log_p).argmax(1) == len(CLASSES)).mean()))
    return round(float(np.mean(recalls)), 4)


def evaluate_adaptation(
    sites: dict[str, LesionBank],
    default: SupportSet,
    embed: EmbedModel,
    classify: Classify,
    baseline: BaselineClassifier | None,
    new_subtype: dict[str, int],
    repeats: int = 10,
    queries_per_class: int = 10,
    finetune_steps: int = 40,
    seed: int = 0,
) -> dict:
    """The issue's JSON: per site, method and k (as text) the figures; the shipped method; the new-class recall
    per site; the fused accuracy beside the best single modality at 5 site cases (plain)."""
    out: dict = {"sites": {}, "shipped_method": "plain", "new_class_recall": {}, "fused_vs_best_single": {}}
    details = {}
    for site, pool in sites.items():
        measured = compare(
            default, pool, embed, classify, baseline, SHOTS, repeats, queries_per_class, finetune_steps, seed
        )
        details[site] = measured
        out["sites"][site] = {
            method: {k: {key: v[key] for key in ("accuracy", "balanced_accuracy", "ece")} for k, v in values.items()}
            for method, values in measured["methods"].items()
        }
        if site in new_subtype:
            out["new_class_recall"][site] = new_class_recall(
                default, pool, embed, classify, new_subtype[site], repeats=repeats, seed=seed
            )
        single = {m: values.get("5") for m, values in measured["plain_by_modality"].items()}
        out["fused_vs_best_single"][site] = {
            "fused": measured["methods"]["plain"]["5"]["accuracy"],
            "best_single": max(v for v in single.values() if v is not None),
        }
    out["measured_on"] = "SYNTHETIC phantom lesions of each site, ground-truth ROIs (not the full pipeline)"
    out["details"] = details
    return out
