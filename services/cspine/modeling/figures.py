"""What people look at after an evaluation: a text summary, the few-shot learning curve and
segmentation overlays (PNGs). Everything shown is SYNTHETIC and the figures say so."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from cspine.domain import Modality, SeriesRole  # noqa: E402
from cspine.inference.specs import SEG_LABELS  # noqa: E402
from cspine.modeling.evaluate import eval_cohort, onnx_seg, segment_case  # noqa: E402
from cspine.modeling.export import model_path  # noqa: E402

_SEG = {Modality.CT: "seg_ct", Modality.MR: "seg_mr", Modality.XR: "seg_xr"}


def format_metrics(metrics: dict) -> str:
    lines = ["Models on held-out SYNTHETIC data"]
    for modality, scores in metrics["seg_dice"].items():
        text = ", ".join(f"{name} {value:.3f}" for name, value in scores.items())
        lines.append(f"  Dice {modality}: {text}")
    lines.append(
        f"  lesion Dice (CT): box supervision {_f(metrics['lesion_dice_box'])}, "
        f"mask supervision {_f(metrics['lesion_dice_mask'])}; by modality (box) "
        + ", ".join(f"{m} {_f(v)}" for m, v in metrics["lesion_dice_box_by_modality"].items())
    )
    lines.append(
        f"  lesion max-diameter error (CT): {_f(metrics['lesion_size_mae_mm'])} mm "
        f"({metrics['cases_with_tumor']} of {metrics['cases']} studies with a tumor)"
    )
    lines.append(f"  few-shot, 3-way on unseen subtypes ({', '.join(metrics['unseen_subtypes'])}), fused modalities:")
    for method, by_k in metrics["fewshot"].items():
        text = ", ".join(f"K={k} {v['mean']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" for k, v in by_k.items())
        lines.append(f"    {method:9s} {text}")
    return "\n".join(lines)


def _f(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def learning_curve(metrics: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_k in metrics["fewshot"].items():
        ks = [int(k) for k in by_k]
        means = np.array([v["mean"] for v in by_k.values()])
        lo = means - np.array([v["ci95"][0] for v in by_k.values()])
        hi = np.array([v["ci95"][1] for v in by_k.values()]) - means
        ax.errorbar(ks, means, yerr=[lo, hi], marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xticks([int(k) for k in next(iter(metrics["fewshot"].values()))])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("support cases per class (K)")
    ax.set_ylabel("3-way accuracy (95% CI)")
    ax.set_ylim(0.3, 1.0)
    ax.axhline(1 / 3, color="grey", linestyle=":", label="chance")
    ax.set_title("Few-shot on unseen subtypes (SYNTHETIC)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _overlay(ax, image: np.ndarray, predicted: np.ndarray, truth_tumor: np.ndarray, title: str) -> None:
    ax.imshow(image, cmap="gray")
    shown = np.ma.masked_where(predicted == 0, predicted)
    ax.imshow(shown, cmap="tab10", alpha=0.35, vmin=0, vmax=10, interpolation="nearest")
    if truth_tumor.any():
        ax.contour(truth_tumor.astype(float), levels=[0.5], colors="red", linewidths=1.0)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def overlays(repository: Path, cache: Path, cases: list[Path], out: Path) -> list[Path]:
    """For each case: CT (axial through the lesion), T2 (sagittal) and radiograph, predicted labels in
    colour, the true lesion outlined in red."""
    models = {m: onnx_seg(model_path(repository, n)) for m, n in _SEG.items()}
    written = []
    for case_dir in cases:
        truth = json.loads((case_dir / "truth.json").read_text())
        seg = segment_case(case_dir, models)
        fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
        for ax, role in zip(axes, (SeriesRole.CT, SeriesRole.MR_T2, SeriesRole.XR), strict=True):
            modality = role.modality
            tumor = SEG_LABELS[modality].index("tumor")
            predicted, truth_labels = seg.predicted[role], seg.truth[modality]
            voxels = seg.volumes[role].voxels
            counts = (truth_labels == tumor).sum(axis=(1, 2))
            k = int(np.argmax(counts)) if counts.any() else voxels.shape[0] // 2
            image = np.clip(voxels[k], -250, 1250) if modality is Modality.CT else voxels[k]
            _overlay(ax, image, predicted[k], truth_labels[k] == tumor, f"{role.value} slice {k}")
        lesion = truth["tumor"]
        what = f"{lesion['class']} ({lesion['subtype']}) at {', '.join(lesion['levels'])}" if lesion else "no tumor"
        fig.suptitle(f"SYNTHETIC {case_dir.name}: {what}; colour = predicted labels, red = true lesion", fontsize=9)
        fig.tight_layout()
        path = out / f"overlay-{case_dir.name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def write_figures(
    metrics: dict, repository: Path, cache: Path, preset, out: Path, overlay_cases: int = 3
) -> list[Path]:
    from cspine.modeling.recipes import EVAL_SEED

    path = out / "learning_curve.png"
    learning_curve(metrics, path)
    cases = [
        c
        for c in eval_cohort(cache, EVAL_SEED, preset.eval_cases)
        if json.loads((c / "truth.json").read_text())["tumor"]
    ][:overlay_cases]
    return [path, *overlays(repository, cache, cases, out)]
