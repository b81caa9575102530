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
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from cspine.analysis.lesions import clean_tumor_labels
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality, SeriesRole
from cspine.imaging.roi import lesion_roi
from cspine.imaging.seg_input import seg_inputs, to_source
from cspine.inference.runner import onnx_session
from cspine.inference.specs import MODALITY_ORDER, SEG_LABELS
from cspine.modeling.data import CLASSES, ROI_WINDOW_MM, SEG_ROLES, LesionBank, _main_centre, model_labels
from cspine.modeling.networks import BaselineClassifier
from cspine.modeling.train import load_embed
from cspine.phantom.generate import (
    COHORT_FILE,
    Case,
    PhantomOptions,
    case_subtype,
    generate_case,
    generate_cohort,
    plan_case,
    render_case,
)
from cspine.phantom.sites import DEFAULT_SITE, get_site
from cspine.phantom.tumors import SUBTYPES, TumorSubtype
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


def torch_embed(checkpoint: Path) -> tuple[EmbedModel, Callable[[np.ndarray, np.ndarray], np.ndarray]]:
    """A trained lesion_embed checkpoint (``train_embed``) as the embedding and prototype classifier the ONNX
    files would be once exported."""
    encoder, proto, _ = load_embed(checkpoint)
    encoder.eval()

    def embed(rois: np.ndarray, modality: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = [
                encoder(torch.from_numpy(rois[i : i + BATCH]), torch.from_numpy(modality[i : i + BATCH]))
                for i in range(0, len(rois), BATCH)
            ]
        return torch.cat(out).numpy()

    def classify(embedding: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return proto(torch.from_numpy(embedding.astype(np.float32)), torch.from_numpy(prototypes)).numpy()

    return embed, classify


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


# --------------------------------------------------------------------------------------------------------
# Sites: the shipped models (trained on the default site) on the SYNTHETIC sites of phantom/sites.py


# Structures whose Dice the sites' summary averages per modality: every model label but OPLL (present in few
# cases, and more often at an older site) and the lesion (reported on its own).
SITE_DICE_STRUCTURES = {
    "ct": ("vertebral_body", "posterior_elements", "disc", "canal"),
    "mr": ("vertebral_body", "posterior_elements", "disc", "csf", "cord"),
    "xr": (
        "c2_body",
        "c3_body",
        "c4_body",
        "c5_body",
        "c6_body",
        "c7_body",
        "other_body",
        "posterior_elements",
        "disc",
    ),
}


def site_cohort(cache: Path, site: str, seed: int, count: int, workers: int = 1, progress: bool = False) -> list[Path]:
    """Whole SYNTHETIC studies of one site written as DICOM (cached per site, seed and count)."""
    folder = cache / "site-cohort" / f"{site}-{get_site(site).fingerprint()}-seed{seed}-{count}"
    if not (folder / COHORT_FILE).exists():
        generate_cohort(folder, count, seed, PhantomOptions(site=site), workers=workers, progress=progress)
    return [folder / f"case-{i + 1:04d}" for i in range(count)]


def _ground_truth_rois(case: Case, lesion: dict) -> np.ndarray:
    """ROIs [modalities, 3, 64, 64] of a case rendered in a window around its lesion, each centred on the
    centroid of the largest lesion component of that modality's label map (MR: else CT's; the radiograph: else
    the window centre, where denser structures hide the lesion)."""
    ct, t1, t2, xr = (case.series[r] for r in (SeriesRole.CT, SeriesRole.MR_T1, SeriesRole.MR_T2, SeriesRole.XR))
    ct_volume = ct.as_volume()
    centre = _main_centre(ct, ct_volume)
    if centre is None:  # the lesion's largest part lies outside the window: the truth's centre
        centre = np.asarray(lesion["centre_mm"], dtype=float)
    mr_volumes = {SeriesRole.MR_T1: t1.as_volume(), SeriesRole.MR_T2: t2.as_volume()}
    mr_centre = _main_centre(t1, mr_volumes[SeriesRole.MR_T1])
    xr_volume = xr.as_volume()
    xr_centre = _main_centre(xr, xr_volume)
    if xr_centre is None:
        xr_centre = xr_volume.index_to_patient(
            np.array([[0.0, (xr.values.shape[1] - 1) / 2, (xr.values.shape[2] - 1) / 2]])
        )[0]
    return np.stack(
        [
            lesion_roi(Modality.CT, {SeriesRole.CT: ct_volume}, centre),
            lesion_roi(Modality.MR, mr_volumes, centre if mr_centre is None else mr_centre),
            lesion_roi(Modality.XR, {SeriesRole.XR: xr_volume}, xr_centre),
        ]
    )


def _site_lesion(args: tuple[str, int, int, str]) -> tuple[np.ndarray, np.ndarray, int, int, float] | None:
    """Case ``index`` of ``site``'s population (None: it has no lesion), its lesion rendered in a window twice
    with the same random streams: by the site's scanners and by the default site's. Returns both ground-truth
    ROI stacks, the class and subtype indices and the maximum diameter (mm)."""
    site, seed, index, tumor = args
    plan = plan_case(f"lesion-{index:04d}", seed, index, PhantomOptions(site=site, tumor=tumor))
    tumor_plan, lesion = plan.scene.tumor, plan.lesion
    if tumor_plan is None or lesion is None:
        return None
    window = (tumor_plan.blobs[0].centre, ROI_WINDOW_MM)
    rois = _ground_truth_rois(render_case(plan, roi=window), lesion)
    if site == DEFAULT_SITE:
        default_rois = rois
    else:
        default_plan = replace(plan, options=replace(plan.options, site=DEFAULT_SITE))
        default_rois = _ground_truth_rois(render_case(default_plan, roi=window), lesion)
    subtype = TumorSubtype(lesion["subtype"])
    label = CLASSES.index(SUBTYPES[subtype].tumor_class.value)
    return (
        rois.astype(np.float16),
        default_rois.astype(np.float16),
        label,
        list(TumorSubtype).index(subtype),
        float(lesion["max_diameter_mm"]),
    )


@dataclass
class SiteLesions:
    """Lesions of a site's population: ROIs [N, modalities, 3, 64, 64] by the site's scanners and, of the same
    lesions, by the default site's (``default_rois``); class and subtype indices; maximum diameters (mm)."""

    rois: np.ndarray
    default_rois: np.ndarray
    classes: np.ndarray
    subtypes: np.ndarray
    diameters: np.ndarray

    def bank(self) -> LesionBank:
        return LesionBank(self.rois, subtypes=self.subtypes, classes=self.classes)


MAX_CASES_SEARCHED = 100_000  # a class the site's population (almost) never has stops the search here


def _pick_cases(site: str, seed: int, count: int, per_class: int, tumor: str) -> list[int]:
    """Indices of the site's cases (as ``cspine phantom --site`` draws them) with a lesion: the first ``count``,
    or with ``per_class`` the first ``per_class`` of each class the cases can have. Only each case's subtype is
    drawn (``case_subtype``), nothing is planned or rendered."""
    options = PhantomOptions(site=site, tumor=tumor)
    wanted = {c: per_class for c in range(len(CLASSES))}
    if tumor != "random":
        classes = {
            SUBTYPES[s].tumor_class.value for s in TumorSubtype if tumor in (s.value, SUBTYPES[s].tumor_class.value)
        }
        wanted = {CLASSES.index(c): per_class for c in classes}
    picked: list[int] = []
    for index in range(MAX_CASES_SEARCHED):
        subtype = case_subtype(seed, index, options)
        if subtype is None:
            continue
        label = CLASSES.index(SUBTYPES[subtype].tumor_class.value)
        if not per_class:
            picked.append(index)
            if len(picked) == count:
                return picked
        elif wanted.get(label, 0) > 0:
            wanted[label] -= 1
            picked.append(index)
            if not any(wanted.values()):
                return picked
    short = {CLASSES[c]: n for c, n in wanted.items() if n} if per_class else {"lesions": count - len(picked)}
    raise ValueError(f"site {site} has too few lesions in its first {MAX_CASES_SEARCHED} cases; missing {short}")


def site_lesions(
    cache: Path, site: str, seed: int, count: int = 0, workers: int = 1, per_class: int = 0, tumor: str = "random"
) -> SiteLesions:
    """Lesions of a site's SYNTHETIC cases (cases drawn as ``cspine phantom --site`` draws them, tumour-free ones
    skipped): the first ``count``, or with ``per_class`` the first ``per_class`` of each class (a class-balanced
    set in the site's subtype mix within each class); ``tumor`` forces a class or subtype as ``cspine phantom
    --tumor`` does. Each lesion is rendered in a window around it (``_site_lesion``). Cached."""
    name = f"{site}-{get_site(site).fingerprint()}-seed{seed}"
    name += f"-{tumor}-{per_class}perclass" if per_class else f"-{count}"
    path = cache / "site-lesions" / f"{name}.npz"
    if not path.exists():
        jobs = [(site, seed, index, tumor) for index in _pick_cases(site, seed, count, per_class, tumor)]
        if workers > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=workers) as pool:
                made = list(pool.map(_site_lesion, jobs))
        else:
            made = [_site_lesion(job) for job in jobs]
        found = [m for m in made if m is not None]
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez_compressed(
            partial,
            rois=np.stack([f[0] for f in found]),
            default_rois=np.stack([f[1] for f in found]),
            classes=np.array([f[2] for f in found]),
            subtypes=np.array([f[3] for f in found]),
            diameters=np.array([f[4] for f in found]),
        )
        partial.rename(path)
    with np.load(path) as npz:
        return SiteLesions(
            npz["rois"].astype(np.float32),
            npz["default_rois"].astype(np.float32),
            npz["classes"],
            npz["subtypes"],
            npz["diameters"],
        )


def prototype_accuracy(
    rois: np.ndarray,
    classes: np.ndarray,
    embed: EmbedModel,
    classify: Callable[[np.ndarray, np.ndarray], np.ndarray],
    labels: tuple[str, ...],
    prototypes: dict[Modality, np.ndarray],
) -> dict:
    """Accuracy (95 % Wilson interval) and balanced accuracy (mean recall over the classes present) of the
    prototype classifier on lesion ROIs, per modality and fused (probabilities multiplied, equal weights), with
    each lesion's ``correct`` flag. ``labels`` orders the prototypes' classes; ``classes`` index CLASSES."""
    order = np.array([CLASSES.index(label) for label in labels])
    onehots = np.eye(len(MODALITY_ORDER), dtype=np.float32)
    log_p = np.zeros((len(rois), len(labels)))
    out: dict[str, dict] = {}

    def score(predicted: np.ndarray) -> dict:
        correct = predicted == classes
        recalls = [float(correct[classes == c].mean()) for c in np.unique(classes)]
        return {
            "accuracy": round(float(correct.mean()), 4),
            "ci95": _wilson(int(correct.sum()), len(correct)),
            "balanced_accuracy": round(float(np.mean(recalls)), 4),
            "correct": correct.tolist(),
        }

    for m, modality in enumerate(MODALITY_ORDER):
        if modality not in prototypes:
            continue
        emb = embed(rois[:, m].astype(np.float32), np.tile(onehots[m], (len(rois), 1)))
        probs = classify(emb.astype(np.float32), prototypes[modality].astype(np.float32))
        out[modality.value.lower()] = score(order[probs.argmax(1)])
        log_p += np.log(np.clip(probs, 1e-9, None))
    out["fused"] = score(order[log_p.argmax(1)])
    return out


def _wilson(successes: int, total: int) -> list[float]:
    """95 % Wilson interval of a proportion."""
    if not total:
        return [0.0, 1.0]
    z, p = 1.96, successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return [round(float(centre - half), 4), round(float(centre + half), 4)]


def _drop(reference: np.ndarray, shifted: np.ndarray) -> dict:
    """Mean of ``reference`` minus mean of ``shifted`` (independent samples) with a 95 % normal interval."""
    diff = float(reference.mean() - shifted.mean())
    se = float(
        np.sqrt(reference.var(ddof=1) / len(reference) + shifted.var(ddof=1) / len(shifted))
        if min(len(reference), len(shifted)) > 1
        else 0.0
    )
    return {"value": round(diff, 4), "ci95": [round(diff - 1.96 * se, 4), round(diff + 1.96 * se, 4)]}


def _paired_drop(reference: np.ndarray, shifted: np.ndarray) -> dict:
    """Mean of ``reference − shifted`` over paired samples with a 95 % normal interval."""
    diff = reference - shifted
    se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
    value = float(diff.mean())
    return {"value": round(value, 4), "ci95": [round(value - 1.96 * se, 4), round(value + 1.96 * se, 4)]}


def site_segmentation(cases: list[Path], models: dict[Modality, SegModel]) -> tuple[dict, dict[str, np.ndarray]]:
    """``seg_metrics`` case by case: Dice per structure (mean over the cases holding it), per modality the mean
    over cases of each case's mean Dice over SITE_DICE_STRUCTURES (with a 95 % interval over cases), lesion
    Dice (box-supervised models) per modality over the cases with a lesion; and the per-case means."""
    per_case = [seg_metrics([case], models, None) for case in cases]
    structures: dict[str, dict[str, list[float]]] = {}
    case_means: dict[str, list[float]] = {}
    lesion: dict[str, list[float]] = {}
    for metrics in per_case:
        for modality, scores in metrics["seg_dice"].items():
            for name, value in scores.items():
                structures.setdefault(modality, {}).setdefault(name, []).append(value)
            chosen = [v for k, v in scores.items() if k in SITE_DICE_STRUCTURES[modality]]
            if chosen:
                case_means.setdefault(modality, []).append(float(np.mean(chosen)))
        for modality, value in metrics["lesion_dice_box_by_modality"].items():
            if value is not None:
                lesion.setdefault(modality, []).append(value)
    means = {m: np.array(v) for m, v in case_means.items()}
    summary = {
        "seg_dice": {m: {k: _mean(v) for k, v in s.items()} for m, s in structures.items()},
        "mean_dice": {m: {"mean": _mean(list(v)), "ci95": _ci95(v)} for m, v in means.items()},
        "lesion_dice_box_by_modality": {m: _mean(v) for m, v in lesion.items()},
        "cases": len(cases),
        "cases_with_tumor": max((len(v) for v in lesion.values()), default=0),
    }
    return summary, means


def site_metrics(
    repository: Path,
    cache: Path,
    sites: list[str],
    seed: int,
    cases: int,
    lesions: int,
    workers: int = 1,
    progress: bool = False,
) -> dict:
    """Per SYNTHETIC site: segmentation Dice of the shipped CT/MR/XR models on ``cases`` whole studies
    (``site_segmentation``), and the lesion classification of the shipped embedding (prototype classifier) on
    ``lesions`` lesions of the site's population, with the default support set cut about the true lesion centres
    as those lesions are (``ground_truth_support``); with the default site among ``sites``, each other site's drop
    from it (95 % intervals, independent samples)."""
    from cspine.fewshot.prototypes import PrototypeSet
    from cspine.modeling.data import ground_truth_support
    from cspine.modeling.export import model_path
    from cspine.modeling.recipes import SEG_NAMES, proto_classifier

    models = {m: onnx_seg(model_path(repository, n)) for n, m in SEG_NAMES.items()}
    embed = onnx_embed(model_path(repository, "lesion_embed"))
    classify = proto_classifier(repository)
    prototypes = PrototypeSet.from_support(ground_truth_support(cache, model_path(repository, "lesion_embed")))
    result: dict[str, dict] = {}
    samples: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    for site in sites:
        profile = get_site(site)
        seg, dice_means = site_segmentation(site_cohort(cache, site, seed, cases, workers, progress), models)
        found = site_lesions(cache, site, seed + 1, lesions, workers)
        accuracy = prototype_accuracy(
            found.rois, found.classes, embed, classify, prototypes.labels, prototypes.prototypes
        )
        correct = {k: np.asarray(v.pop("correct"), dtype=float) for k, v in accuracy.items()}
        samples[site] = (dice_means, correct)
        result[site] = {
            "description": profile.description,
            "fingerprint": profile.fingerprint(),
            "segmentation": seg,
            "classification": accuracy,
            "lesions": len(found.classes),
            "lesion_classes": {c: int((found.classes == i).sum()) for i, c in enumerate(CLASSES)},
            "lesion_median_diameter_mm": round(float(np.median(found.diameters)), 1),
        }
        if site != DEFAULT_SITE:
            # the same lesions by the default site's scanners: what the population alone does, and (paired)
            # what the site's scanners do to them
            by_default = prototype_accuracy(
                found.default_rois, found.classes, embed, classify, prototypes.labels, prototypes.prototypes
            )
            result[site]["classification_default_scanners"] = {
                k: {"accuracy": v["accuracy"], "ci95": v["ci95"], "balanced_accuracy": v["balanced_accuracy"]}
                for k, v in by_default.items()
            }
            result[site]["scanner_drop_paired"] = {
                k: _paired_drop(np.asarray(by_default[k]["correct"], dtype=float), correct[k]) for k in correct
            }
        logger.info("site %s done", site)
    if DEFAULT_SITE in samples:
        dice_ref, correct_ref = samples[DEFAULT_SITE]
        for site, (dice_means, correct) in samples.items():
            if site != DEFAULT_SITE:
                result[site]["drop_from_default"] = {
                    "mean_dice": {m: _drop(dice_ref[m], v) for m, v in dice_means.items() if m in dice_ref},
                    "accuracy": {k: _drop(correct_ref[k], v) for k, v in correct.items() if k in correct_ref},
                }
    return {
        "synthetic": True,
        "note": "SYNTHETIC phantom sites; classification on ground-truth ROIs with the default support set",
        "seed": seed,
        "lesion_seed": seed + 1,
        "cases": cases,
        "support_prototypes": prototypes.version,
        "sites": result,
    }


# A structure the phantom's labels lack counts as marked by a model from this much of it (mm³; mm² on a radiograph).
ABSENT_MARK_MM3 = 10.0


def seg_comparison(
    cases: list[Path], models: dict[str, tuple[Modality, SegModel]], reference: dict[Modality, str], boot: int = 1000
) -> dict:
    """Segmentation models side by side on the same held-out cases (``segment_case``): per model, the lesion Dice
    of each series role (mean over the cases with a lesion, 95 % bootstrap interval over those cases, and the
    paired difference to ``reference[modality]``, the model compared against), the Dice of each structure (mean
    over the series holding it, with its 95 % bootstrap interval; and per series role), in how many series without
    a structure (tumor included) the model marks ``ABSENT_MARK_MM3`` or more of it (and the median it marks there),
    and on CT the error of the largest predicted lesion's Feret diameter against the phantom's (mm: MAE and bias)."""
    per_case: dict[str, dict] = {}
    for name, (modality, model) in models.items():
        names = SEG_LABELS[modality]
        tumor = names.index("tumor")
        lesion: dict[str, list[float]] = {}
        structures: dict[str, list[float]] = {}
        by_series: dict[str, dict[str, list[float]]] = {}
        absent: dict[str, list[float]] = {}  # mm³ marked per series lacking the structure
        size: list[float] = []
        for case_dir in cases:
            seg = segment_case(case_dir, {modality: model})
            truth = seg.truth[modality]
            for role, labels in seg.predicted.items():
                volume = seg.volumes[role]
                voxel = float(np.prod(volume.pixel_spacing if volume.projection else volume.spacing))
                for index, structure in enumerate(names[1:], start=1):
                    if not (truth == index).any():
                        absent.setdefault(structure, []).append(float((labels == index).sum()) * voxel)
                    elif structure != "tumor":
                        value = dice(labels == index, truth == index)
                        structures.setdefault(structure, []).append(value)
                        by_series.setdefault(role.value, {}).setdefault(structure, []).append(value)
                if (truth == tumor).any():
                    lesion.setdefault(role.value, []).append(dice(labels == tumor, truth == tumor))
            known = _truth(case_dir)["tumor"]
            if modality is Modality.CT and known is not None:
                predicted = seg.predicted[SeriesRole.CT] == tumor
                size.append(_largest_diameter(predicted, seg.volumes[SeriesRole.CT]) - known["max_diameter_mm"])
        per_case[name] = {
            "modality": modality,
            "lesion": lesion,
            "structures": structures,
            "by_series": by_series,
            "absent": absent,
            "size": size,
        }
    rng = np.random.default_rng(0)
    out = {}
    for name, found in per_case.items():
        modality = found["modality"]
        entry: dict = {"modality": modality.value, "lesion_dice": {}, "structure_dice": {}}
        against = per_case.get(reference.get(modality, ""), {}).get("lesion", {})
        for role, values in found["lesion"].items():
            v = np.asarray(values)
            draws = rng.integers(0, len(v), (boot, len(v)))
            figure = {"mean": round(float(v.mean()), 4), "ci95": _interval(v[draws].mean(1)), "cases": len(v)}
            if name != reference.get(modality) and len(against.get(role, [])) == len(v):
                difference = v - np.asarray(against[role])
                figure["minus_reference"] = round(float(difference.mean()), 4)
                figure["minus_reference_ci95"] = _interval(difference[draws].mean(1))
            entry["lesion_dice"][role] = figure
        entry["structure_dice"] = {k: round(float(np.mean(v)), 4) for k, v in found["structures"].items()}
        entry["structure_dice_ci95"] = {}
        for structure, values in found["structures"].items():
            v = np.asarray(values)
            entry["structure_dice_ci95"][structure] = _interval(v[rng.integers(0, len(v), (boot, len(v)))].mean(1))
        entry["structure_dice_by_series"] = {
            role: {k: round(float(np.mean(v)), 4) for k, v in found_role.items()}
            for role, found_role in found["by_series"].items()
        }
        entry["marked_where_absent"] = {}
        for structure, volumes in found["absent"].items():
            marked = [v for v in volumes if v >= ABSENT_MARK_MM3]
            median = round(float(np.median(marked)), 1) if marked else 0.0
            entry["marked_where_absent"][structure] = {"series": len(marked), "of": len(volumes), "median_mm3": median}
        if found["size"]:
            errors = np.asarray(found["size"])
            entry["size_mae_mm"] = round(float(np.abs(errors).mean()), 2)
            entry["size_bias_mm"] = round(float(errors.mean()), 2)
        out[name] = entry
    return out


def _interval(values: np.ndarray) -> list[float]:
    return [round(float(x), 4) for x in np.percentile(values, [2.5, 97.5])]
