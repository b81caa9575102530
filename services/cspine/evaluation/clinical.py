"""Clinical validation figures: cspine's fused predictions against the reference diagnosis (postoperative
pathology, or the phantom's truth), each figure with its 95 % bootstrap interval beside it. ``summarise``
turns per-case prediction records into the content of metrics.json.

Every figure is ``{"value": x, "ci95": [lo, hi]}``; a figure that is undefined on the data (no positive
cases, one class only) is ``None`` and so is its interval, never NaN. Intervals are percentile bootstrap
intervals over cases (resampled with replacement, fixed seed); a resample on which a figure is undefined is
left out of that figure's interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

import cspine

TUMOR_FREE = "none"  # a record's truth when the study has no tumor: such cases only count for detection
HEADLINE_MODALITIES = "all"
# Order of the per-combination table; combinations not named here follow in alphabetical order.
MODALITY_ORDER = ("all", "ct", "mr", "xr")

Key = tuple[str, ...]
Figures = dict[Key, float | None]


def _ratio(numerator: float, denominator: float) -> float | None:
    return float(numerator) / float(denominator) if denominator > 0 else None


def _ci95(samples: list[float]) -> list[float] | None:
    if not samples:
        return None
    lo, hi = np.percentile(np.asarray(samples, dtype=float), [2.5, 97.5])
    return [float(lo), float(hi)]


def _bootstrap(figures: Callable[[np.ndarray], Figures], n: int, n_boot: int, seed: int) -> dict[Key, dict]:
    """``figures`` on all ``n`` cases, each with the percentile interval of ``n_boot`` case resamples."""
    point = figures(np.arange(n))
    samples: dict[Key, list[float]] = {key: [] for key in point}
    if n > 0:
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            for key, value in figures(rng.integers(0, n, n)).items():
                if value is not None:
                    samples[key].append(value)
    return {
        key: {"value": value, "ci95": _ci95(samples[key]) if value is not None else None}
        for key, value in point.items()
    }


def _nest(flat: dict[Key, dict]) -> dict:
    out: dict = {}
    for key, figure in flat.items():
        node = out
        for part in key[:-1]:
            node = node.setdefault(part, {})
        node[key[-1]] = figure
    return out


def _auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    return float(roc_auc_score(positive, scores)) if 0 < positive.sum() < len(positive) else None


def _roc(positive: np.ndarray, scores: np.ndarray) -> dict | None:
    """The ROC curve's points (for the plot), or None when it is undefined (one class only)."""
    if not 0 < positive.sum() < len(positive):
        return None
    fpr, tpr, _ = roc_curve(positive, scores)
    return {"fpr": [float(x) for x in fpr], "tpr": [float(x) for x in tpr]}


# ------------------------------------------------------------------------------------------------------
# Figures on arrays


def confusion(truth: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Confusion matrix: ``matrix[i][j]`` counts cases of true class ``labels[i]`` predicted as ``labels[j]``."""
    matrix = confusion_matrix(list(truth), list(pred), labels=list(labels))
    return {"labels": list(labels), "matrix": [[int(x) for x in row] for row in matrix]}


def reliability(probs: np.ndarray, truth_idx: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width confidence bin (``(lower, upper]``, the first one closed) of the top-label
    confidence: the mean confidence, the accuracy, and the number of cases (confidence and accuracy are
    None for an empty bin). The reliability diagram plots accuracy against confidence."""
    probs, truth_idx = np.asarray(probs, dtype=float), np.asarray(truth_idx, dtype=int)
    edges = np.arange(bins + 1) / bins  # exact decimal edges: 3 / 10 is the float nearest 0.3, linspace's is not
    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == truth_idx
    which = np.digitize(confidence, edges[1:-1], right=True)
    out = []
    for b in range(bins):
        member = which == b
        count = int(member.sum())
        out.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "confidence": float(confidence[member].mean()) if count else None,
                "accuracy": float(correct[member].mean()) if count else None,
                "count": count,
            }
        )
    return out


def expected_calibration_error(probs: np.ndarray, truth_idx: np.ndarray, bins: int = 10) -> float | None:
    """Expected calibration error of the top-label confidence over equal-width bins: the case-weighted mean
    of |accuracy − mean confidence| per bin. None when there are no cases."""
    table = reliability(probs, truth_idx, bins)
    n = sum(b["count"] for b in table)
    if n == 0:
        return None
    return float(sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]) / n)


def _classification_figures(y: np.ndarray, probs: np.ndarray, labels: Sequence[str], bins: int) -> Figures:
    k, n = len(labels), len(y)
    cm = confusion_matrix(y, probs.argmax(axis=1), labels=list(range(k)))
    figures: Figures = {
        ("accuracy",): _ratio(np.trace(cm), n),
        ("ece",): expected_calibration_error(probs, y, bins),
    }
    for i, label in enumerate(labels):
        tp = cm[i, i]
        fn, fp = cm[i].sum() - tp, cm[:, i].sum() - tp
        tn = n - tp - fn - fp
        figures[("per_class", label, "sensitivity")] = _ratio(tp, tp + fn)
        figures[("per_class", label, "specificity")] = _ratio(tn, tn + fp)
        figures[("per_class", label, "ppv")] = _ratio(tp, tp + fp)
        figures[("per_class", label, "npv")] = _ratio(tn, tn + fn)
        figures[("per_class", label, "auc")] = _auc(y == i, probs[:, i])
    return figures


def classification_metrics(
    truth: Sequence[str], probs: np.ndarray, labels: Sequence[str], *, n_boot: int = 1000, seed: int = 0, bins: int = 10
) -> dict:
    """Classification figures of probabilities ``probs`` [N, K] (columns in the order of ``labels``) against
    the true class names ``truth`` [N]. Only cases whose truth is one of ``labels`` count (tumor-free cases
    belong to detection). The predicted class is the most probable one (the first on a tie).

    Returns ``cases``; ``accuracy``; ``per_class`` {label: one-vs-rest ``sensitivity``, ``specificity``,
    ``ppv``, ``npv``, ``auc``, and ``cases`` (true positives available)}; ``ece`` (top-label, ``bins``
    equal-width bins) — each figure ``{"value", "ci95"}``; and, for the plots, ``confusion``,
    ``reliability`` and ``roc`` {label: {"fpr", "tpr"} or None}.
    """
    labels = list(labels)
    probs = np.asarray(probs, dtype=float)
    if probs.ndim != 2 or probs.shape != (len(truth), len(labels)):
        raise ValueError(f"probabilities of shape {probs.shape} do not fit {len(truth)} cases and labels {labels}")
    keep = np.array([t in labels for t in truth], dtype=bool)
    y = np.array([labels.index(t) for t in truth if t in labels], dtype=int)
    probs = probs[keep]
    flat = _bootstrap(lambda idx: _classification_figures(y[idx], probs[idx], labels, bins), len(y), n_boot, seed)
    out = {"cases": len(y), **_nest(flat)}
    for i, label in enumerate(labels):
        out["per_class"][label]["cases"] = int((y == i).sum())
    pred = [labels[j] for j in probs.argmax(axis=1)]
    out["confusion"] = confusion([labels[i] for i in y], pred, labels)
    out["reliability"] = reliability(probs, y, bins)
    out["roc"] = {label: _roc(y == i, probs[:, i]) for i, label in enumerate(labels)}
    return out


def detection_metrics(
    has_tumor: Sequence[bool], detected: Sequence[bool], scores: Sequence[float], *, n_boot: int = 1000, seed: int = 0
) -> dict:
    """Tumor detection: ``sensitivity`` (tumors detected), ``specificity`` (tumor-free studies not flagged)
    and the ``auc`` of the detection score, each ``{"value", "ci95"}``; with ``cases``, ``tumor_cases`` and
    the ``roc`` curve's points (None when undefined)."""
    truth = np.asarray(has_tumor, dtype=bool)
    flagged = np.asarray(detected, dtype=bool)
    score = np.asarray(scores, dtype=float)
    if not (len(truth) == len(flagged) == len(score)):
        raise ValueError(f"{len(truth)} truths, {len(flagged)} detections and {len(score)} scores do not match")
    if not np.isfinite(score).all():
        raise ValueError(f"detection scores must be finite numbers: {score[~np.isfinite(score)][:5].tolist()}")

    def figures(idx: np.ndarray) -> Figures:
        t, f, s = truth[idx], flagged[idx], score[idx]
        return {
            ("sensitivity",): _ratio((t & f).sum(), t.sum()),
            ("specificity",): _ratio((~t & ~f).sum(), (~t).sum()),
            ("auc",): _auc(t, s),
        }

    out = {"cases": len(truth), "tumor_cases": int(truth.sum()), **_nest(_bootstrap(figures, len(truth), n_boot, seed))}
    out["roc"] = _roc(truth, score)
    return out


# ------------------------------------------------------------------------------------------------------
# Figures on prediction records


def _record_labels(records: Sequence[dict]) -> list[str]:
    """The class order of the first record that has classes; every record with classes must name the same
    ones (in any order). A record without classes is a study nothing was classified in."""
    if not records:
        raise ValueError("no prediction records")
    labels = next((list(r["labels"]) for r in records if r["labels"]), [])
    for r in records:
        if r["labels"] and sorted(r["labels"]) != sorted(labels):
            raise ValueError(f"case {r['case']!r} has classes {r['labels']}, the others {labels}")
        if r["truth"] != TUMOR_FREE and r["truth"] not in labels:
            raise ValueError(f"case {r['case']!r} has truth {r['truth']!r}, neither {TUMOR_FREE!r} nor one of {labels}")
    return labels


def aligned_probabilities(record: dict, labels: Sequence[str]) -> list[float] | None:
    """The record's probabilities in the order of ``labels``; None when it has none (nothing classified)."""
    probs = record.get("probabilities") or []
    if not probs:
        return None
    if len(probs) != len(record["labels"]):
        raise ValueError(f"case {record['case']!r}: {len(probs)} probabilities for classes {record['labels']}")
    by_label = dict(zip(record["labels"], probs, strict=True))
    return [float(by_label[label]) for label in labels]


def _classified(records: Sequence[dict], labels: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Truth and aligned probabilities of the tumor cases that have class probabilities."""
    truth, probs = [], []
    for r in records:
        p = aligned_probabilities(r, labels)
        if r["truth"] in labels and p is not None:
            truth.append(r["truth"])
            probs.append(p)
    return truth, np.asarray(probs, dtype=float).reshape(len(probs), len(labels))


def _accuracy(records: Sequence[dict], labels: Sequence[str], n_boot: int, seed: int) -> dict:
    truth, probs = _classified(records, labels)
    y = np.array([labels.index(t) for t in truth], dtype=int)
    pred = probs.argmax(axis=1)
    flat = _bootstrap(lambda idx: {("accuracy",): _ratio((pred[idx] == y[idx]).sum(), len(idx))}, len(y), n_boot, seed)
    return {**flat[("accuracy",)], "cases": len(y)}


def _largest_support(records: Sequence[dict]) -> int:
    return max(int(r["support_per_class"]) for r in records)


def _combination_order(combination: str) -> tuple[int, str]:
    return (MODALITY_ORDER.index(combination) if combination in MODALITY_ORDER else len(MODALITY_ORDER), combination)


def by_modalities(records: Sequence[dict], *, n_boot: int = 1000, seed: int = 0) -> dict[str, dict]:
    """Accuracy per modality combination (``all``, ``ct``, ``mr``, ``xr``, …), each at that combination's
    largest support-set size: ``{combination: {"value", "ci95", "cases", "support_per_class"}}``."""
    labels = _record_labels(records)
    out = {}
    for combination in sorted({r["modalities"] for r in records}, key=_combination_order):
        subset = [r for r in records if r["modalities"] == combination]
        support = _largest_support(subset)
        chosen = [r for r in subset if int(r["support_per_class"]) == support]
        out[combination] = {**_accuracy(chosen, labels, n_boot, seed), "support_per_class": support}
    return out


def learning_curve(
    records: Sequence[dict], *, n_boot: int = 1000, seed: int = 0
) -> list[tuple[int, float | None, list[float] | None]]:
    """Accuracy of the ``all``-modality records per support-set size, smallest first:
    ``[(support_per_class, accuracy, ci95)]``, on the cases analysed at every size (so the points compare
    the same studies)."""
    labels = _record_labels(records)
    combined = [r for r in records if r["modalities"] == HEADLINE_MODALITIES]
    sizes = {int(r["support_per_class"]) for r in combined}
    at_every_size = (
        set.intersection(*({r["case"] for r in combined if int(r["support_per_class"]) == s} for s in sizes))
        if sizes
        else set()
    )
    combined = [r for r in combined if r["case"] in at_every_size]
    curve = []
    for support in sorted({int(r["support_per_class"]) for r in combined}):
        figure = _accuracy([r for r in combined if int(r["support_per_class"]) == support], labels, n_boot, seed)
        curve.append((support, figure["value"], figure["ci95"]))
    return curve


def headline_records(records: Sequence[dict]) -> list[dict]:
    """The records behind the headline figures: all modalities, at the largest support-set size."""
    combined = [r for r in records if r["modalities"] == HEADLINE_MODALITIES]
    if not combined:
        raise ValueError(f"no records with modalities {HEADLINE_MODALITIES!r} for the headline figures")
    support = _largest_support(combined)
    return [r for r in combined if int(r["support_per_class"]) == support]


def summarise(records: Sequence[dict], *, synthetic: bool, n_boot: int = 1000, seed: int = 0, bins: int = 10) -> dict:
    """The content of metrics.json: the headline classification and detection figures on the ``all``-modality
    records at the largest support size, accuracy per modality combination and the learning curve from the
    rest, with the case counts, the bootstrap settings and the versions the records name."""
    labels = _record_labels(records)
    headline = headline_records(records)
    truth, probs = _classified(headline, labels)
    classification = classification_metrics(truth, probs, labels, n_boot=n_boot, seed=seed, bins=bins)
    detection = detection_metrics(
        [r["truth"] != TUMOR_FREE for r in headline],
        [bool(r["detected"]) for r in headline],
        [float(r["detection_score"]) for r in headline],
        n_boot=n_boot,
        seed=seed,
    )
    tumor_cases = sum(r["truth"] != TUMOR_FREE for r in headline)
    return {
        "synthetic": bool(synthetic),
        "cases": len({r["case"] for r in records}),
        "records": len(records),
        "n_boot": n_boot,
        "seed": seed,
        "interval": "95 % percentile bootstrap over cases",
        "labels": labels,
        "headline": {
            "modalities": HEADLINE_MODALITIES,
            "support_per_class": int(headline[0]["support_per_class"]),
            "cases": len(headline),
            "tumor_cases": tumor_cases,
            "classified_cases": classification.pop("cases"),
            "unclassified_tumor_cases": tumor_cases - len(truth),
        },
        **classification,
        "detection": detection,
        "by_modalities": by_modalities(records, n_boot=n_boot, seed=seed),
        "learning_curve": [
            {"support_per_class": s, "value": a, "ci95": ci}
            for s, a, ci in learning_curve(records, n_boot=n_boot, seed=seed)
        ],
        "versions": {
            "cspine": cspine.__version__,
            "prototype_set": sorted({str(r.get("prototype_set_version", "")) for r in records} - {""}),
            "models": sorted({str(r.get("models", "")) for r in records} - {""}),
        },
    }
