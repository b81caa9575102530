"""The clinical validation report: metrics.json, predictions.csv and a self-contained report.html (plots
embedded as PNG, no external resources) that a hospital's committee can read and keep."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import jinja2
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

import cspine
from cspine.evaluation.clinical import aligned_probabilities

logger = logging.getLogger(__name__)

METRICS_FILE, PREDICTIONS_FILE, REPORT_FILE = "metrics.json", "predictions.csv", "report.html"

MODALITY_NAMES = {
    "all": "CT + MR + lateral radiograph",
    "ct": "CT alone",
    "mr": "MR alone",
    "xr": "Lateral radiograph alone",
}
SYNTHETIC_WARNING = "these figures are measured on SYNTHETIC phantom data, not patients"
_PNG_METADATA = {"Software": None}  # no tool URL inside the embedded images

# ------------------------------------------------------------------------------------------------------
# Files


def _write_metrics(metrics: dict, path: Path) -> None:
    # allow_nan=False: a NaN that slipped through is a bug to see here, not an invalid JSON file for the reader
    path.write_text(json.dumps(metrics, indent=2, allow_nan=False) + "\n")


def _write_predictions(records: list[dict], labels: list[str], path: Path) -> None:
    columns = ["case", "truth", *(f"p_{label}" for label in labels), "detected", "detection_score"]
    columns += ["modalities", "support_per_class", "prototype_set_version", "models"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in records:
            probs: Sequence[float | None] = aligned_probabilities(r, labels) or [None] * len(labels)
            writer.writerow(
                [
                    r["case"],
                    r["truth"],
                    *("" if p is None else f"{p:.6g}" for p in probs),
                    str(bool(r["detected"])).lower(),
                    f"{float(r['detection_score']):.6g}",
                    r["modalities"],
                    r["support_per_class"],
                    r.get("prototype_set_version", ""),
                    r.get("models", ""),
                ]
            )


# ------------------------------------------------------------------------------------------------------
# Plots (matplotlib's Agg canvas through Figure; pyplot's global state is never touched)


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata=_PNG_METADATA)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _confusion_plot(confusion: dict) -> str:
    labels, matrix = confusion["labels"], np.asarray(confusion["matrix"])
    fig = Figure(figsize=(4.6, 3.9))
    ax = fig.add_subplot()
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    for (i, j), count in np.ndenumerate(matrix):
        dark = count > 0.6 * max(int(matrix.max()), 1)
        ax.text(j, i, str(count), ha="center", va="center", fontsize=13, color="white" if dark else "black")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("cspine prediction")
    ax.set_ylabel("Reference diagnosis")
    ax.set_title("Confusion matrix (cases)")
    return _png(fig)


def _roc_axes(title: str) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="chance (AUC 0.5)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("Sensitivity (true positive rate)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig, ax


def _roc_plot(roc: dict, per_class: dict) -> str:
    fig, ax = _roc_axes("ROC curves, each class against the rest")
    for label, curve in roc.items():
        if curve is None:
            continue
        auc = per_class[label]["auc"]["value"]
        ax.plot(curve["fpr"], curve["tpr"], linewidth=2, label=f"{label} (AUC {auc:.2f})")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _detection_plot(detection: dict) -> str:
    fig, ax = _roc_axes("Tumor detection ROC")
    if detection.get("roc"):
        auc = detection["auc"]["value"]
        ax.plot(detection["roc"]["fpr"], detection["roc"]["tpr"], linewidth=2, label=f"detection (AUC {auc:.2f})")
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def _reliability_plot(bins: list[dict], ece: dict) -> str:
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    filled = [b for b in bins if b["count"]]
    centres = [(b["lower"] + b["upper"]) / 2 for b in filled]
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    ax.bar(centres, [b["accuracy"] for b in filled], width=width * 0.9, color="#4c78a8", label="accuracy in bin")
    ax.plot(centres, [b["confidence"] for b in filled], "o", color="#e45756", label="mean confidence in bin")
    for x, b in zip(centres, filled, strict=True):
        ax.text(x, min(b["accuracy"], 0.93) + 0.02, f"n={b['count']}", ha="center", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("Confidence of the predicted class")
    ax.set_ylabel("Fraction correct")
    ax.set_title(f"Reliability diagram — ECE {_decimal(ece)}")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def _learning_plot(curve: list[dict]) -> str:
    fig = Figure(figsize=(5.2, 3.8))
    ax = fig.add_subplot()
    points = [p for p in curve if p["value"] is not None]
    x = [p["support_per_class"] for p in points]
    y = [p["value"] for p in points]
    lo = [p["value"] - p["ci95"][0] if p["ci95"] else 0.0 for p in points]
    hi = [p["ci95"][1] - p["value"] if p["ci95"] else 0.0 for p in points]
    ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=4, linewidth=2, color="#4c78a8")
    ax.set_xticks(x)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Support cases per class")
    ax.set_ylabel("Accuracy (95 % CI)")
    ax.set_title("Learning curve, all modalities")
    ax.grid(alpha=0.3)
    return _png(fig)


# ------------------------------------------------------------------------------------------------------
# The page


def _percent(figure: dict | None) -> str:
    if not figure or figure.get("value") is None:
        return "n/a"
    ci = figure.get("ci95")
    text = f"{100 * figure['value']:.1f} %"
    return f"{text} ({100 * ci[0]:.1f}–{100 * ci[1]:.1f})" if ci else text


def _decimal(figure: dict | None) -> str:
    if not figure or figure.get("value") is None:
        return "n/a"
    ci = figure.get("ci95")
    text = f"{figure['value']:.3f}"
    return f"{text} ({ci[0]:.3f}–{ci[1]:.3f})" if ci else text


_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{ title }}</title>
<style>
  body { font-family: "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; color: #1b1b1b; background: #fff;
         max-width: 1100px; margin: 0 auto; padding: 24px; line-height: 1.45; }
  h1 { font-size: 26px; margin: 0 0 4px 0; }
  h2 { font-size: 20px; border-bottom: 2px solid #d0d7de; padding-bottom: 4px; margin-top: 32px; }
  .banner { background: #b00020; color: #fff; font-weight: bold; font-size: 18px; padding: 14px 18px;
            border-radius: 4px; margin: 12px 0 18px 0; }
  .meta { color: #444; font-size: 14px; }
  .meta td { padding: 1px 12px 1px 0; vertical-align: top; }
  table.figures { border-collapse: collapse; margin: 8px 0; font-size: 14px; }
  table.figures th, table.figures td { border: 1px solid #c8ccd0; padding: 6px 10px; text-align: right; }
  table.figures th { background: #eef2f6; }
  table.figures td.name, table.figures th.name { text-align: left; }
  .key { display: inline-block; background: #eef2f6; border-radius: 4px; padding: 10px 16px; margin: 4px 12px 4px 0; }
  .key b { font-size: 22px; display: block; }
  .plots { display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
  .plots img { border: 1px solid #e1e4e8; max-width: 100%; }
  .note { color: #444; font-size: 13px; }
  code { background: #f3f4f6; padding: 1px 4px; }
  @media print { .banner { -webkit-print-color-adjust: exact; print-color-adjust: exact; } }
</style>
</head>
<body>
<h1>{{ title }}</h1>
{% if synthetic %}<div class="banner">SYNTHETIC DATA — {{ synthetic_warning }}.
They say nothing about performance on patients.</div>{% endif %}
<table class="meta">
  <tr><td>Report date</td><td>{{ date }}</td></tr>
  <tr><td>cspine version</td><td>{{ versions.cspine }}</td></tr>
  <tr><td>Prototype set</td><td>{{ versions.prototype_set | join(", ") or "not recorded" }}</td></tr>
  <tr><td>Models</td><td>{% for m in versions.models %}{{ m }}<br>{% else %}not recorded{% endfor %}</td></tr>
  <tr><td>Cases</td><td>{{ metrics.cases }} cases ({{ metrics.records }} prediction records)</td></tr>
</table>

<h2>Headline figures</h2>
<p class="note">{{ headline.cases }} cases analysed with {{ modality_names.get(headline.modalities,
headline.modalities) }} and {{ headline.support_per_class }} support cases per class; {{ headline.tumor_cases }}
of them have a tumor, {{ headline.classified_cases }} were classified.{% if headline.unclassified_tumor_cases %}
{{ headline.unclassified_tumor_cases }} tumor case(s) received no class probabilities and are counted only in
the detection figures.{% endif %} Brackets give the {{ metrics.interval }} ({{ metrics.n_boot }} resamples).
Each class is judged against the rest; "n/a" marks a figure the data cannot define (e.g. no case of that class).</p>
<div>
  <span class="key">Accuracy<b>{{ metrics.accuracy | percent }}</b></span>
  <span class="key">Tumor detection sensitivity<b>{{ detection.sensitivity | percent }}</b></span>
  <span class="key">Tumor detection specificity<b>{{ detection.specificity | percent }}</b></span>
  <span class="key">Calibration error (ECE)<b>{{ metrics.ece | decimal }}</b></span>
</div>
<table class="figures">
  <tr><th class="name">Class</th><th>Cases</th><th>Sensitivity</th><th>Specificity</th><th>PPV</th><th>NPV</th>
      <th>AUC</th></tr>
  {% for label in metrics.labels %}{% set c = metrics.per_class[label] %}
  <tr><td class="name">{{ label }}</td><td>{{ c.cases }}</td><td>{{ c.sensitivity | percent }}</td>
      <td>{{ c.specificity | percent }}</td><td>{{ c.ppv | percent }}</td><td>{{ c.npv | percent }}</td>
      <td>{{ c.auc | decimal }}</td></tr>
  {% endfor %}
</table>

<h2>Confusion matrix and ROC curves</h2>
<div class="plots">
  <img alt="confusion matrix" src="data:image/png;base64,{{ plots.confusion }}">
  <img alt="ROC curves one-vs-rest" src="data:image/png;base64,{{ plots.roc }}">
</div>
<table class="figures">
  <tr><th class="name">Reference \\ prediction</th>
      {% for label in confusion.labels %}<th>{{ label }}</th>{% endfor %}</tr>
  {% for row in confusion.matrix %}<tr><td class="name">{{ confusion.labels[loop.index0] }}</td>
  {% for count in row %}<td>{{ count }}</td>{% endfor %}</tr>{% endfor %}
</table>

<h2>Calibration</h2>
<p class="note">Does a stated confidence of 80 % mean right 8 times in 10? Bars show the fraction correct per
confidence bin, dots the mean stated confidence; the expected calibration error (ECE) is their case-weighted
mean gap.</p>
<div class="plots"><img alt="reliability diagram" src="data:image/png;base64,{{ plots.reliability }}"></div>

<h2>Tumor detection</h2>
<div class="plots">
  <table class="figures">
    <tr><th class="name">Figure</th><th>Value (95 % CI)</th></tr>
    <tr><td class="name">Cases (with tumor)</td><td>{{ detection.cases }} ({{ detection.tumor_cases }})</td></tr>
    <tr><td class="name">Sensitivity</td><td>{{ detection.sensitivity | percent }}</td></tr>
    <tr><td class="name">Specificity</td><td>{{ detection.specificity | percent }}</td></tr>
    <tr><td class="name">AUC of the detection score</td><td>{{ detection.auc | decimal }}</td></tr>
  </table>
  <img alt="detection ROC" src="data:image/png;base64,{{ plots.detection }}">
</div>

<h2>By modality combination</h2>
<table class="figures">
  <tr><th class="name">Images available</th><th>Support per class</th><th>Classified cases</th>
      <th>Accuracy (95 % CI)</th></tr>
  {% for key, m in metrics.by_modalities.items() %}
  <tr><td class="name">{{ modality_names.get(key, key) }}</td><td>{{ m.support_per_class }}</td><td>{{ m.cases }}</td>
      <td>{{ m | percent }}</td></tr>
  {% endfor %}
</table>

<h2>Learning curve</h2>
<p class="note">Accuracy with all modalities as the support set grows (cases per class).</p>
<div class="plots">
  {% if plots.learning %}<img alt="learning curve" src="data:image/png;base64,{{ plots.learning }}">{% endif %}
  <table class="figures">
    <tr><th>Support per class</th><th>Accuracy (95 % CI)</th></tr>
    {% for p in metrics.learning_curve %}<tr><td>{{ p.support_per_class }}</td><td>{{ p | percent }}</td></tr>
    {% endfor %}
  </table>
</div>

<h2>Method and files</h2>
<p class="note">Reference: the recorded diagnosis of each case ({% if synthetic %}the phantom's truth{% else
%}postoperative pathology{% endif %}). Predicted class: the most probable of the fused class probabilities.
Intervals: {{ metrics.interval }}, {{ metrics.n_boot }} resamples, seed {{ metrics.seed }}. The figures are in
<code>{{ files.metrics }}</code>, every case's prediction in <code>{{ files.predictions }}</code>.</p>
</body>
</html>
"""


def _render(metrics: dict, title: str, synthetic: bool, plots: dict[str, str]) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True)
    env.filters["percent"], env.filters["decimal"] = _percent, _decimal
    versions = metrics.get("versions") or {"cspine": cspine.__version__, "prototype_set": [], "models": []}
    return env.from_string(_TEMPLATE).render(
        title=title,
        synthetic=synthetic,
        synthetic_warning=SYNTHETIC_WARNING,
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions,
        metrics=metrics,
        headline=metrics["headline"],
        detection=metrics["detection"],
        confusion=metrics["confusion"],
        modality_names=MODALITY_NAMES,
        plots=plots,
        files={"metrics": METRICS_FILE, "predictions": PREDICTIONS_FILE},
    )


def write_report(metrics: dict, records: list[dict], out_dir: Path, *, title: str, synthetic: bool) -> dict[str, Path]:
    """Write ``metrics.json`` (``metrics`` as ``clinical.summarise`` gives it), ``predictions.csv`` (one row per
    record, one probability column per class) and ``report.html`` into ``out_dir``. The SYNTHETIC banner shows
    when ``synthetic`` or ``metrics["synthetic"]`` says so. Returns ``{"metrics", "predictions", "report"}``
    paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    synthetic = bool(synthetic or metrics.get("synthetic"))
    paths = {
        "metrics": out_dir / METRICS_FILE,
        "predictions": out_dir / PREDICTIONS_FILE,
        "report": out_dir / REPORT_FILE,
    }
    _write_metrics(metrics, paths["metrics"])
    _write_predictions(records, list(metrics["labels"]), paths["predictions"])
    plots = {
        "confusion": _confusion_plot(metrics["confusion"]),
        "roc": _roc_plot(metrics["roc"], metrics["per_class"]),
        "reliability": _reliability_plot(metrics["reliability"], metrics["ece"]),
        "detection": _detection_plot(metrics["detection"]),
        "learning": _learning_plot(metrics["learning_curve"]) if metrics["learning_curve"] else "",
    }
    paths["report"].write_text(_render(metrics, title, synthetic, plots), encoding="utf-8")
    logger.info("clinical report written to %s (%d records)", out_dir, len(records))
    return paths
