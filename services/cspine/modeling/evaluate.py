"""Evaluation of the models on held-out SYNTHETIC data (seeds disjoint from training).

- Segmentation: held-out phantom studies go through DICOM, ingest and the same preprocessing as in
  serving; the models' label maps are mapped back to each source series and compared with the
  phantom's label maps: Dice per structure and modality, lesion Dice of box- and mask-supervised CT
  models, and the error of the lesion's maximum diameter measured on the CT prediction.
- Few-shot: 3-way (benign / borderline / malignant) episodes drawn from lesions of the subtypes held out
  of meta-training; K support lesions per class, 10 queries per class. The prototype method embeds with
  the shipped ``lesion_embed`` and classifies with ``proto_classify``; the baseline fine-tunes the
  conventionally trained encoder's last block and a new linear head on the same support set. Each
  modality gives probabilities; the fused answer multiplies them (sums log-probabilities).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from cspine.analysis.lesions import clean_tumor_labels
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality, SeriesRole
from cspine.imaging.seg_input import seg_inputs, to_source
from cspine.inference.runner import onnx_session
from cspine.inference.specs import MODALITY_ORDER, SEG_LABELS
from cspine.modeling.data import CLASSES, SEG_ROLES, LesionBank, model_labels
from cspine.modeling.networks import BaselineClassifier
from cspine.phantom.generate import PhantomOptions, generate_case
from cspine.shapes import feret_diameter

logger = logging.getLogger(__name__)

SegModel = Callable[[np.ndarray], np.ndarray]  # inputs [B, C, S, S] float32 → labels [B, S, S] uint8
EmbedModel = Callable[[np.ndarray, np.ndarray], np.ndarray]  # rois, one-hot modality → embeddings
BATCH = 32


def onnx_seg(path: Path) -> SegModel:
    session = onnx_session(path)

    def run(inputs: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [session.run(None, {"image": inputs[i : i + BATCH]})[0] for i in range(0, len(inputs), BATCH)]
        )

    return run


def torch_seg(net: torch.nn.Module) -> SegModel:
    def run(inputs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = [net(torch.from_numpy(inputs[i : i + BATCH])).argmax(1) for i in range(0, len(inputs), BATCH)]
        return torch.cat(out).numpy().astype(np.uint8)

    return run


def onnx_embed(path: Path) -> EmbedModel:
    session = onnx_session(path)

    def run(rois: np.ndarray, modality: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                session.run(None, {"roi": rois[i : i + BATCH], "modality": modality[i : i + BATCH]})[0]
                for i in range(0, len(rois), BATCH)
            ]
        )

    return run


# --------------------------------------------------------------------------------------------------------
# Segmentation


def eval_cohort(cache: Path, seed: int, count: int) -> list[Path]:
    """Held-out SYNTHETIC studies written as DICOM (kept in the cache: evaluation runs again)."""
    folder = cache / "eval-cohort" / f"seed{seed}"
    paths = []
    for index in range(count):
        case_dir = folder / f"case-{index:04d}"
        if not (case_dir / "truth.json").exists():
            generate_case(case_dir, f"eval-{index:04d}", seed, index, PhantomOptions(tumor="random"))
        paths.append(case_dir)
    return paths


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return float(2.0 * np.logical_and(pred, truth).sum() / total) if total else 1.0


@dataclass
class CaseSegmentation:
    """A case's predictions per series role, on each source grid (tumor specks below the minimum lesion
    size removed, as the pipeline does), with the truth in the same table."""

    predicted: dict[SeriesRole, np.ndarray]
    truth: dict[Modality, np.ndarray]
    volumes: dict


def segment_case(case_dir: Path, models: dict[Modality, SegModel]) -> CaseSegmentation:
    study = ingest_paths([case_dir / f for f in ("ct", "mr", "xr") if (case_dir / f).exists()])
    chosen = select_series(study).chosen
    with np.load(case_dir / "labels.npz") as npz:
        phantom = {k: npz[k] for k in npz.files}
    predicted, truth, volumes = {}, {}, {}
    for modality, model in models.items():
        key = modality.value.lower()
        structure, levels = phantom[f"{key}_labels"], phantom[f"{key}_levels"]
        if modality is Modality.XR:
            structure, levels = structure[None], levels[None]
        truth[modality] = model_labels(modality, structure, levels)
        for role in SEG_ROLES[modality]:
            volume = chosen[role].volume
            assert volume is not None  # select_series chooses only series with a volume
            inputs, grid = seg_inputs(modality, volume)
            labels = to_source(model(inputs), grid)
            tumor = SEG_LABELS[modality].index("tumor")
            predicted[role] = clean_tumor_labels(labels, tumor, volume.spacing, volume.projection)
            volumes[role] = volume
    return CaseSegmentation(predicted, truth, volumes)


def seg_metrics(cases: list[Path], models: dict[Modality, SegModel], mask_ct: SegModel | None) -> dict:
    """Dice per structure per modality (mean over cases holding the structure), lesion Dice with box and
    mask supervision (CT), and the lesion max-diameter absolute error on CT (mm)."""
    scores: dict[Modality, dict[str, list[float]]] = {m: {} for m in models}
    lesion_box: dict[Modality, list[float]] = {m: [] for m in models}
    lesion_mask: list[float] = []
    size_errors: list[float] = []
    for case_dir in cases:
        seg = segment_case(case_dir, models)
        truth_json = _truth(case_dir)
        for role, labels in seg.predicted.items():
            modality = role.modality
            names = SEG_LABELS[modality]
            truth = seg.truth[modality]
            for index, name in enumerate(names[1:], start=1):
                if (truth == index).any():
                    scores[modality].setdefault(name, []).append(dice(labels == index, truth == index))
            tumor = names.index("tumor")
            if (truth == tumor).any():
                lesion_box[modality].append(dice(labels == tumor, truth == tumor))
        if truth_json["tumor"] is not None and Modality.CT in models:
            ct_tumor = SEG_LABELS[Modality.CT].index("tumor")
            size_errors.append(
                abs(
                    _largest_diameter(seg.predicted[SeriesRole.CT] == ct_tumor, seg.volumes[SeriesRole.CT])
                    - truth_json["tumor"]["max_diameter_mm"]
                )
            )
            if mask_ct is not None:
                masked = segment_case(case_dir, {Modality.CT: mask_ct})
                truth = masked.truth[Modality.CT] == ct_tumor
                lesion_mask.append(dice(masked.predicted[SeriesRole.CT] == ct_tumor, truth))
    seg_dice = {
        m.value.lower(): {name: round(float(np.mean(v)), 4) for name, v in s.items() if name != "tumor"}
        for m, s in scores.items()
    }
    return {
        "seg_dice": seg_dice,
        "lesion_dice_box": _mean(lesion_box.get(Modality.CT, [])),
        "lesion_dice_box_by_modality": {m.value.lower(): _mean(v) for m, v in lesion_box.items()},
        "lesion_dice_mask": _mean(lesion_mask) if mask_ct is not None else None,
        "lesion_size_mae_mm": _mean(size_errors),
        "cases": len(cases),
        "cases_with_tumor": len(size_errors),
    }


def _truth(case_dir: Path) -> dict:
    import json

    return json.loads((case_dir / "truth.json").read_text())


def _mean(values: list[float]) -> float | None:
    return round(float(np.mean(values)), 4) if values else None


def _largest_diameter(mask: np.ndarray, volume) -> float:
    """Feret diameter (mm) of the largest connected lesion of a predicted mask; 0 when there is none."""
    if not mask.any():
        return 0.0
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    sizes = ndimage.sum_labels(mask, components, index=np.arange(1, count + 1))
    kij = np.argwhere(components == 1 + int(np.argmax(sizes)))
    return feret_diameter(volume.index_to_patient(kij)) + float(np.mean(volume.pixel_spacing))


# --------------------------------------------------------------------------------------------------------
# Few-shot


def _ci95(values: np.ndarray) -> list[float]:
    half = 1.96 * float(values.std(ddof=1)) / np.sqrt(len(values)) if len(values) > 1 else 0.0
    return [round(float(values.mean()) - half, 4), round(float(values.mean()) + half, 4)]


def _proto_probs(emb: np.ndarray, support: np.ndarray, labels: np.ndarray, classify) -> np.ndarray:
    prototypes = np.stack([emb[support][labels == c].mean(0) for c in range(len(CLASSES))]).astype(np.float32)
    return classify(emb, prototypes)


def finetune_baseline(
    pretrained: BaselineClassifier,
    features: dict[int, torch.Tensor],
    support: np.ndarray,
    labels: np.ndarray,
    steps: int,
    seed: int,
) -> BaselineClassifier:
    """Fine-tune the baseline's last block, projection and a new 3-way linear head on the support set
    (all modalities together); the earlier layers stay frozen, as usual with few cases."""
    torch.manual_seed(seed)
    model = BaselineClassifier(type(pretrained.encoder)(pretrained.encoder.widths), len(CLASSES))
    model.encoder.load_state_dict(pretrained.encoder.state_dict())
    trainable = list(model.encoder.last.parameters()) + list(model.encoder.project.parameters())
    trainable += list(model.linear.parameters())
    optimizer = torch.optim.Adam(trainable, lr=1e-3)
    x = torch.cat([features[m][support] for m in sorted(features)])
    onehot = torch.cat(
        [
            torch.from_numpy(np.tile(np.eye(len(MODALITY_ORDER), dtype=np.float32)[m], (len(support), 1)))
            for m in sorted(features)
        ]
    )
    y = torch.from_numpy(np.tile(labels, len(features))).long()
    model.train()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model.forward_features(x, onehot), y)
        loss.backward()
        optimizer.step()
    return model.eval()


def fewshot_metrics(
    pool: LesionBank,
    embed: EmbedModel,
    classify: Callable[[np.ndarray, np.ndarray], np.ndarray],
    baseline: BaselineClassifier | None,
    shots: tuple[int, ...] = (1, 5, 10, 20),
    episodes: int = 200,
    queries: int = 10,
    finetune_steps: int = 40,
    seed: int = 0,
) -> dict:
    """Accuracy (mean, 95 % CI over episodes) per K, fused over modalities and per modality."""
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    embeddings = {
        m: embed(pool.rois[:, m].astype(np.float32), np.tile(onehots[m], (len(pool), 1)))
        for m in range(len(MODALITY_ORDER))
    }
    features = {}
    if baseline is not None:
        with torch.no_grad():
            features = {
                m: torch.cat(
                    [
                        baseline.encoder.features(torch.from_numpy(pool.rois[i : i + 64, m].astype(np.float32)))
                        for i in range(0, len(pool), 64)
                    ]
                )
                for m in range(len(MODALITY_ORDER))
            }
    by_class = [np.nonzero(pool.classes == c)[0] for c in range(len(CLASSES))]
    results: dict[str, dict] = {"prototype": {}, "baseline": {}}
    per_modality: dict[str, dict] = {"prototype": {}, "baseline": {}}
    for k in shots:
        acc: dict[str, list[float]] = {"prototype": [], "baseline": []}
        acc_modality: dict[str, list[list[float]]] = {
            "prototype": [[] for _ in MODALITY_ORDER],
            "baseline": [[] for _ in MODALITY_ORDER],
        }
        for episode in range(episodes):
            rng = np.random.default_rng([seed, k, episode])
            picks = [rng.choice(members, size=k + queries, replace=False) for members in by_class]
            support = np.concatenate([p[:k] for p in picks])
            query = np.concatenate([p[k:] for p in picks])
            s_labels = np.repeat(np.arange(len(CLASSES)), k)
            q_labels = np.repeat(np.arange(len(CLASSES)), queries)
            log_p = np.zeros((len(query), len(CLASSES)))
            for m, emb in embeddings.items():
                probs = _proto_probs(emb, support, s_labels, classify)[query]
                acc_modality["prototype"][m].append(float((probs.argmax(1) == q_labels).mean()))
                log_p += np.log(np.clip(probs, 1e-9, None))
            acc["prototype"].append(float((log_p.argmax(1) == q_labels).mean()))
            if baseline is not None:
                model = finetune_baseline(baseline, features, support, s_labels, finetune_steps, seed + episode)
                log_p = np.zeros((len(query), len(CLASSES)))
                with torch.no_grad():
                    for m in features:
                        onehot = torch.from_numpy(np.tile(onehots[m], (len(query), 1)))
                        probs = torch.softmax(model.forward_features(features[m][query], onehot), 1).numpy()
                        acc_modality["baseline"][m].append(float((probs.argmax(1) == q_labels).mean()))
                        log_p += np.log(np.clip(probs, 1e-9, None))
                acc["baseline"].append(float((log_p.argmax(1) == q_labels).mean()))
        for method in ("prototype", "baseline"):
            if acc[method]:
                values = np.array(acc[method])
                results[method][str(k)] = {"mean": round(float(values.mean()), 4), "ci95": _ci95(values)}
                per_modality[method][str(k)] = {
                    MODALITY_ORDER[m].value.lower(): round(float(np.mean(v)), 4)
                    for m, v in enumerate(acc_modality[method])
                }
    if baseline is None:
        del results["baseline"], per_modality["baseline"]
    return {"fewshot": results, "fewshot_by_modality": per_modality, "fewshot_pool": len(pool)}
