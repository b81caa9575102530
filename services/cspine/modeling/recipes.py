"""The recipes behind `cspine train`, `cspine export` and `cspine evaluate models`: which models, with
which settings (``PRESETS``), where their files go. ``make train`` runs the ``full`` preset and
reproduces the shipped artifacts; the tests run the ``smoke`` preset in seconds.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from cspine.domain import Modality
from cspine.inference.runner import onnx_session
from cspine.modeling.data import UNSEEN_SUBTYPES, LesionBank, lesion_bank, seg_cases
from cspine.modeling.evaluate import eval_cohort, fewshot_metrics, onnx_embed, onnx_seg, seg_metrics
from cspine.modeling.export import export_embed, export_proto, export_seg, model_path
from cspine.modeling.train import (
    EmbedConfig,
    SegConfig,
    finetune_seg,
    load_baseline,
    load_embed,
    load_seg,
    train_baseline,
    train_embed,
    train_seg,
)

logger = logging.getLogger(__name__)

ARTIFACTS = Path(__file__).parent / "artifacts"  # evaluation-only artifacts (not served by Triton)
FIRST_ROUND = "first-round"  # the checkpoints folder of models trained in two rounds (``Preset.second_round``)
SEG_NAMES = {"seg_ct": Modality.CT, "seg_mr": Modality.MR, "seg_xr": Modality.XR}
MODEL_NAMES = ("seg_ct", "seg_mr", "seg_xr", "seg_ct_mask", "lesion_embed", "baseline")
EVAL_SEED = 9001  # held-out studies: disjoint from the training cohort (seed 1)
FEWSHOT_BANK_SEED = 9002  # held-out lesions of the unseen subtypes


@dataclasses.dataclass(frozen=True)
class Preset:
    seg: dict  # SegConfig overrides for every segmentation model
    per_model: dict  # model name → further SegConfig overrides
    embed: dict  # EmbedConfig overrides
    # model name → SegConfig overrides of a second round of training: the first round's export fine-tuned on the
    # same studies (``finetune_seg``: BatchNorm frozen, self-training again half-way)
    second_round: dict
    eval_cases: int
    fewshot_pool: int  # lesions per unseen subtype
    episodes: int
    shots: tuple[int, ...]
    queries: int  # query lesions per class and episode


PRESETS = {
    "full": Preset(
        seg={"cases": 120, "steps": 1500},
        # the mask-supervised CT model only serves the box-versus-mask comparison
        per_model={"seg_xr": {"stacks": 4}, "seg_ct_mask": {"steps": 1000}},
        # 3 in 4 training lesions imaged by a randomly drawn scanner and protocol (phantom/scanner.py varied_scanner)
        embed={"episodes": 1200, "per_subtype": 60, "ways": 7, "scanners": 0.75},
        # CT: 400 more steps with one more stack per batch on OPLL, which random stacks seldom hold
        second_round={"seg_ct": {"steps": 400, "lr": 1e-3, "focus_stacks": 1}},
        eval_cases=24,
        fewshot_pool=60,
        episodes=200,
        shots=(1, 5, 10, 20),
        queries=10,
    ),
    "smoke": Preset(
        seg={"cases": 3, "steps": 6, "widths": (4, 8, 16, 32)},
        per_model={},
        embed={"episodes": 6, "per_subtype": 3, "ways": 3, "shots": 1, "queries": 1, "widths": (8, 16, 24, 32)},
        second_round={},
        eval_cases=2,
        fewshot_pool=8,
        episodes=5,
        shots=(1, 2),
        queries=3,
    ),
}


def seg_config(name: str, preset: Preset, **overrides) -> SegConfig:
    modality = SEG_NAMES[name.removesuffix("_mask")]
    settings = {
        "tumor_labels": "mask" if name.endswith("_mask") else "box",
        **preset.seg,
        **preset.per_model.get(name, {}),
        **overrides,
    }
    return SegConfig.for_modality(modality, **settings)


def train_models(
    names: list[str],
    preset: Preset,
    cache: Path,
    checkpoints: Path,
    workers: int,
    progress: bool,
    stop_after: int | None = None,
    service_cut: LesionBank | None = None,
    **overrides,
) -> dict[str, Path]:
    """Train (or resume) each named model; returns checkpoint paths. ``overrides`` change the
    segmentation settings of the preset; ``service_cut`` is the embedding's service-cut bank (``train_embed``)."""
    done = {}
    embed = EmbedConfig(**preset.embed)
    for name in names:
        if name == "lesion_embed":
            done[name] = train_embed(embed, cache, checkpoints, workers, progress, stop_after, service_cut)
        elif name == "baseline":
            done[name] = train_baseline(embed, cache, checkpoints, workers, progress, stop_after)
        elif name not in preset.second_round:
            config = seg_config(name, preset, **overrides)
            done[name] = train_seg(config, cache, checkpoints, workers, progress, stop_after)
        else:
            config = seg_config(name, preset, **overrides)
            first = train_seg(config, cache, checkpoints / FIRST_ROUND, workers, progress, stop_after)
            second = dataclasses.replace(config, **preset.second_round[name])
            done[name] = _second_round(
                first, second, cache, checkpoints / f"{config.name}.pt", workers, progress, stop_after
            )
    return done


def _second_round(
    first: Path,
    config: SegConfig,
    cache: Path,
    checkpoint: Path,
    workers: int,
    progress: bool,
    stop_after: int | None,
) -> Path:
    """Fine-tune the first round's checkpoint (exported beside it, as a served model would be) with ``config``;
    returns the first round's checkpoint while that has not reached its last step."""
    net, state = load_seg(first)
    if state["step"] < state["config"]["steps"]:
        return first
    start = export_seg(net, config.modality, first.parent, _metadata(state))
    paths = seg_cases(cache, config.data_seed, config.cases, workers=workers, progress=progress)
    return finetune_seg(config, paths, start, checkpoint, {"first_round": state["step"]}, progress, stop_after)


def _metadata(state: dict) -> dict:
    return {"training_config": state["config"], "training_steps": state["step"]}


def export_models(checkpoints: Path, repository: Path, artifacts: Path = ARTIFACTS) -> list[Path]:
    """Export every trained checkpoint: served models into the repository, evaluation-only ones
    (the mask-supervised CT model, the baseline's weights) into ``artifacts``."""
    written = []
    for name, modality in SEG_NAMES.items():
        path = checkpoints / f"{name}.pt"
        if path.exists():
            net, state = load_seg(path)
            written.append(export_seg(net, modality, repository, _metadata(state)))
    mask = checkpoints / "seg_ct_mask.pt"
    if mask.exists():
        net, state = load_seg(mask)
        exported = export_seg(net, Modality.CT, artifacts / "tmp", _metadata(state))
        artifacts.mkdir(parents=True, exist_ok=True)
        target = artifacts / "seg_ct_mask.onnx"
        shutil.move(exported, target)
        shutil.rmtree(artifacts / "tmp")
        written.append(target)
    embed = checkpoints / "lesion_embed.pt"
    if embed.exists():
        encoder, proto, state = load_embed(embed)
        written.append(export_embed(encoder, repository, _metadata(state)))
        written.append(export_proto(proto, repository, _metadata(state)))
    baseline = checkpoints / "baseline.pt"
    if baseline.exists():
        model, state = load_baseline(baseline)
        artifacts.mkdir(parents=True, exist_ok=True)
        target = artifacts / "baseline.pt"
        torch.save({"config": state["config"], "step": state["step"], "model": model.state_dict()}, target)
        written.append(target)
    return written


def load_baseline_artifact(path: Path):
    from cspine.modeling.data import SEEN_SUBTYPES
    from cspine.modeling.networks import BaselineClassifier, LesionEncoder

    state = torch.load(path, map_location="cpu", weights_only=False)
    model = BaselineClassifier(LesionEncoder(tuple(state["config"]["widths"])), len(SEEN_SUBTYPES))
    model.load_state_dict(state["model"])
    return model.eval()


def proto_classifier(repository: Path):
    """The served version set's ``proto_classify`` as a function (embeddings, prototypes → probabilities)."""
    from cspine.inference.model_config import served_model_file

    session = onnx_session(served_model_file(repository, "proto_classify"))

    def classify(embedding: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        return session.run(None, {"embedding": embedding.astype(np.float32), "prototypes": prototypes})[0]

    return classify


def evaluate_models(
    repository: Path,
    cache: Path,
    preset: Preset,
    artifacts: Path = ARTIFACTS,
    workers: int = 1,
    progress: bool = True,
    seg_models: dict | None = None,
    embed=None,
    baseline=None,
) -> dict:
    """Metrics of the exported models on held-out SYNTHETIC data (see ``evaluate``)."""
    models = seg_models or {m: onnx_seg(model_path(repository, n)) for n, m in SEG_NAMES.items()}
    mask_path = artifacts / "seg_ct_mask.onnx"
    mask_ct = onnx_seg(mask_path) if mask_path.exists() and seg_models is None else None
    cases = eval_cohort(cache, EVAL_SEED, preset.eval_cases)
    metrics = seg_metrics(cases, models, mask_ct)
    pool = lesion_bank(
        cache, FEWSHOT_BANK_SEED, UNSEEN_SUBTYPES, preset.fewshot_pool, (0.5, 0.5), workers=workers, progress=progress
    )
    embed = embed or onnx_embed(model_path(repository, "lesion_embed"))
    baseline_path = artifacts / "baseline.pt"
    if baseline is None and baseline_path.exists():
        baseline = load_baseline_artifact(baseline_path)
    metrics.update(
        fewshot_metrics(
            pool, embed, proto_classifier(repository), baseline, preset.shots, preset.episodes, queries=preset.queries
        )
    )
    metrics["synthetic"] = True
    metrics["unseen_subtypes"] = [s.value for s in UNSEEN_SUBTYPES]
    return metrics


def dump(metrics: dict) -> str:
    return json.dumps(metrics, indent=2)
