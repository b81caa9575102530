"""Few-shot adaptation at a SYNTHETIC site, measured on ground-truth lesion ROIs (not the full pipeline).

A SYNTHETIC default support set (120 lesions of the default site, cut about their true centres as the pools'
lesions are: ``calibrate.ground_truth_support``) gives the 0-shot prototypes. A site then
adds k of its own lesions per class, and each method turns the default cases and the site's into prototypes
for the shipped ``proto_classify``:

- ``plain``: the support rule of the service (fewshot/prototypes.py): per class, site cases weigh min(k, K)/K
  against the default class mean (K = ``SITE_CASES_TO_REPLACE``);
- ``fitted``: ``plain``, then, from ``SITE_CASES_TO_FIT`` site cases per class, fitted to them by a few gradient
  steps (fewshot/adapt.py, ~1 ms), and with 10 or more site cases per class the fusion weights refitted to them
  (fewshot/prototypes.py);
- ``transductive``: ``plain``, then refined with the unlabelled query lesions (soft k-means);
- ``baseline``: the conventionally trained encoder with its last block and a new linear head fine-tuned on
  the site's cases (modeling/evaluate.py), for k ≥ 1.

Each site gives a class-balanced pool of its lesions (``site_lesions(per_class=…)``: its subtype mix within each
class); the query lesions are the same at every k, support draws are repeated. The modalities are fused as the
service fuses them: where calibration.json chose one modality (``classification_order``), that modality's
answer (every lesion here has all three), and once ``fitted`` refitted the weights to a site's cases, log-linear
pooling with them (with the calibration's weights where it chose none). Per method and k: accuracy, balanced
accuracy (the mean of the per-class recalls; the queries are balanced, so the two are close), and ECE over every
repeat's predictions pooled (10 bins), with a bootstrap 95 % CI of the accuracy over the query lesions. A
new-class row adds one subtype as a fourth class with 5 site cases, beside 5 site cases of each other class: its
recall, and the share of the other classes' lesions (of other subtypes) it takes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cspine.domain import Modality
from cspine.fewshot.adapt import (
    balanced_accuracy,
    calibrated_ece,
    classifier_scale,
    expected_calibration_error,
    transductive,
)
from cspine.fewshot.prototypes import Adaptation, PrototypeSet, SupportSet
from cspine.inference.specs import MODALITY_ORDER
from cspine.modeling.data import CLASSES, LesionBank
from cspine.modeling.evaluate import EmbedModel, finetune_baseline, onnx_embed, site_lesions
from cspine.modeling.networks import BaselineClassifier
from cspine.phantom.sites import DEFAULT_SITE

METHODS = ("plain", "fitted", "transductive", "baseline")
SHOTS = (0, 1, 5, 10, 20)
QUERIES_PER_CLASS = 15
ECE_RESAMPLES = 500  # bootstrap resamples of the query lesions behind an ECE's CI
NEW_CLASS_CASES = 5
# The subtype each shifted site adds as a class of its own in the new-class row: one its population has more of
# than the default site's (phantom/sites.py), so a site would want it told apart; the default site adds chordoma.
NEW_CLASS_SUBTYPE = {
    "default": "chordoma",
    "community-ct": "myeloma",
    "mr-1p5t": "osteoid_osteoma",
    "high-res-sharp": "giant_cell_tumor",
}
Classify = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class SitePools:
    """One site's lesions for the evaluation: a class-balanced pool (queries and support candidates) and
    lesions of the subtype it adds as a new class."""

    pool: LesionBank
    new_class: LesionBank
    new_class_name: str


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


def _rule_prototypes(
    default: SupportSet, site: np.ndarray, site_labels: np.ndarray, names, adaptation: Adaptation | None = None
) -> PrototypeSet:
    """The prototype set the service makes of the default set and the site's cases (the support rule, then
    ``adaptation``)."""
    labels = default.labels + tuple(names[c] for c in site_labels)
    combined = SupportSet(np.concatenate([default.embeddings, site]) if len(site) else default.embeddings, labels)
    flags = np.array([True] * len(default.labels) + [False] * len(site))
    return PrototypeSet.from_cases(combined, flags, adaptation=adaptation)


def _stacked(prototypes: PrototypeSet, names) -> np.ndarray:
    """[modalities, K, D] prototypes of a set, classes in the order of ``names``."""
    order = [prototypes.labels.index(name) for name in names]
    return np.stack([prototypes.prototypes[modality][order] for modality in MODALITY_ORDER])


def _fused(log_probabilities: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """Log-linear pooling, as the service fuses modalities: softmax of the weighted sum of log-probabilities."""
    total = np.tensordot(weights, np.stack(log_probabilities), axes=1)
    total -= total.max(1, keepdims=True)
    pooled = np.exp(total)
    return pooled / pooled.sum(1, keepdims=True)


def _log(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(probabilities, 1e-9, None))


def _bootstrap(correct: np.ndarray, rng: np.random.Generator, draws: int = 1000) -> list[float]:
    means = [correct[rng.integers(0, len(correct), len(correct))].mean() for _ in range(draws)]
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def _method_prototypes(
    method: str,
    default: SupportSet,
    support: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    names,
    scale: float,
    weights: np.ndarray,
    answer: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """[modalities, K, D] prototypes of ``method`` from the default set, the site's support embeddings [n, M, D]
    (classes ``labels``, indices into ``names``) and, for ``transductive``, the queries' [q, M, D], and the
    fusion weights to pool their modalities with: ``plain`` and ``fitted`` through ``PrototypeSet.from_cases``
    as the service makes them (``fitted`` refits the calibration's ``weights`` once the site has enough cases);
    without that refit, ``answer`` (``service_answer``)."""
    if method in ("plain", "fitted"):
        made = _rule_prototypes(default, support, labels, names, Adaptation(method, scale, tuple(weights)))
        pooled = np.array([made.fusion_weights[m] for m in MODALITY_ORDER]) if made.fusion_weights else answer
        return _stacked(made, names), pooled
    rule = _stacked(_rule_prototypes(default, support, labels, names), names)
    refined = [transductive(rule[m], support[:, m], labels, queries[:, m], scale) for m in range(len(MODALITY_ORDER))]
    return np.stack(refined), answer


def service_answer(weights: np.ndarray, order: tuple[Modality, ...]) -> np.ndarray:
    """The pooling weights that give the service's answer on lesions of every modality: the calibration's
    ``weights``, or where it chose one modality (``classification_order``) all weight on the first of its order
    (pooling one modality with weight 1 gives that modality's probabilities)."""
    if not order:
        return weights
    return np.eye(len(MODALITY_ORDER))[MODALITY_ORDER.index(order[0])]


def compare(
    default: SupportSet,
    pool: LesionBank,
    embed: EmbedModel,
    classify: Classify,
    baseline: BaselineClassifier | None,
    weights: np.ndarray,
    shots: tuple[int, ...] = SHOTS,
    repeats: int = 10,
    queries_per_class: int = QUERIES_PER_CLASS,
    finetune_steps: int = 40,
    seed: int = 0,
    answer: np.ndarray | None = None,
) -> dict:
    """Per method and k: accuracy, balanced accuracy and ECE of the fused answer (modalities pooled with
    ``answer``, by default ``weights``, or with the weights ``fitted`` refitted), the accuracy's CI, and each
    modality's accuracy alone."""
    answer = weights if answer is None else answer
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
    for k in shots:
        runs: dict[str, list[np.ndarray]] = {method: [] for method in METHODS}
        single: dict[str, list[list[np.ndarray]]] = {method: [] for method in METHODS}
        for repeat in range(repeats if k else 1):
            draw = np.random.default_rng([seed, k, repeat])
            support = np.concatenate([draw.choice(c, size=k, replace=False) for c in candidates]).astype(int)
            labels = np.repeat(np.arange(len(names)), k)
            for method in ("plain", "fitted", "transductive"):
                prototypes, pooled = _method_prototypes(
                    method, default, embeddings[support], labels, embeddings[queries], names, scale, weights, answer
                )
                log_p = [_log(classify(embeddings[queries, m], prototypes[m])) for m in range(len(MODALITY_ORDER))]
                single[method].append(log_p)
                runs[method].append(_fused(log_p, pooled))
            if baseline is not None and k:
                model = finetune_baseline(baseline, features, support, labels, finetune_steps, seed + repeat)
                log_p = _baseline_log_probabilities(model, features, queries)
                single["baseline"].append(log_p)
                runs["baseline"].append(_fused(log_p, answer))
        for method, probabilities in runs.items():
            if probabilities:
                results[method][str(k)] = _figures(probabilities, truth, len(names), rng)
                results[method][str(k)]["by_modality"] = {
                    modality.value.lower(): round(
                        float(np.mean([(run[m].argmax(1) == truth).mean() for run in single[method]])), 4
                    )
                    for m, modality in enumerate(MODALITY_ORDER)
                }
    return {
        "measured_on": "SYNTHETIC phantom lesions, ground-truth ROIs (not the full pipeline)",
        "lesions": len(pool),
        "queries": len(queries),
        "repeats": repeats,
        "methods": {method: values for method, values in results.items() if values},
    }


def _figures(probabilities: list[np.ndarray], truth: np.ndarray, classes: int, rng: np.random.Generator) -> dict:
    """Accuracy (CI over the query lesions), balanced accuracy, and the ECE of every draw's predictions pooled,
    with its CI (the query lesions resampled, each with its predictions of every draw) and ``ece_if_calibrated``,
    what a perfectly calibrated answer with the same confidences would show on as many predictions."""
    accuracy = [float((p.argmax(1) == truth).mean()) for p in probabilities]
    balanced = [balanced_accuracy(p.argmax(1), truth, classes) for p in probabilities]
    correct = np.mean([p.argmax(1) == truth for p in probabilities], axis=0)
    stacked = np.stack(probabilities)  # [draws, queries, classes]
    resampled = []
    for _ in range(ECE_RESAMPLES):
        picked = rng.integers(0, len(truth), len(truth))
        resampled.append(
            expected_calibration_error(stacked[:, picked].reshape(-1, classes), np.tile(truth[picked], len(stacked)))
        )
    pooled = stacked.reshape(-1, classes)
    return {
        "accuracy": round(float(np.mean(accuracy)), 4),
        "accuracy_ci95": _bootstrap(correct, rng),
        "balanced_accuracy": round(float(np.mean(balanced)), 4),
        "ece": round(expected_calibration_error(pooled, np.tile(truth, len(probabilities))), 4),
        "ece_ci95": [round(float(np.percentile(resampled, q)), 4) for q in (2.5, 97.5)],
        "ece_if_calibrated": round(calibrated_ece(pooled, rng), 4),
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


def _baseline_log_probabilities(
    model: BaselineClassifier, features: dict[int, torch.Tensor], queries: np.ndarray
) -> list[np.ndarray]:
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    log_p = []
    with torch.no_grad():
        for m in features:
            onehot = torch.from_numpy(np.tile(onehots[m], (len(queries), 1)))
            log_p.append(torch.log_softmax(model.forward_features(features[m][queries], onehot), 1).numpy())
    return log_p


def new_class(
    default: SupportSet,
    pools: SitePools,
    embed: EmbedModel,
    classify: Classify,
    weights: np.ndarray,
    method: str,
    cases: int = NEW_CLASS_CASES,
    repeats: int = 10,
    queries_per_class: int = QUERIES_PER_CLASS,
    seed: int = 0,
    answer: np.ndarray | None = None,
) -> dict:
    """A subtype added as a new (fourth) class with ``cases`` site cases by ``method``, beside as many site cases
    of each other class (a site that has adapted its classes, then adds its own): the new class's recall on the
    subtype's other lesions, and the share of the other classes' query lesions (of other subtypes) it takes."""
    mine, pool = _embeddings(pools.new_class, embed), _embeddings(pools.pool, embed)
    if len(mine) < cases + 5:
        raise ValueError(f"{len(mine)} lesions of the new subtype; {cases + 5} are needed")
    names = (*CLASSES, pools.new_class_name)
    rng = np.random.default_rng(seed)
    elsewhere = pools.pool.subtypes != pools.new_class.subtypes[0]
    shuffled = [rng.permutation(np.nonzero((pools.pool.classes == c) & elsewhere)[0]) for c in range(len(CLASSES))]
    # as many queries per class as the pool leaves beside the support cases (a site dominated by the new
    # subtype has few lesions of its class's other subtypes)
    per_class = min(queries_per_class, *(len(m) - cases for m in shuffled))
    if per_class < 3:
        raise ValueError(f"the pool has {[len(m) for m in shuffled]} lesions of the other subtypes per class")
    other = np.concatenate([m[:per_class] for m in shuffled])
    candidates = [m[per_class:] for m in shuffled]
    scale = classifier_scale(classify)
    recalls, taken = [], []
    for repeat in range(repeats):
        draw = np.random.default_rng([seed, repeat])
        picked = draw.permutation(len(mine))
        theirs = np.concatenate([draw.choice(c, size=cases, replace=False) for c in candidates])
        support = np.concatenate([pool[theirs], mine[picked[:cases]]])
        labels = np.repeat(np.arange(len(names)), cases)
        queries = mine[picked[cases:]]
        both = np.concatenate([queries, pool[other]])
        answered = weights if answer is None else answer
        prototypes, pooled = _method_prototypes(method, default, support, labels, both, names, scale, weights, answered)
        log_p = [_log(classify(both[:, m], prototypes[m])) for m in range(len(MODALITY_ORDER))]
        predicted = _fused(log_p, pooled).argmax(1)
        recalls.append(float((predicted[: len(queries)] == len(CLASSES)).mean()))
        taken.append(float((predicted[len(queries) :] == len(CLASSES)).mean()))
    return {
        "subtype": pools.new_class_name,
        "cases": cases,
        "recall": round(float(np.mean(recalls)), 4),
        "recall_queries": len(mine) - cases,
        "others_taken": round(float(np.mean(taken)), 4),
        "other_queries": len(other),
    }


def evaluate_adaptation(
    sites: dict[str, SitePools],
    default: SupportSet,
    embed: EmbedModel,
    classify: Classify,
    baseline: BaselineClassifier | None,
    weights: np.ndarray,
    shipped_method: str,
    repeats: int = 10,
    queries_per_class: int = QUERIES_PER_CLASS,
    finetune_steps: int = 40,
    seed: int = 0,
    answer: np.ndarray | None = None,
) -> dict:
    """The issue's JSON: per site, method and k (as text) the figures; the shipped method; the new-class recall
    per site (shipped method); the fused accuracy beside the best single modality at 5 site cases (shipped
    method); and, under ``details``, everything measured. ``answer``: the weights that give the service's answer
    where no site refit replaced them (``service_answer``; default ``weights``)."""
    out: dict = {"sites": {}, "shipped_method": shipped_method, "new_class_recall": {}, "fused_vs_best_single": {}}
    details = {}
    for site, pools in sites.items():
        measured = compare(
            default,
            pools.pool,
            embed,
            classify,
            baseline,
            weights,
            SHOTS,
            repeats,
            queries_per_class,
            finetune_steps,
            seed,
            answer,
        )
        added = new_class(
            default, pools, embed, classify, weights, shipped_method, repeats=repeats, seed=seed, answer=answer
        )
        measured["new_class"] = added
        details[site] = measured
        out["sites"][site] = {
            method: {k: {key: v[key] for key in ("accuracy", "balanced_accuracy", "ece")} for k, v in values.items()}
            for method, values in measured["methods"].items()
        }
        out["new_class_recall"][site] = added["recall"]
        at5 = measured["methods"][shipped_method]["5"]
        out["fused_vs_best_single"][site] = {"fused": at5["accuracy"], "best_single": max(at5["by_modality"].values())}
    out["measured_on"] = "SYNTHETIC phantom lesions of each site, ground-truth ROIs (not the full pipeline)"
    out["fusion_weights"] = {m.value: round(float(w), 4) for m, w in zip(MODALITY_ORDER, weights, strict=True)}
    if answer is not None:  # the service answers with one modality until a site's cases refit the weights
        out["answer_weights"] = {m.value: round(float(w), 4) for m, w in zip(MODALITY_ORDER, answer, strict=True)}
    out["details"] = details
    return out


PER_CLASS = QUERIES_PER_CLASS + 30  # lesions per class a site's pool holds: the queries and 30 support candidates
NEW_CLASS_LESIONS = 15


def site_pools(cache: Path, site: str, seed: int, workers: int = 1, per_class: int = PER_CLASS) -> SitePools:
    """A site's class-balanced pool (``seed``) and the lesions of its new-class subtype (``seed + 1``), rendered
    once and cached (modeling/evaluate.py ``site_lesions``)."""
    subtype = NEW_CLASS_SUBTYPE.get(site, NEW_CLASS_SUBTYPE[DEFAULT_SITE])
    pool = site_lesions(cache, site, seed, workers=workers, per_class=per_class).bank()
    added = site_lesions(cache, site, seed + 1, workers=workers, per_class=NEW_CLASS_LESIONS, tumor=subtype).bank()
    return SitePools(pool, added, subtype)


def run_adaptation(
    repository: Path,
    cache: Path,
    sites: list[str],
    seed: int,
    repeats: int = 10,
    baseline: bool = True,
    workers: int = 1,
) -> dict:
    """``evaluate_adaptation`` with the served version set's embedding, classifier and fusion weights (the shipped
    models unless ``cspine models use N`` chose another set), the protocol's default support set (SYNTHETIC lesions
    of the default site cut about their true centres, as the pools are: ``ground_truth_support``, embedded by the
    served embedding) and the service's method, on each site's pools."""
    from cspine.analysis.fusion import Calibration
    from cspine.fewshot.prototypes import SHIPPED_METHOD
    from cspine.inference.model_config import served_model_file
    from cspine.modeling.data import ground_truth_support
    from cspine.modeling.recipes import ARTIFACTS, load_baseline_artifact, proto_classifier

    calibration = Calibration.load(repository)
    weights = np.array([calibration.classification_weights[m] for m in MODALITY_ORDER])
    result = evaluate_adaptation(
        {site: site_pools(cache, site, seed, workers) for site in sites},
        ground_truth_support(cache, served_model_file(repository, "lesion_embed"), workers=workers),
        onnx_embed(served_model_file(repository, "lesion_embed")),
        proto_classifier(repository),
        load_baseline_artifact(ARTIFACTS / "baseline.pt") if baseline else None,
        weights,
        SHIPPED_METHOD,
        repeats=repeats,
        seed=seed,
        answer=service_answer(weights, calibration.classification_order),
    )
    result["seed"] = seed
    return result


def format_adaptation(result: dict) -> str:
    """One table per site: balanced accuracy / ECE per method and number of site cases per class; the shipped
    method's ECE with its CI and the floor a calibrated answer shows; then the new-class row and the fused
    accuracy beside the best single modality."""
    lines = [f"{result['measured_on']}; shipped method: {result['shipped_method']}"]
    for site, methods in result["sites"].items():
        details = result["details"][site]
        lines.append(
            f"\n{site}: {details['lesions']} lesions, {details['queries']} queries, {details['repeats']} support "
            "draws per k; balanced accuracy / ECE"
        )
        lines.append(f"{'site cases per class':<22}" + "".join(f"{k:>14}" for k in map(str, SHOTS)))
        for method, values in methods.items():
            cells = [
                f"{values[k]['balanced_accuracy']:.3f} / {values[k]['ece']:.3f}" if k in values else "-"
                for k in map(str, SHOTS)
            ]
            lines.append(f"{method:<22}" + "".join(f"{c:>14}" for c in cells))
        shipped = details["methods"][result["shipped_method"]]
        lines.append(
            f"ECE of {result['shipped_method']} [95 % CI over the query lesions] (a perfectly calibrated answer on "
            "as many predictions): "
            + "; ".join(
                f"{k}: {shipped[k]['ece']:.3f} [{shipped[k]['ece_ci95'][0]:.3f}, {shipped[k]['ece_ci95'][1]:.3f}] "
                f"({shipped[k]['ece_if_calibrated']:.3f})"
                for k in map(str, SHOTS)
                if k in shipped
            )
        )
        added = details["new_class"]
        versus = result["fused_vs_best_single"][site]
        lines.append(
            f"new class {added['subtype']} ({added['cases']} cases): recall {added['recall']:.3f}, "
            f"other lesions taken {added['others_taken']:.3f}; at 5 cases fused accuracy {versus['fused']:.3f}, "
            f"best single modality {versus['best_single']:.3f}"
        )
    return "\n".join(lines)
