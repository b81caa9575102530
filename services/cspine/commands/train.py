"""``cspine train`` and ``cspine export``: train the models on SYNTHETIC phantom data, export them to ONNX."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from cspine.config import Settings


def _split_names(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}")
    return names


def cmd_train(args: argparse.Namespace) -> int:
    from cspine.modeling.recipes import MODEL_NAMES, PRESETS, train_models
    from cspine.modeling.train import EmbedConfig

    names = _split_names(args.models, MODEL_NAMES)
    overrides = {"tumor_labels": args.tumor_labels} if args.tumor_labels else {}
    if args.steps:
        overrides["steps"] = args.steps
    preset = PRESETS[args.preset]
    if args.embed_seed is not None:
        preset = dataclasses.replace(preset, embed={**preset.embed, "seed": args.embed_seed})
    service_cut = None
    if args.service_cut:
        from cspine.evaluation.service_cut import service_cut_bank
        from cspine.modeling.data import SEEN_SUBTYPES

        embed = {**preset.embed, "service_cut_per_subtype": args.service_cut}
        preset = dataclasses.replace(preset, embed=embed)
        bank_seed = EmbedConfig(**embed).bank_seed
        cut = service_cut_bank(
            Path(args.cache), bank_seed, SEEN_SUBTYPES, args.service_cut, args.workers, not args.quiet
        )
        service_cut = cut.usable()
    done = train_models(
        names,
        preset,
        Path(args.cache),
        Path(args.checkpoints),
        args.workers,
        not args.quiet,
        args.stop_after,
        service_cut=service_cut,
        **overrides,
    )
    for name, path in done.items():
        print(f"{name}: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cspine.modeling.recipes import export_models

    for path in export_models(Path(args.checkpoints), Path(args.repository)):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "train",
        help="train models on SYNTHETIC phantom data (CPU, deterministic, checkpointed)",
        description="Checkpoints go to --checkpoints and runs resume from them. The full preset reproduces "
        "the shipped models (make train); smoke trains tiny models for seconds.",
    )
    p.add_argument(
        "--models",
        default="seg_ct,seg_mr,seg_xr,seg_ct_mask,lesion_embed,baseline",
        help="comma-separated: seg_ct, seg_mr, seg_xr, seg_ct_mask (CT with full lesion masks, for "
        "comparison), lesion_embed (episodic, with the prototype classifier), baseline",
    )
    p.add_argument("--preset", default="full", choices=["full", "smoke"])
    p.add_argument(
        "--tumor-labels",
        choices=["box", "mask"],
        default=None,
        help="lesion supervision of segmentation models: box (default; one box per lesion) or mask",
    )
    p.add_argument("--steps", type=int, default=None, help="override the preset's segmentation steps")
    p.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="checkpoint and stop at this step; the next call resumes (train in slices)",
    )
    p.add_argument(
        "--service-cut",
        type=int,
        default=0,
        metavar="N",
        help="lesion_embed also trains on N SYNTHETIC studies per seen subtype run through the pipeline (a local "
        "Triton with the shipped models), their ROIs cut about the lesions it found, as the service cuts them "
        "(default 0: lesions cut about their true centres only, as shipped)",
    )
    p.add_argument(
        "--embed-seed",
        type=int,
        default=None,
        metavar="S",
        help="training seed of lesion_embed and baseline (default: the preset's, 0, as shipped)",
    )
    p.add_argument("--cache", default=".cache/cspine", help="where generated training data is cached")
    p.add_argument("--checkpoints", default=".cache/cspine/checkpoints", help="checkpoint folder")
    p.add_argument("--workers", type=int, default=2, help="processes generating phantom data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("export", help="export trained checkpoints to ONNX in the model repository")
    p.add_argument("--checkpoints", default=".cache/cspine/checkpoints")
    p.add_argument("--repository", default="model_repository")
    p.set_defaults(func=cmd_export)
