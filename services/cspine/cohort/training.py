"""Training on a site's labelled cohort (``cspine train --cohort DIR``): the shipped segmentation models
fine-tuned on the cohort's ``train`` studies, and judged on its held-out ones beside the shipped version.

The cohort is checked first (``cohort check``); any error stops training, with the errors named. Each training
study's images are ingested and chosen as the service would, and its SEG labels (tumor boxes painted as the tumor
where a series has no tumor segment) are resampled with the images onto the model grid, as the phantom's training
cases are (``modeling.data.modality_seg_arrays``), and cached by the study's content. Fine-tuning starts from the
served ``model.onnx`` (``modeling.export.load_seg_onnx``, BatchNorms frozen) and uses the phantom recipe of the
modality (crops, box supervision with self-training) with fewer steps and a lower learning rate.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cspine.analysis.lesions import same_grid
from cspine.cohort.check import CohortReport, StudyReport, check_cohort, image_files, labelled_study
from cspine.cohort.codes import CODES_FILE
from cspine.config import IngestLimits
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality
from cspine.errors import InvalidInputError
from cspine.imaging.seg_input import stack_context
from cspine.inference.specs import SEG_GEOMETRY, SEG_LABELS
from cspine.modeling.data import SEG_ROLES, modality_seg_arrays

logger = logging.getLogger(__name__)

FINETUNE_STEPS = 400
FINETUNE_LR = 1e-3
HELD_OUT = ("validation", "test")
SHOWN_ERRORS = 5


def require_clean(report: CohortReport) -> None:
    """Stop on a cohort with errors (``cspine cohort check`` reports them all), naming the first ones."""
    errors = [f"cohort: {p.message}" for p in report.problems if p.severity == "error"]
    errors += [f"{s.name}: {p.message}" for s in report.studies for p in s.problems if p.severity == "error"]
    if errors:
        more = f" and {len(errors) - SHOWN_ERRORS} more" if len(errors) > SHOWN_ERRORS else ""
        raise InvalidInputError(
            f"the cohort {report.folder} has {len(errors)} label error(s); `cspine cohort check` lists them: "
            + "; ".join(errors[:SHOWN_ERRORS])
            + more
        )


def study_arrays(folder: Path, report: StudyReport, limits: IngestLimits = IngestLimits()) -> dict[str, np.ndarray]:
    """A checked study's training arrays on the model grids, for each modality it has labels of. A modality's
    images are those of its roles on the labelled series' grid (MR T1 and T2 usually share one)."""
    study = ingest_paths(image_files(folder), limits)
    chosen = select_series(study).chosen
    by_series = {lab.series_instance_uid: lab for lab in report.labels}
    out: dict[str, np.ndarray] = {}
    for modality, roles in SEG_ROLES.items():
        present = [r for r in roles if r in chosen]
        labelled = [r for r in present if chosen[r].series_instance_uid in by_series]
        if not labelled:
            continue
        source = chosen[labelled[-1]]
        assert source.volume is not None  # series selection chooses series with a volume
        volumes: dict = {}
        for role in present:
            volume = chosen[role].volume
            if role is not labelled[-1] and volume is not None and same_grid(volume, source.volume):
                volumes[role] = volume
        volumes[labelled[-1]] = source.volume  # last: the labels lie on its grid
        found = by_series[source.series_instance_uid].labels
        assert found is not None  # a study's report with its label maps (labelled_study)
        labels = found.copy()
        tumor = SEG_LABELS[modality].index("tumor")
        if not (labels == tumor).any():
            grids = {chosen[r].series_instance_uid for r in volumes}
            for box in report.boxes:
                if box.series_instance_uid in grids:
                    labels[tuple(slice(a, b + 1) for a, b in zip(box.first, box.last, strict=True))] = tumor
        out.update(modality_seg_arrays(modality, volumes, labels))
    return out


def study_digest(folder: Path, cohort: Path) -> str:
    """What a study's cached arrays depend on: its files (names, sizes, times) and the cohort's code map."""
    h = hashlib.sha256()
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    if (cohort / CODES_FILE).exists():
        paths.append(cohort / CODES_FILE)
    for path in paths:
        stat = path.stat()
        h.update(f"{path.relative_to(cohort)} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def cohort_cases(
    report: CohortReport,
    splits: tuple[str, ...],
    cache: Path,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
) -> list[Path]:
    """The cached training arrays of the cohort's studies in ``splits`` (made when missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    chosen = [s for s in report.studies if s.row is not None and s.row.split in splits]
    paths = []
    for study in tqdm(chosen, desc="cohort studies", unit="study", disable=not progress):
        folder = report.folder / study.name
        path = cache / f"{study.name}-{study_digest(folder, report.folder)}.npz"
        if not path.exists():
            partial = path.with_suffix(".partial.npz")
            np.savez(partial, **study_arrays(folder, labelled_study(report, study, limits), limits))
            partial.rename(path)
        paths.append(path)
    return paths


def modality_cases(paths: list[Path], modality: Modality) -> list[Path]:
    """The cached cases holding ``modality``'s labels."""
    key = f"{modality.value.lower()}_labels"
    out = []
    for path in paths:
        with np.load(path) as npz:
            if key in npz.files:
                out.append(path)
    return out


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = pred.sum() + truth.sum()
    return float(2.0 * np.logical_and(pred, truth).sum() / total) if total else 1.0


def held_out_dice(paths: list[Path], modality: Modality, models: Mapping[str, object]) -> dict:
    """Dice on the model grid of each model in ``models`` (name → ``SegModel``) on the held-out cases: per
    structure (mean over the cases holding it), the mean over the modality's structures per case (then over
    cases) and lesion Dice over the cases with a tumor label. Tumor specks are kept (the pipeline drops those
    below its minimum lesion size on the source grid)."""
    from cspine.modeling.evaluate import SITE_DICE_STRUCTURES, SegModel

    names = SEG_LABELS[modality]
    context = SEG_GEOMETRY[modality].context
    key = modality.value.lower()
    out: dict[str, dict] = {}
    for model_name, model in models.items():
        run: SegModel = model  # type: ignore[assignment]
        per_structure: dict[str, list[float]] = {}
        case_means: list[float] = []
        lesion: list[float] = []
        for path in paths:
            with np.load(path) as npz:
                truth = npz[f"{key}_labels"]
                images = [npz[f] for f in npz.files if f.endswith("_image") and f.startswith(key)]
            for image in images:
                predicted = run(np.ascontiguousarray(stack_context(image.astype(np.float32), context)))
                scores = {
                    name: _dice(predicted == i, truth == i)
                    for i, name in enumerate(names[1:], start=1)
                    if (truth == i).any()
                }
                for name, value in scores.items():
                    per_structure.setdefault(name, []).append(value)
                chosen = [v for k, v in scores.items() if k in SITE_DICE_STRUCTURES[key]]
                if chosen:
                    case_means.append(float(np.mean(chosen)))
                if "tumor" in scores:
                    lesion.append(scores["tumor"])
        out[model_name] = {
            "mean_dice": round(float(np.mean(case_means)), 4) if case_means else None,
            "lesion_dice": round(float(np.mean(lesion)), 4) if lesion else None,
            "structures": {k: round(float(np.mean(v)), 4) for k, v in per_structure.items() if k != "tumor"},
            "images": len(case_means),
        }
    return out


def train_on_cohort(
    folder: Path,
    modalities: list[Modality],
    repository: Path,
    checkpoints: Path,
    steps: int = FINETUNE_STEPS,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
    stop_after: int | None = None,
    embedding: bool = False,
    embedding_optional: bool = False,
) -> dict:
    """Check the cohort (stop on errors), fine-tune each modality's served segmentation model on its ``train``
    studies (and, with ``embedding``, the served lesion embedding: ``train_embedding``; with ``embedding_optional``
    a cohort without the lesions for it is noted, not an error), and compare each candidate with the served model
    on the held-out studies. Returns the figures (also written to
    ``checkpoints/cohort-<name>/metrics.json``) and the checkpoints."""
    from cspine.inference.model_config import served_model_file
    from cspine.inference.specs import SEG_MODEL_NAMES
    from cspine.modeling.evaluate import onnx_seg, torch_seg
    from cspine.modeling.export import load_seg_onnx
    from cspine.modeling.train import SegConfig, finetune_seg, training_device

    report = check_cohort(folder, limits=limits, progress=progress)
    require_clean(report)
    work = checkpoints / f"cohort-{folder.resolve().name}"
    cache = work / "cases"
    train = cohort_cases(report, ("train",), cache, limits, progress) if modalities else []
    held_out = cohort_cases(report, HELD_OUT, cache, limits, progress) if modalities else []
    splits = [s.row.split for s in report.studies if s.row is not None]
    results: dict = {
        "cohort": str(folder),
        "train_studies": splits.count("train"),
        "held_out_studies": sum(splits.count(s) for s in HELD_OUT),
        "models": {},
    }
    metrics = work / "metrics.json"
    earlier = json.loads(metrics.read_text()) if metrics.exists() else {}
    if {k: earlier.get(k) for k in ("cohort", "train_studies", "held_out_studies")} == {
        k: v for k, v in results.items() if k != "models"
    }:  # models trained by an earlier run on this cohort stay in the run's figures (and in what export reads)
        results["models"] = dict(earlier.get("models", {}))
    for modality in modalities:
        name = SEG_MODEL_NAMES[modality]
        cases = modality_cases(train, modality)
        if not cases:
            raise InvalidInputError(f"the cohort has no train study with {modality.value} labels to fine-tune {name}")
        start = served_model_file(repository, name)
        config = SegConfig.for_modality(modality, steps=steps, lr=FINETUNE_LR, cases=len(cases), data_seed=0)
        identity = {
            "cohort": str(folder.resolve()),
            "cases": [p.name for p in cases],
            "start_sha256": hashlib.sha256(start.read_bytes()).hexdigest(),
        }
        checkpoint = finetune_seg(config, cases, start, work / f"{name}.pt", identity, progress, stop_after)
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        net, _ = load_seg_onnx(start)
        net.load_state_dict(state["modules"]["net"])
        net.eval()
        entry = {
            "checkpoint": str(checkpoint),
            "steps": state["step"],
            "of_steps": steps,
            "train_studies": len(cases),
            "device": training_device().type,
        }
        evaluated = modality_cases(held_out, modality)
        if evaluated:
            entry["held_out"] = held_out_dice(
                evaluated, modality, {"served": onnx_seg(start), "candidate": torch_seg(net)}
            )
        results["models"][name] = entry
    if embedding:
        try:
            entry = train_embedding(report, repository, work, limits, progress, stop_after)
        except InvalidInputError as error:
            if not embedding_optional:
                raise
            entry = {"skipped": str(error)}
        results["models"]["lesion_embed"] = entry
    metrics.write_text(json.dumps(results, indent=2) + "\n")
    return results


def train_embedding(
    report: CohortReport,
    repository: Path,
    work: Path,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Fine-tune the served lesion embedding on the lesions of the cohort's train studies (``cohort.embedding``)
    and compare it with the served one on the held-out studies' lesions."""
    from cspine.cohort.embedding import cohort_lesions, embed_all, few_shot_figures
    from cspine.fewshot.adapt import exported_scale
    from cspine.inference.model_config import served_model_file
    from cspine.modeling.evaluate import onnx_embed
    from cspine.modeling.export import load_embed_onnx
    from cspine.modeling.train import EmbedFinetune, finetune_embed, training_device

    train = cohort_lesions(report, ("train",), work / "lesions", limits, progress)
    held_out = cohort_lesions(report, HELD_OUT, work / "lesions", limits, progress)
    if len(set(train.classes.tolist())) < 2:
        raise InvalidInputError(
            "the cohort's train studies need lesions of at least 2 classes to fine-tune lesion_embed"
        )
    start = served_model_file(repository, "lesion_embed")
    scale = exported_scale(served_model_file(repository, "proto_classify"))
    config = EmbedFinetune()
    identity = {
        "cohort": str(report.folder.resolve()),
        "lesions": train.counts(),
        "start_sha256": hashlib.sha256(start.read_bytes()).hexdigest(),
    }
    try:
        checkpoint = finetune_embed(
            config, train.rois, train.classes, start, scale, work / "lesion_embed.pt", identity, progress, stop_after
        )
    except ValueError as error:
        raise InvalidInputError(f"lesion_embed: {error}") from error
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    encoder, _ = load_embed_onnx(start)
    encoder.load_state_dict(state["modules"]["encoder"])
    encoder.eval()

    def candidate(rois: np.ndarray, modality: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return encoder(torch.from_numpy(rois), torch.from_numpy(modality)).numpy()

    entry: dict = {
        "checkpoint": str(checkpoint),
        "steps": state["step"],
        "of_steps": config.episodes,
        "train_studies": len(train.classes),
        "train_lesions": train.counts(),
        "device": training_device().type,
    }
    if len(held_out.classes):
        entry["held_out"] = {
            name: few_shot_figures(
                embed_all(train, embed), train.classes, embed_all(held_out, embed), held_out.classes, scale
            )
            for name, embed in (("served", onnx_embed(start)), ("candidate", candidate))
        }
        entry["held_out_lesions"] = held_out.counts()
    return entry
