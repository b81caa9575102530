"""Clinical validation metrics against hand-computed values, and the report: its three files, self-contained
HTML, and a headless Chromium rendering that is not blank."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cspine.evaluation.clinical import (
    by_modalities,
    classification_metrics,
    confusion,
    detection_metrics,
    expected_calibration_error,
    headline_records,
    learning_curve,
    reliability,
    summarise,
)
from cspine.evaluation.clinical_report import SYNTHETIC_WARNING, write_report

LABELS = ["benign", "borderline", "malignant"]
B, D, M = LABELS

# Ten cases: truth and prediction, worked by hand below.
TEN_TRUTH = [B, B, B, B, M, M, M, D, D, D]
TEN_PRED = [B, B, B, D, M, M, B, D, D, B]


def _probs_predicting(pred: list[str], labels: list[str] = LABELS, top: float = 0.7) -> np.ndarray:
    rest = (1 - top) / (len(labels) - 1)
    probs = np.full((len(pred), len(labels)), rest)
    probs[np.arange(len(pred)), [labels.index(p) for p in pred]] = top
    return probs


def _figure_values(node):
    """Every {"value", "ci95"} figure in a nested metrics dict."""
    if isinstance(node, dict):
        if "value" in node and "ci95" in node:
            yield node
        for child in node.values():
            yield from _figure_values(child)
    elif isinstance(node, list):
        for child in node:
            yield from _figure_values(child)


# ------------------------------------------------------------------------------------------------------
# Classification


def test_classification_metrics_match_hand_computed_ten_case_example():
    m = classification_metrics(TEN_TRUTH, _probs_predicting(TEN_PRED), LABELS, n_boot=200)
    # benign: TP 3 (cases 1-3), FN 1 (case 4 called borderline), FP 2 (cases 7 and 10 called benign), TN 4
    # borderline: TP 2 (8, 9), FN 1 (case 10), FP 1 (case 4), TN 6; malignant: TP 2 (5, 6), FN 1 (case 7), FP 0, TN 7
    expected = {
        B: {"sensitivity": 3 / 4, "specificity": 4 / 6, "ppv": 3 / 5, "npv": 4 / 5},
        D: {"sensitivity": 2 / 3, "specificity": 6 / 7, "ppv": 2 / 3, "npv": 6 / 7},
        M: {"sensitivity": 2 / 3, "specificity": 7 / 7, "ppv": 2 / 2, "npv": 7 / 8},
    }
    assert m["cases"] == 10
    assert m["accuracy"]["value"] == pytest.approx(7 / 10)
    for label, figures in expected.items():
        for name, value in figures.items():
            assert m["per_class"][label][name]["value"] == pytest.approx(value), (label, name)
    assert [m["per_class"][label]["cases"] for label in LABELS] == [4, 3, 3]
    assert m["confusion"] == {"labels": LABELS, "matrix": [[3, 1, 0], [1, 2, 0], [1, 0, 2]]}


def test_classification_ignores_tumor_free_cases():
    truth = TEN_TRUTH + ["none", "none"]
    probs = np.vstack([_probs_predicting(TEN_PRED), _probs_predicting([M, M])])
    m = classification_metrics(truth, probs, LABELS, n_boot=50)
    assert m["cases"] == 10
    assert m["accuracy"]["value"] == pytest.approx(0.7)


def test_auc_is_one_when_separable_three_quarters_with_one_swap_and_half_when_scores_tie():
    truth = ["a", "a", "b", "b"]
    separable = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.2, 0.8]])
    one_swap = np.array([[0.9, 0.1], [0.4, 0.6], [0.6, 0.4], [0.2, 0.8]])  # 3 of 4 (a, b) pairs in order
    tied = np.full((4, 2), 0.5)
    auc = {
        name: classification_metrics(truth, probs, ["a", "b"], n_boot=50)["per_class"]["a"]["auc"]["value"]
        for name, probs in (("separable", separable), ("one_swap", one_swap), ("tied", tied))
    }
    assert auc == pytest.approx({"separable": 1.0, "one_swap": 0.75, "tied": 0.5})


def test_undefined_figures_are_none_with_no_interval_and_serialise_without_nan():
    # no borderline case and none predicted borderline: its sensitivity, PPV and AUC do not exist
    m = classification_metrics([B, B, M, M], _probs_predicting([B, M, M, M]), LABELS, n_boot=100)
    borderline = m["per_class"][D]
    for name in ("sensitivity", "ppv", "auc"):
        assert borderline[name] == {"value": None, "ci95": None}, name
    assert borderline["specificity"]["value"] == 1.0 and borderline["npv"]["value"] == 1.0
    assert m["roc"][D] is None
    json.dumps(m, allow_nan=False)  # raises on NaN

    empty = classification_metrics([], np.zeros((0, 3)), LABELS, n_boot=100)
    assert empty["cases"] == 0 and empty["accuracy"] == {"value": None, "ci95": None}
    json.dumps(empty, allow_nan=False)


def test_intervals_contain_the_estimate_and_are_reproducible_with_the_same_seed():
    rng = np.random.default_rng(5)
    truth = [LABELS[i] for i in rng.integers(0, 3, 60)]
    probs = rng.dirichlet([1, 1, 1], 60)
    probs[np.arange(60), [LABELS.index(t) for t in truth]] += 0.6  # informative, not perfect
    probs /= probs.sum(axis=1, keepdims=True)
    first = classification_metrics(truth, probs, LABELS, n_boot=300, seed=11)
    again = classification_metrics(truth, probs, LABELS, n_boot=300, seed=11)
    other = classification_metrics(truth, probs, LABELS, n_boot=300, seed=12)
    assert first == again
    assert first["accuracy"]["ci95"] != other["accuracy"]["ci95"]
    figures = list(_figure_values(first))
    assert len(figures) == 2 + 5 * len(LABELS)  # accuracy, ece, five per class
    for figure in figures:
        lo, hi = figure["ci95"]
        assert lo <= figure["value"] <= hi, figure
        assert 0.0 <= lo <= hi <= 1.0


def test_confusion_counts_truth_rows_and_prediction_columns():
    assert confusion([B, M, M], [M, M, B], [B, M]) == {"labels": [B, M], "matrix": [[0, 1], [1, 1]]}


# ------------------------------------------------------------------------------------------------------
# Calibration


def test_ece_on_a_two_bin_example():
    # top-label confidences 0.4, 0.4 (bin 0–0.5, accuracy 1/2) and 0.9, 0.7 (bin 0.5–1, accuracy 1/2):
    # ECE = 2/4 · |0.5 − 0.4| + 2/4 · |0.5 − 0.8| = 0.05 + 0.15 = 0.2
    probs = np.array([[0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.9, 0.05, 0.05], [0.1, 0.7, 0.2]])
    truth_idx = np.array([0, 0, 0, 0])
    assert expected_calibration_error(probs, truth_idx, bins=2) == pytest.approx(0.2)
    table = reliability(probs, truth_idx, bins=2)
    assert [(b["lower"], b["upper"], b["count"]) for b in table] == [(0.0, 0.5, 2), (0.5, 1.0, 2)]
    assert [b["confidence"] for b in table] == pytest.approx([0.4, 0.8])
    assert [b["accuracy"] for b in table] == pytest.approx([0.5, 0.5])


def test_reliability_puts_a_bin_edge_confidence_in_the_lower_bin_and_leaves_empty_bins_undefined():
    table = reliability(np.array([[0.3, 0.7], [0.7, 0.3], [1.0, 0.0]]), np.array([1, 1, 0]), bins=10)
    assert [b["count"] for b in table] == [0, 0, 0, 0, 0, 0, 2, 0, 0, 1]
    assert table[0]["confidence"] is None and table[0]["accuracy"] is None
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0, dtype=int)) is None


# ------------------------------------------------------------------------------------------------------
# Detection


def test_detection_metrics_match_hand_computed_values():
    # tumors: 3, two detected; tumor-free: 2, one flagged. Score pairs (tumor > tumor-free): 4 of 6.
    m = detection_metrics(
        [True, True, True, False, False], [True, True, False, False, True], [0.9, 0.8, 0.3, 0.2, 0.85], n_boot=200
    )
    assert m["cases"] == 5 and m["tumor_cases"] == 3
    assert m["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert m["specificity"]["value"] == pytest.approx(1 / 2)
    assert m["auc"]["value"] == pytest.approx(4 / 6)
    for name in ("sensitivity", "specificity", "auc"):
        lo, hi = m[name]["ci95"]
        assert lo <= m[name]["value"] <= hi
    assert m["roc"]["fpr"][0] == 0.0 and m["roc"]["tpr"][-1] == 1.0


def test_detection_without_tumor_free_cases_has_no_specificity_or_auc():
    m = detection_metrics([True, True], [True, False], [0.9, 0.1], n_boot=50)
    assert m["sensitivity"]["value"] == 0.5
    assert m["specificity"] == {"value": None, "ci95": None} and m["auc"] == {"value": None, "ci95": None}
    assert m["roc"] is None


def test_detection_rejects_non_finite_scores():
    with pytest.raises(ValueError, match="finite"):
        detection_metrics([True, False], [True, False], [0.9, float("nan")], n_boot=10)


# ------------------------------------------------------------------------------------------------------
# Records


def _record(case: str, truth: str, probs: list[float], modalities: str = "all", support: int = 5, **kw) -> dict:
    return {
        "case": case,
        "truth": truth,
        "labels": kw.get("labels", LABELS),
        "probabilities": probs,
        "detected": kw.get("detected", truth != "none"),
        "detection_score": kw.get("score", 0.9 if truth != "none" else 0.1),
        "modalities": modalities,
        "support_per_class": support,
        "prototype_set_version": "v4",
        "models": "seg_ct:1 (sha256:0a1b); embed:3 (sha256:2c3d)",
    }


def synthetic_records(seed: int = 3, cases: int = 24) -> list[dict]:
    """A made-up evaluation: every case under four modality combinations, ``all`` at three support sizes;
    accuracy grows with the support size. A quarter of the cases are tumor-free."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(cases):
        truth = (LABELS + ["none"])[i % 4]
        for modalities, supports in (("all", (1, 3, 5)), ("ct", (5,)), ("mr", (5,)), ("xr", (5,))):
            for support in supports:
                logits = rng.normal(0.0, 1.0, len(LABELS))
                if truth != "none":
                    logits[LABELS.index(truth)] += 0.6 * support
                probs = np.exp(logits) / np.exp(logits).sum()
                score = float(np.clip(rng.normal(0.75 if truth != "none" else 0.3, 0.2), 0, 1))
                records.append(
                    _record(
                        f"case-{i:04d}", truth, probs.tolist(), modalities, support, score=score, detected=score > 0.5
                    )
                )
    return records


def test_summarise_headline_is_the_all_modality_records_at_the_largest_support():
    records = synthetic_records()
    metrics = summarise(records, synthetic=True, n_boot=100)
    headline = headline_records(records)
    assert {r["modalities"] for r in headline} == {"all"} and {r["support_per_class"] for r in headline} == {5}
    classified = [r for r in headline if r["truth"] != "none"]
    direct = classification_metrics(
        [r["truth"] for r in classified], np.array([r["probabilities"] for r in classified]), LABELS, n_boot=100
    )
    assert metrics["accuracy"] == direct["accuracy"] and metrics["per_class"] == direct["per_class"]
    assert metrics["headline"] == {
        "modalities": "all",
        "support_per_class": 5,
        "cases": 24,
        "tumor_cases": 18,
        "classified_cases": 18,
        "unclassified_tumor_cases": 0,
    }
    assert metrics["detection"]["cases"] == 24 and metrics["detection"]["tumor_cases"] == 18
    assert metrics["synthetic"] is True and metrics["cases"] == 24 and metrics["n_boot"] == 100
    assert metrics["versions"]["prototype_set"] == ["v4"]


def test_by_modalities_and_learning_curve_use_the_other_records():
    records = synthetic_records()
    table = by_modalities(records, n_boot=50)
    assert list(table) == ["all", "ct", "mr", "xr"]
    assert all(entry["cases"] == 18 and entry["support_per_class"] == 5 for entry in table.values())
    curve = learning_curve(records, n_boot=50)
    assert [support for support, _, _ in curve] == [1, 3, 5]
    assert curve[0][1] < curve[-1][1]  # the made-up classifier improves with support
    for _, accuracy, (lo, hi) in curve:
        assert lo <= accuracy <= hi


def test_records_with_another_class_order_are_aligned_by_label():
    reordered = [M, B, D]
    records = [
        _record("c1", B, [0.8, 0.1, 0.1]),
        _record("c2", M, [0.7, 0.2, 0.1], labels=reordered),  # malignant first: a correct call
        _record("c3", "none", []),
    ]
    metrics = summarise(records, synthetic=False, n_boot=20)
    assert metrics["accuracy"]["value"] == 1.0
    assert metrics["headline"]["classified_cases"] == 2


def test_unclassified_tumor_cases_are_counted_apart():
    records = [_record("c1", B, [0.8, 0.1, 0.1]), _record("c2", M, [], detected=False, score=0.2)]
    metrics = summarise(records, synthetic=False, n_boot=20)
    assert metrics["headline"]["unclassified_tumor_cases"] == 1
    assert metrics["detection"]["sensitivity"]["value"] == 0.5


def test_summarise_rejects_an_unknown_truth_naming_the_case():
    with pytest.raises(ValueError, match="case-x.*'malingant'"):
        summarise([_record("case-x", "malingant", [0.1, 0.1, 0.8])], synthetic=True, n_boot=10)


# ------------------------------------------------------------------------------------------------------
# The report


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict[str, Path], list[dict]]:
    records = synthetic_records()
    metrics = summarise(records, synthetic=True, n_boot=200)
    out = tmp_path_factory.mktemp("clinical-report")
    return write_report(metrics, records, out, title="cspine clinical validation", synthetic=True), records


def test_report_writes_metrics_predictions_and_html(report):
    paths, records = report
    assert {p.name for p in paths.values()} == {"metrics.json", "predictions.csv", "report.html"}
    metrics = json.loads(paths["metrics"].read_text(), parse_constant=lambda c: pytest.fail(f"{c} in metrics.json"))
    for key in ("accuracy", "per_class", "ece", "detection", "by_modalities", "learning_curve", "cases", "synthetic"):
        assert key in metrics, key
    for label in LABELS:
        for name in ("sensitivity", "specificity", "ppv", "npv", "auc"):
            assert set(metrics["per_class"][label][name]) == {"value", "ci95"}

    with paths["predictions"].open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records)
    assert list(rows[0])[:5] == ["case", "truth", "p_benign", "p_borderline", "p_malignant"]
    assert float(rows[0]["p_benign"]) == pytest.approx(records[0]["probabilities"][0], rel=1e-5)
    assert rows[0]["models"] == records[0]["models"]


def test_report_html_is_self_contained_embeds_plots_and_carries_the_synthetic_banner(report):
    paths, _ = report
    html = paths["report"].read_text()
    assert not re.search(r"https?://", html), "report.html refers to an external resource"
    assert not re.search(r"""(src|href)=["'](?!data:)""", html), "report.html loads a file"
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(images) >= 5  # confusion, ROC, reliability, detection, learning curve
    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert SYNTHETIC_WARNING in html and "0.1.0" in html and "v4" in html


def test_report_without_synthetic_data_has_no_banner(tmp_path):
    records = [_record("c1", B, [0.8, 0.1, 0.1]), _record("c2", M, [0.1, 0.2, 0.7]), _record("c3", "none", [])]
    paths = write_report(summarise(records, synthetic=False, n_boot=20), records, tmp_path, title="t", synthetic=False)
    assert "SYNTHETIC" not in paths["report"].read_text()


def test_headless_chromium_renders_the_report_as_a_non_blank_page(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed: `make sysdeps` installs it")
    paths, _ = report
    shot = tmp_path / "report.png"
    # Chromium ≥ 132 only has the new headless mode, which plain --headless selects
    command = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,1600",
        paths["report"].resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), done.stderr[-2000:]
    grey = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert grey.shape == (1600, 1200)
    assert grey.std() > 20, f"screenshot is nearly one colour (std {grey.std():.1f})"
    assert (grey < 240).mean() > 0.05, f"only {100 * (grey < 240).mean():.1f} % of the page is not white"
