"""Training on CPU, deterministic for a seed: segmentation per modality, the episodic lesion embedding,
and the conventional baseline. Each run writes a checkpoint (``<name>.pt``) every few hundred steps and
resumes from it; randomness is drawn per step from (seed, step), so a resumed run is the same run.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from tqdm import tqdm

from cspine.domain import Modality
from cspine.inference.specs import MODALITY_ORDER, SEG_GEOMETRY, SEG_LABELS, SEG_MODEL_NAMES
from cspine.modeling.data import (
    SEEN_SUBTYPES,
    LesionBank,
    SegCase,
    lesion_bank,
    load_seg_case,
    seg_cases,
)
from cspine.modeling.losses import IGNORE, NOT_TUMOR, Box, prototypical_loss, seg_loss
from cspine.modeling.networks import BaselineClassifier, LesionEncoder, ProtoClassifier, UNet2D
from cspine.phantom.tumors import TumorSubtype

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY = 250
BOX_PRIORS = ("core", "ellipsoid")
DEFAULT_BOX_PRIOR = "core"
TORCH_THREADS = 2


@dataclass(frozen=True)
class SegConfig:
    modality: Modality
    tumor_labels: str = "box"  # box: one bounding box per lesion (weak); mask: the full lesion mask
    cases: int = 120
    data_seed: int = 1
    steps: int = 1500
    stack: int = 8  # consecutive slices per stack (radiographs: 1)
    stacks: int = 4  # stacks per batch
    crop: int | None = 96  # square training crops around the spine; None: whole images
    coordinates: bool = False  # coordinate channels (whole images only)
    lr: float = 3e-3
    widths: tuple[int, ...] = (12, 24, 48, 96)
    seed: int = 0
    # With box labels, what a box says about its lesion (``box_prior_labels``): "core", the inscribed
    # ellipsoid's core is lesion and the rest of the box unknown; "ellipsoid", the whole inscribed ellipsoid is
    # lesion and the rest of the box is not.
    box_prior: str = DEFAULT_BOX_PRIOR
    # With box labels, after this share of the steps the model's own lesion masks fill the boxes
    # (self-training, as in BoxSup) and training goes on with them as labels; 1: never.
    pseudo_from: float = 0.5
    # A structure too small and rare to be learned from random stacks (CT's OPLL: 15 of the 120 studies, a few
    # hundred voxels each): ``focus_stacks`` more stacks per batch, each holding one of its voxels (drawn from their
    # own random stream, so the other stacks are the recipe's without them).
    focus: str | None = None
    focus_stacks: int = 0

    def __post_init__(self) -> None:
        if self.tumor_labels not in ("box", "mask"):
            raise ValueError(f"tumor labels must be box or mask, got {self.tumor_labels!r}")
        if self.box_prior not in BOX_PRIORS:
            raise ValueError(f"box prior must be one of {', '.join(BOX_PRIORS)}, got {self.box_prior!r}")
        if not 0 < self.pseudo_from <= 1:
            raise ValueError(f"self-training must start after a share of the steps in (0, 1], got {self.pseudo_from}")
        if self.focus_stacks < 0:
            raise ValueError(f"focused stacks must be 0 or more, got {self.focus_stacks}")
        if self.focus_stacks and self.focus is None:
            raise ValueError(f"{self.modality.value} models have no structure to focus stacks on")
        if self.focus is not None and self.focus not in SEG_LABELS[self.modality]:
            raise ValueError(f"{self.modality.value} models have no {self.focus!r} label to focus on")
        if self.coordinates and self.crop is not None:
            raise ValueError("a model with coordinate channels must be trained on whole images (crop=None)")

    @classmethod
    def for_modality(cls, modality: Modality, **overrides) -> SegConfig:
        """Defaults per modality: CT and MR learn from crops (3× cheaper per step); the radiograph model
        sees whole images with coordinate channels, because which vertebra is C2 depends on position."""
        return cls(modality=modality, **{**_SEG_DEFAULTS[modality], **overrides})

    @property
    def name(self) -> str:
        name = SEG_MODEL_NAMES[self.modality]
        if self.tumor_labels == "mask":
            return name + "_mask"
        default = SegConfig.for_modality(self.modality)
        if self.box_prior != default.box_prior:
            name += f"_{self.box_prior}"
        if self.pseudo_from != default.pseudo_from:
            name += f"_st{self.pseudo_from:g}"
        if self.focus_stacks != default.focus_stacks:
            name += f"_focus{self.focus_stacks}"
        return name


_SEG_DEFAULTS: dict[Modality, dict] = {
    Modality.CT: {"stack": 8, "stacks": 4, "crop": 96, "focus": "opll"},
    # MR: the whole inscribed ellipsoid as lesion, no self-training (measured better than the core prior with
    # self-training on both MR contrasts: model_repository/README.md)
    Modality.MR: {"stack": 8, "stacks": 2, "crop": 128, "box_prior": "ellipsoid", "pseudo_from": 1.0},
    Modality.XR: {"stack": 1, "stacks": 8, "crop": None, "coordinates": True},
}


@dataclass(frozen=True)
class EmbedConfig:
    episodes: int = 2500
    ways: int = 5
    shots: int = 5
    queries: int = 5
    per_subtype: int = 60
    bank_seed: int = 2
    lr: float = 1e-3
    widths: tuple[int, ...] = (32, 64, 96, 128)
    seed: int = 0
    # SYNTHETIC studies per seen subtype run through the pipeline, their ROIs cut about the lesions the service
    # found (evaluation/service_cut.py), added to the lesions cut about their true centres (0: none)
    service_cut_per_subtype: int = 0
    # share of the lesions imaged by a randomly drawn scanner and protocol (phantom/scanner.py varied_scanner)
    # instead of the default site's (0: none)
    scanners: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.scanners <= 1.0:
            raise ValueError(
                f"the share of lesions imaged by a varied scanner must be between 0 and 1, got {self.scanners}"
            )


def _config_dict(config) -> dict:
    return {k: (v.value if isinstance(v, Modality) else v) for k, v in dataclasses.asdict(config).items()}


@dataclass
class Run:
    """A checkpointed training run: model and optimiser state, the step reached, and the loss history."""

    path: Path
    config: dict
    step: int = 0
    history: list[dict] = field(default_factory=list)

    def resume(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        if not self.path.exists():
            return
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        if state.get("config") != self.config:
            logger.warning("%s was made with another configuration; starting afresh", self.path)
            return
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        self.step, self.history = state["step"], state["history"]

    def save(self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(
            {
                "config": self.config,
                "step": self.step,
                "history": self.history,
                "modules": {name: m.state_dict() for name, m in modules.items()},
                "optimizer": optimizer.state_dict(),
            },
            partial,
        )
        partial.replace(self.path)


def _schedule(optimizer: torch.optim.Optimizer, base_lr: float, step: int, total: int) -> None:
    warmup = max(1, total // 20)
    factor = (
        (step + 1) / warmup if step < warmup else 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, total - warmup)))
    )
    for group in optimizer.param_groups:
        group["lr"] = base_lr * float(max(factor, 0.02))


# --------------------------------------------------------------------------------------------------------
# Segmentation


_FLIPPABLE = {Modality.CT: True, Modality.MR: False, Modality.XR: True}  # left–right / anterior–posterior


def _crop_origin(labels: np.ndarray, box, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a training crop: around the chosen lesion box, else around a random labelled
    pixel (the spine), with jitter; always inside the image."""
    _, h, w = labels.shape
    if box is not None:  # the whole box inside the crop when it fits, anywhere in it

        def start(extent: slice, limit: int) -> int:
            lo, hi = max(0, extent.stop - size), min(limit - size, extent.start)
            return (
                int(rng.integers(lo, hi + 1))
                if lo <= hi
                else int(np.clip((extent.start + extent.stop - size) // 2, 0, limit - size))
            )

        return start(box[1], h), start(box[2], w)
    found = np.argwhere(labels[len(labels) // 2] > 0)
    centre = tuple(found[int(rng.integers(len(found)))]) if len(found) else (h / 2, w / 2)
    r = int(round(centre[0] - size / 2 + rng.integers(-size // 6, size // 6 + 1)))
    c = int(round(centre[1] - size / 2 + rng.integers(-size // 6, size // 6 + 1)))
    return int(np.clip(r, 0, h - size)), int(np.clip(c, 0, w - size))


def _stack(case: SegCase, boxes: list, rng: np.random.Generator, config: SegConfig, focus: np.ndarray | None = None):
    """A run of consecutive slices of one case: inputs [L, C, H, W], targets [L, H, W] (IGNORE inside
    lesion boxes with box supervision) and the boxes lying wholly inside the run, in its coordinates.
    ``focus`` (a voxel k, i, j): the run and the crop hold it, anywhere in them."""
    modality = config.modality
    context = SEG_GEOMETRY[modality].context
    roles = list(case.images)
    volume = case.images[roles[int(rng.integers(len(roles)))]]
    count = volume.shape[0]
    chosen: tuple[slice, ...] | None
    if focus is not None:
        chosen = tuple(slice(int(v), int(v) + 1) for v in focus)
    else:
        chosen = boxes[int(rng.integers(len(boxes)))] if boxes and rng.random() < 0.5 else None
    if chosen is not None:  # a whole lesion box, padded with neighbours to the stack length
        lo, hi = chosen[0].start, chosen[0].stop
        spare = max(0, config.stack - (hi - lo))
        lo = max(0, lo - int(rng.integers(0, spare + 1)))
        hi = min(count, max(hi, lo + config.stack))
    else:
        lo = int(rng.integers(0, max(1, count - config.stack + 1)))
        hi = min(count, lo + config.stack)
    index = np.clip(np.arange(lo, hi)[:, None] + np.arange(-context, context + 1)[None, :], 0, count - 1)
    inputs = volume[index].astype(np.float32)
    targets = (case.labels if case.pseudo is None else case.pseudo)[lo:hi].copy()
    h, w = targets.shape[1:]
    r0, c0, size_r, size_c = 0, 0, h, w
    if config.crop is not None and config.crop < min(h, w):
        r0, c0 = _crop_origin(targets, chosen, config.crop, rng)
        size_r = size_c = config.crop
        inputs = inputs[..., r0 : r0 + size_r, c0 : c0 + size_c]
        targets = targets[:, r0 : r0 + size_r, c0 : c0 + size_c]
    stack_boxes = []
    for n, b in enumerate(boxes if config.tumor_labels == "box" else []):
        k0, k1 = max(b[0].start, lo), min(b[0].stop, hi)
        i0, i1 = max(b[1].start - r0, 0), min(b[1].stop - r0, size_r)
        j0, j1 = max(b[2].start - c0, 0), min(b[2].stop - c0, size_c)
        if k0 >= k1 or i0 >= i1 or j0 >= j1:
            continue
        if n not in case.filled:
            targets[k0 - lo : k1 - lo, i0:i1, j0:j1] = IGNORE  # inside a box nothing is known
        whole = (
            b[0].start >= lo
            and b[0].stop <= hi
            and b[1].start >= r0
            and b[1].stop <= r0 + size_r
            and b[2].start >= c0
            and b[2].stop <= c0 + size_c
        )
        if whole:
            stack_boxes.append(Box(k0 - lo, k1 - lo, i0, i1, j0, j1))
    inputs = inputs * np.float32(rng.uniform(0.9, 1.1)) + np.float32(rng.normal(0, 0.03))
    if _FLIPPABLE[modality] and rng.random() < 0.5:
        inputs, targets = inputs[..., ::-1], targets[..., ::-1]
        width = targets.shape[-1]
        stack_boxes = [dataclasses.replace(b, j0=width - b.j1, j1=width - b.j0) for b in stack_boxes]
    return np.ascontiguousarray(inputs), np.ascontiguousarray(targets), stack_boxes


def training_device() -> torch.device:
    """Where training runs (segmentation, the lesion embedding): the GPU when torch sees one (CUDA), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _predict_probabilities(net: UNet2D, case: SegCase, modality: Modality) -> np.ndarray:
    """Softmax [K, classes, S, S] of a case, averaged over its series (T1 and T2 for MR)."""
    context = SEG_GEOMETRY[modality].context
    total: np.ndarray | None = None
    net.eval()
    with torch.no_grad():
        for volume in case.images.values():
            count = volume.shape[0]
            index = np.clip(np.arange(count)[:, None] + np.arange(-context, context + 1)[None, :], 0, count - 1)
            x = torch.from_numpy(volume[index].astype(np.float32)).to(_device_of(net))
            probs = torch.cat([torch.softmax(net(x[i : i + 16]), 1) for i in range(0, count, 16)]).cpu().numpy()
            total = probs if total is None else total + probs
    net.train()
    if total is None:
        raise ValueError(f"a {modality.value} case without images has nothing to predict")
    return total / len(case.images)


def pseudo_labels(net: UNet2D, case: SegCase, boxes: list, modality: Modality) -> tuple[np.ndarray, frozenset[int]]:
    """The case's labels with each box filled by the model's answer: its largest lesion in the box as
    tumor, the most likely other structure elsewhere in the box."""
    tumor_class = SEG_LABELS[modality].index("tumor")
    probs = _predict_probabilities(net, case, modality)
    predicted = probs.argmax(1).astype(np.uint8)
    probs[:, tumor_class] = -1.0
    other = probs.argmax(1).astype(np.uint8)
    filled_labels, filled = case.labels.copy(), set()
    for n, box in enumerate(boxes):
        tumor = predicted[box] == tumor_class
        if not tumor.any():
            continue
        parts, count = ndimage.label(tumor, structure=np.ones((3, 3, 3)))
        sizes = ndimage.sum_labels(tumor, parts, index=np.arange(1, count + 1))
        lesion = parts == 1 + int(np.argmax(sizes))
        filled_labels[box] = np.where(lesion, tumor_class, other[box])
        filled.add(n)
    return filled_labels, frozenset(filled)


ELLIPSOID_CORE = 0.8  # share of the inscribed ellipsoid's radii taken as certainly lesion ("core")


def box_prior_labels(case: SegCase, boxes: list, tumor_class: int, prior: str = DEFAULT_BOX_PRIOR) -> SegCase:
    """Targets of box supervision before self-training. Lesions are roughly ellipsoidal and touch every side of
    their tight box. "core": the core of the inscribed ellipsoid is lesion and the rest of the box unknown;
    "ellipsoid": the whole inscribed ellipsoid is lesion and the rest of the box is not (``NOT_TUMOR``: some
    structure, unknown which)."""
    targets = case.labels.copy()
    inside, outside = (ELLIPSOID_CORE, IGNORE) if prior == "core" else (1.0, NOT_TUMOR)
    for box in boxes:
        centre = [(s.start + s.stop - 1) / 2 for s in box]
        radii = [max((s.stop - s.start) / 2, 0.5) for s in box]
        grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
        r2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True))
        targets[box] = np.where(r2 <= inside**2, tumor_class, outside)
    return dataclasses.replace(case, pseudo=targets, filled=frozenset(range(len(boxes))))


def _with_pseudo_labels(net, cases, boxes, modality, path: Path) -> list[SegCase]:
    """Cases whose boxes are filled by ``net`` (saved to ``path``, or read from it when resuming)."""
    if path.exists():
        with np.load(path) as npz:
            stored = {int(k.split("_")[1]): npz[k] for k in npz.files if k.startswith("labels_")}
            filled = {int(k.split("_")[1]): frozenset(npz[k].tolist()) for k in npz.files if k.startswith("filled_")}
    else:
        stored, filled = {}, {}
        for i, (case, case_boxes) in enumerate(zip(cases, boxes, strict=True)):
            if case_boxes:
                stored[i], filled[i] = pseudo_labels(net, case, case_boxes, modality)
        arrays = {f"labels_{i}": v for i, v in stored.items()}
        arrays.update({f"filled_{i}": np.array(sorted(v), dtype=np.int64) for i, v in filled.items()})
        partial = path.with_suffix(".partial.npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(partial, **arrays)
        partial.rename(path)
    return [
        dataclasses.replace(case, pseudo=stored[i], filled=filled[i]) if i in stored else case
        for i, case in enumerate(cases)
    ]


def train_seg(
    config: SegConfig,
    cache: Path,
    out_dir: Path,
    workers: int = 1,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Train (or resume) one segmentation model; returns its checkpoint path. ``stop_after`` ends this
    run at that step with a checkpoint (a later call resumes from it)."""
    torch.set_num_threads(TORCH_THREADS)
    modality = config.modality
    paths = seg_cases(cache, config.data_seed, config.cases, workers=workers, progress=progress)
    labels = SEG_LABELS[modality]
    torch.manual_seed(config.seed)
    net = UNet2D(SEG_GEOMETRY[modality].channels, len(labels), config.widths, config.coordinates)
    run = Run(out_dir / f"{config.name}.pt", _config_dict(config))
    return seg_loop(config, paths, net, run, progress, stop_after)


def finetune_seg(
    config: SegConfig,
    paths: list[Path],
    start: Path,
    checkpoint: Path,
    identity: dict,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Fine-tune (or resume) an exported segmentation model (``start``: its model.onnx) on the cached cases
    ``paths`` with ``config``'s recipe, its BatchNorms frozen (``export.load_seg_onnx``); ``identity`` (what
    the cases are, where the start came from) goes into the checkpoint's configuration, so a run resumes only
    on the same data and start."""
    from cspine.modeling.export import freeze_batchnorm, load_seg_onnx

    torch.set_num_threads(TORCH_THREADS)
    net, _ = load_seg_onnx(start)
    run = Run(checkpoint, {**_config_dict(config), **identity, "start": str(start)})
    return seg_loop(config, paths, net, run, progress, stop_after, freeze_batchnorm)


def seg_loop(
    config: SegConfig,
    paths: list[Path],
    net: UNet2D,
    run: Run,
    progress: bool,
    stop_after: int | None,
    prepare: Callable[[UNet2D], None] | None = None,
) -> Path:
    """The training loop of a segmentation model on cached cases (``load_seg_case`` arrays): resumes ``run``,
    checkpoints it, and returns its path. ``prepare`` is called on the net before every step (a fine-tuning run
    freezes its BatchNorms)."""
    modality = config.modality
    cases = [load_seg_case(p, modality) for p in paths]
    boxes = [c.boxes() for c in cases]
    tumor_class = SEG_LABELS[modality].index("tumor")
    out_dir = run.path.parent
    device = training_device()
    net.to(device)
    if prepare is not None:
        prepare(net)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=config.lr, weight_decay=1e-4)
    run.resume({"net": net}, optimizer)
    name = run.path.stem
    bar = tqdm(total=config.steps, initial=run.step, desc=f"{name} ({device.type})", unit="step", disable=not progress)
    started = time.monotonic()
    end = min(config.steps, stop_after or config.steps)
    pseudo_step = int(config.pseudo_from * config.steps) if config.tumor_labels == "box" else None
    pseudo_path = out_dir / f"{name}.pseudo.npz"
    if config.tumor_labels == "box":
        cases = [box_prior_labels(c, b, tumor_class, config.box_prior) for c, b in zip(cases, boxes, strict=True)]
    if pseudo_step is not None and run.step >= pseudo_step and pseudo_path.exists():
        cases = _with_pseudo_labels(net, cases, boxes, modality, pseudo_path)
    focus = _focus_voxels(cases, config)
    while run.step < end:
        if run.step == pseudo_step:
            cases = _with_pseudo_labels(net, cases, boxes, modality, pseudo_path)
        net.train()
        if prepare is not None:
            prepare(net)
        rng = np.random.default_rng([config.seed, run.step])
        torch.manual_seed(config.seed * 1_000_003 + run.step)
        parts, offset, batch_boxes = [], 0, []
        focus_rng = np.random.default_rng([config.seed, run.step, 1])
        for n in range(config.stacks + (config.focus_stacks if focus else 0)):
            if n < config.stacks:
                c, stack_rng, point = int(rng.integers(len(cases))), rng, None
            else:
                c = list(focus)[int(focus_rng.integers(len(focus)))]
                stack_rng, point = focus_rng, focus[c][int(focus_rng.integers(len(focus[c])))]
            inputs, targets, stack_boxes = _stack(cases[c], boxes[c], stack_rng, config, point)
            parts.append((inputs, targets))
            batch_boxes += [dataclasses.replace(b, k0=b.k0 + offset, k1=b.k1 + offset) for b in stack_boxes]
            offset += len(inputs)
        x = torch.from_numpy(np.concatenate([p[0] for p in parts])).to(device)
        y = torch.from_numpy(np.concatenate([p[1] for p in parts]).astype(np.int64)).to(device)
        centre = x[:, SEG_GEOMETRY[modality].context]
        _schedule(optimizer, config.lr, run.step, config.steps)
        optimizer.zero_grad(set_to_none=True)
        loss = seg_loss(net(x), y, centre, batch_boxes, tumor_class)
        loss.backward()
        optimizer.step()
        run.step += 1
        run.history.append({"step": run.step, "loss": float(loss.detach())})
        bar.update()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if run.step % CHECKPOINT_EVERY == 0 or run.step == end:
            run.save({"net": net}, optimizer)
    bar.close()
    logger.info("%s trained to step %d in %.0f s on %s", name, run.step, time.monotonic() - started, device)
    return run.path


def _focus_voxels(cases: list[SegCase], config: SegConfig) -> dict[int, np.ndarray]:
    """The voxels (k, i, j) of the focused structure, per case that has it."""
    if config.focus is None or config.focus_stacks == 0:
        return {}
    label = SEG_LABELS[config.modality].index(config.focus)
    voxels = {n: np.argwhere(c.labels == label) for n, c in enumerate(cases)}
    return {n: v for n, v in voxels.items() if len(v)}


def load_seg(path: Path) -> tuple[UNet2D, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    config = state["config"]
    modality = Modality(config["modality"])
    widths, coordinates = tuple(config["widths"]), config["coordinates"]
    net = UNet2D(SEG_GEOMETRY[modality].channels, len(SEG_LABELS[modality]), widths, coordinates)
    net.load_state_dict(state["modules"]["net"])
    return net.eval(), state


# --------------------------------------------------------------------------------------------------------
# Lesion embedding (episodic) and the conventional baseline


def augment_rois(rois: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Small shifts (±3 px) and intensity jitter of ROIs [N, 3, 64, 64]."""
    out = np.empty_like(rois)
    for n, roi in enumerate(rois):
        dy, dx = rng.integers(-3, 4, size=2)
        out[n] = np.roll(roi, (int(dy), int(dx)), axis=(1, 2))
    out *= rng.uniform(0.9, 1.1, size=(len(rois), 1, 1, 1)).astype(np.float32)
    out += rng.normal(0, 0.02, size=out.shape).astype(np.float32)
    return out


def _one_hot(modalities: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.eye(len(MODALITY_ORDER), dtype=np.float32)[modalities])


def _bank(config: EmbedConfig, cache: Path, workers: int, progress: bool, service_cut: LesionBank | None) -> LesionBank:
    """The seen subtypes' lesions cut about their true centres, then those of ``service_cut``: studies the
    pipeline analysed, cut about the lesions it matched (NaN where a modality had none)."""
    bank = lesion_bank(
        cache,
        config.bank_seed,
        SEEN_SUBTYPES,
        config.per_subtype,
        workers=workers,
        progress=progress,
        scanners=config.scanners,
    )
    if service_cut is None:
        return bank
    return LesionBank(
        np.concatenate([bank.rois, service_cut.rois]),
        np.concatenate([bank.subtypes, service_cut.subtypes]),
        np.concatenate([bank.classes, service_cut.classes]),
    )


def members_by_modality(bank: LesionBank, codes: list[int]) -> list[dict[int, np.ndarray]]:
    """Per modality, the rows of each subtype that have an ROI of that modality (not NaN)."""
    present = ~np.isnan(bank.rois).any(axis=(2, 3, 4))  # [N, modalities]
    return [
        {code: np.nonzero((bank.subtypes == code) & present[:, m])[0] for code in codes}
        for m in range(len(MODALITY_ORDER))
    ]


def train_embed(
    config: EmbedConfig,
    cache: Path,
    out_dir: Path,
    workers: int = 1,
    progress: bool = True,
    stop_after: int | None = None,
    service_cut: LesionBank | None = None,
) -> Path:
    """Meta-train the lesion encoder and the prototype temperature on N-way K-shot episodes of the seen
    subtypes (one modality per episode), on ``service_cut`` too when the config asks for service-cut studies
    (``evaluation.service_cut.service_cut_bank``: the caller builds it, as it runs the pipeline)."""
    if (service_cut is None) != (config.service_cut_per_subtype == 0):
        raise ValueError("service_cut_per_subtype > 0 needs the service-cut bank, and only then")
    torch.set_num_threads(TORCH_THREADS)
    bank = _bank(config, cache, workers, progress, service_cut)
    codes = [list(TumorSubtype).index(s) for s in SEEN_SUBTYPES]
    by_subtype = members_by_modality(bank, codes)
    torch.manual_seed(config.seed)
    encoder, proto = LesionEncoder(config.widths), ProtoClassifier()
    encoder.to(training_device())
    proto.to(training_device())
    params = list(encoder.parameters()) + list(proto.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-4)
    modules = {"encoder": encoder, "proto": proto}
    run = Run(out_dir / "lesion_embed.pt", _config_dict(config))
    run.resume(modules, optimizer)
    bar = tqdm(total=config.episodes, initial=run.step, desc="lesion_embed", unit="episode", disable=not progress)
    encoder.train()
    per_class = config.shots + config.queries
    end = min(config.episodes, stop_after or config.episodes)
    while run.step < end:
        rng = np.random.default_rng([config.seed, run.step])
        torch.manual_seed(config.seed * 1_000_003 + run.step)
        modality = int(rng.integers(len(MODALITY_ORDER)))
        chosen = rng.choice(codes, size=min(config.ways, len(codes)), replace=False)
        picks = np.stack([rng.choice(by_subtype[modality][c], size=per_class, replace=False) for c in chosen])
        support, query = picks[:, : config.shots].ravel(), picks[:, config.shots :].ravel()
        rois = augment_rois(bank.rois[np.concatenate([support, query]), modality], rng)
        shape = (len(chosen), config.shots, config.queries)
        _episode(run, encoder, proto, optimizer, modules, (config.lr, config.episodes, end), bar, rois, modality, shape)
    bar.close()
    return run.path


def _episode(
    run: Run,
    encoder: LesionEncoder,
    proto: ProtoClassifier,
    optimizer: torch.optim.Optimizer,
    modules: dict[str, torch.nn.Module],
    schedule: tuple[float, int, int],
    bar: tqdm,
    rois: np.ndarray,
    modality: int,
    shape: tuple[int, int, int],
) -> None:
    """One prototypical episode of ``shape`` (ways, shots, queries) on one modality's ``rois`` (the support cases
    class by class, then the queries), at the ``schedule`` (base learning rate, episodes, last episode of this
    call): the loss on the queries, one optimiser step, the history, and a checkpoint when one is due."""
    ways, shots, queries = shape
    lr, total, end = schedule
    device = _device_of(encoder)
    emb = encoder(torch.from_numpy(rois).to(device), _one_hot(np.full(len(rois), modality)).to(device))
    labels = torch.arange(ways, device=device).repeat_interleave(shots)
    query_labels = torch.arange(ways, device=device).repeat_interleave(queries)
    _schedule(optimizer, lr, run.step, total)
    optimizer.zero_grad(set_to_none=True)
    split = ways * shots
    loss, accuracy = prototypical_loss(proto.logits, emb[:split], labels, emb[split:], query_labels)
    loss.backward()
    optimizer.step()
    run.step += 1
    run.history.append({"step": run.step, "loss": float(loss.detach()), "accuracy": float(accuracy)})
    bar.update()
    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{float(accuracy):.2f}")
    if run.step % CHECKPOINT_EVERY == 0 or run.step == end:
        run.save(modules, optimizer)


@dataclass(frozen=True)
class EmbedFinetune:
    """Fine-tuning the served lesion embedding on a site's lesions (``finetune_embed``): class episodes of
    ``shots`` support and ``queries`` query lesions per class, fewer where a modality has fewer lesions."""

    episodes: int = 300
    shots: int = 5
    queries: int = 5
    lr: float = 3e-4
    seed: int = 0


def finetune_embed(
    config: EmbedFinetune,
    rois: np.ndarray,
    classes: np.ndarray,
    start: Path,
    scale: float,
    checkpoint: Path,
    identity: dict,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """Fine-tune (or resume) an exported lesion embedding (``start``: its model.onnx) on a site's lesions
    (``rois`` [N, modalities, 3, 64, 64], NaN where a lesion lacks a modality; ``classes`` [N]): the trunk and the
    BatchNorms frozen, the last block and the projection trained on episodes over the classes, one modality per
    episode, with the prototype classifier's ``scale`` fixed (the served ``proto_classify`` stays as it is)."""
    from cspine.modeling.export import freeze_batchnorm, load_embed_onnx

    torch.set_num_threads(TORCH_THREADS)
    encoder, _ = load_embed_onnx(start)
    for parameter in encoder.trunk.parameters():
        parameter.requires_grad_(False)
    proto = ProtoClassifier(scale)
    proto.log_scale.requires_grad_(False)
    encoder.to(training_device())
    proto.to(training_device())
    kinds = sorted(set(int(c) for c in classes))
    present = ~np.isnan(rois).any(axis=(2, 3, 4))  # [N, modalities]
    members = [{c: np.nonzero(present[:, m] & (classes == c))[0] for c in kinds} for m in range(len(MODALITY_ORDER))]
    usable = [m for m in range(len(MODALITY_ORDER)) if len(kinds) > 1 and min(map(len, members[m].values())) >= 2]
    if not usable:
        raise ValueError("fine-tuning the embedding needs at least 2 lesions of each of 2 classes in one modality")
    params = [p for p in encoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=1e-4)
    run = Run(checkpoint, {**_config_dict(config), **identity, "start": str(start), "scale": scale})
    modules: dict[str, torch.nn.Module] = {"encoder": encoder}
    run.resume(modules, optimizer)
    bar = tqdm(total=config.episodes, initial=run.step, desc="lesion_embed", unit="episode", disable=not progress)
    encoder.train()
    freeze_batchnorm(encoder)
    end = min(config.episodes, stop_after or config.episodes)
    while run.step < end:
        rng = np.random.default_rng([config.seed, run.step])
        torch.manual_seed(config.seed * 1_000_003 + run.step)
        m = int(rng.choice(usable))
        fewest = min(map(len, members[m].values()))
        shots = min(config.shots, fewest // 2)
        queries = min(config.queries, fewest - shots)
        picks = np.stack([rng.choice(members[m][c], size=shots + queries, replace=False) for c in kinds])
        support, query = picks[:, :shots].ravel(), picks[:, shots:].ravel()
        batch = augment_rois(rois[np.concatenate([support, query]), m].astype(np.float32), rng)
        schedule = (config.lr, config.episodes, end)
        _episode(run, encoder, proto, optimizer, modules, schedule, bar, batch, m, (len(kinds), shots, queries))
    bar.close()
    return run.path


def train_baseline(
    config: EmbedConfig,
    cache: Path,
    out_dir: Path,
    workers: int = 1,
    progress: bool = True,
    stop_after: int | None = None,
) -> Path:
    """The conventional baseline's pre-training: the same encoder with a linear head, trained with
    cross-entropy on the seen subtypes, cut about their true centres."""
    torch.set_num_threads(TORCH_THREADS)
    bank = _bank(config, cache, workers, progress, None)
    codes = [list(TumorSubtype).index(s) for s in SEEN_SUBTYPES]
    targets_of = {code: i for i, code in enumerate(codes)}
    pool = np.nonzero(np.isin(bank.subtypes, codes))[0]
    torch.manual_seed(config.seed)
    model = BaselineClassifier(LesionEncoder(config.widths), len(codes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    run = Run(out_dir / "baseline.pt", _config_dict(config))
    run.resume({"model": model}, optimizer)
    batch = config.ways * (config.shots + config.queries)
    bar = tqdm(total=config.episodes, initial=run.step, desc="baseline", unit="step", disable=not progress)
    model.train()
    end = min(config.episodes, stop_after or config.episodes)
    while run.step < end:
        rng = np.random.default_rng([config.seed, run.step])
        torch.manual_seed(config.seed * 1_000_003 + run.step)
        picks = rng.choice(pool, size=batch, replace=False)
        modalities = rng.integers(len(MODALITY_ORDER), size=batch)
        rois = augment_rois(bank.rois[picks, modalities], rng)
        y = torch.tensor([targets_of[int(c)] for c in bank.subtypes[picks]])
        _schedule(optimizer, config.lr, run.step, config.episodes)
        optimizer.zero_grad(set_to_none=True)
        logits = model(torch.from_numpy(rois), _one_hot(modalities))
        loss = torch.nn.functional.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        run.step += 1
        accuracy = float((logits.argmax(1) == y).float().mean())
        run.history.append({"step": run.step, "loss": float(loss.detach()), "accuracy": accuracy})
        bar.update()
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{accuracy:.2f}")
        if run.step % CHECKPOINT_EVERY == 0 or run.step == end:
            run.save({"model": model}, optimizer)
    bar.close()
    return run.path


def load_embed(path: Path) -> tuple[LesionEncoder, ProtoClassifier, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    encoder, proto = LesionEncoder(tuple(state["config"]["widths"])), ProtoClassifier()
    encoder.load_state_dict(state["modules"]["encoder"])
    proto.load_state_dict(state["modules"]["proto"])
    return encoder.eval(), proto.eval(), state


def load_baseline(path: Path) -> tuple[BaselineClassifier, dict]:
    state = torch.load(path, map_location="cpu", weights_only=False)
    model = BaselineClassifier(LesionEncoder(tuple(state["config"]["widths"])), len(SEEN_SUBTYPES))
    model.load_state_dict(state["modules"]["model"])
    return model.eval(), state
