"""``cspine train`` and ``cspine export``: train the models on SYNTHETIC phantom data, export them to ONNX."""

from __future__ import annotations

import argparse
import dataclasses
from functools import partial
from pathlib import Path

from cspine.config import IngestLimits, Settings

DEFAULT_MODELS = "seg_ct,seg_mr,seg_xr,seg_ct_mask,lesion_embed,baseline"


def _split_names(text: str, allowed: tuple[str, ...]) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise ValueError(f"unknown model(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(allowed)}")
    return names


COHORT_MODELS = ("seg_ct", "seg_mr", "seg_xr", "lesion_embed")


def cmd_train(args: argparse.Namespace, limits: IngestLimits) -> int:
    if args.cohort:
        return _train_on_cohort(args, limits)
    from cspine.modeling.recipes import MODEL_NAMES, PRESETS, train_models
    from cspine.modeling.train import EmbedConfig

    names = _split_names(args.models, MODEL_NAMES)
    overrides: dict = {"tumor_labels": args.tumor_labels} if args.tumor_labels else {}
    if args.steps:
        overrides["steps"] = args.steps
    if args.box_prior:
        overrides["box_prior"] = args.box_prior
    if args.self_training_from is not None:
        overrides["pseudo_from"] = args.self_training_from
    if args.focus_stacks is not None:
        overrides["focus_stacks"] = args.focus_stacks
    preset = PRESETS[args.preset]
    if args.embed_seed is not None:
        preset = dataclasses.replace(preset, embed={**preset.embed, "seed": args.embed_seed})
    if args.scanner_variation is not None:
        preset = dataclasses.replace(preset, embed={**preset.embed, "scanners": args.scanner_variation})
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


def _train_on_cohort(args: argparse.Namespace, limits: IngestLimits) -> int:
    from cspine.cohort.training import FINETUNE_STEPS, train_on_cohort
    from cspine.modeling.recipes import SEG_NAMES

    named = args.models != DEFAULT_MODELS
    names = _split_names(args.models if named else ",".join(COHORT_MODELS), COHORT_MODELS)
    results = train_on_cohort(
        Path(args.cohort),
        [SEG_NAMES[n] for n in names if n in SEG_NAMES],
        Path(args.repository),
        Path(args.checkpoints),
        steps=args.steps or FINETUNE_STEPS,
        limits=limits,
        progress=not args.quiet,
        stop_after=args.stop_after,
        embedding="lesion_embed" in names,
        embedding_optional=not named,
    )
    print(
        f"cohort {args.cohort}: {results['train_studies']} train studies, {results['held_out_studies']} held out "
        "(Dice on the model grid: mean over the structures, lesion)"
    )
    for name, entry in results["models"].items():
        if name == "lesion_embed":
            print(_embedding_line(entry))
            continue
        line = (
            f"{name}: {entry['checkpoint']} (step {entry['steps']} of {entry['of_steps']}, "
            f"{entry['train_studies']} studies)"
        )
        held = entry.get("held_out")
        if held:
            served, candidate = held["served"], held["candidate"]
            line += (
                f"; held out ({candidate['images']} images): served {served['mean_dice']} / {served['lesion_dice']}, "
                f"fine-tuned {candidate['mean_dice']} / {candidate['lesion_dice']}"
            )
        print(line)
    return 0


def _embedding_line(entry: dict) -> str:
    """lesion_embed's run and its held-out few-shot accuracy, served and fine-tuned (all train lesions as the
    support set; per modality)."""
    if "skipped" in entry:
        return f"lesion_embed: not fine-tuned: {entry['skipped']}"
    line = f"lesion_embed: {entry['checkpoint']} (episode {entry['steps']} of {entry['of_steps']}, "
    line += f"{entry['train_studies']} train lesions)"
    held = entry.get("held_out")
    if held:
        cells = []
        for modality, served in held["served"].items():
            candidate = held["candidate"][modality]
            before, after = served["all"]["accuracy"], candidate["all"]["accuracy"]
            cells.append(f"{modality} ({served['queries']}) {before:.3f} -> {after:.3f}")
        line += "; held-out accuracy, served -> fine-tuned: " + ", ".join(cells)
    return line


def cmd_export(args: argparse.Namespace, limits: IngestLimits) -> int:
    if args.version is not None or args.cohort:
        if args.version is None or not args.cohort:
            raise ValueError("--version N and --cohort DIR go together")
        from cspine.cohort.versions import export_version

        folder = export_version(
            Path(args.repository), Path(args.cohort), Path(args.checkpoints), args.version, limits, not args.quiet
        )
        print(
            f"wrote version {args.version} to {args.repository} and {folder}; "
            f"serve it with cspine models use {args.version}"
        )
        return 0
    from cspine.modeling.recipes import export_models

    for path in export_models(Path(args.checkpoints), Path(args.repository)):
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser(
        "train",
        help="train models on SYNTHETIC phantom data, or fine-tune them on a site's labelled cohort (CPU, "
        "seeded, checkpointed; segmentation on a CUDA GPU when torch sees one)",
        description="Checkpoints go to --checkpoints and runs resume from them. The full preset reproduces "
        "the shipped models (make train); seg_ct trains in two rounds there, the second fine-tuning the first's "
        "export (kept in --checkpoints/first-round/) with one more OPLL stack per batch. smoke trains tiny models "
        "for seconds. --cohort DIR fine-tunes the served "
        "segmentation models and lesion embedding on a site's labelled cohort (docs/cohort.md).",
    )
    p.add_argument(
        "--models",
        default=DEFAULT_MODELS,
        help="comma-separated: seg_ct, seg_mr, seg_xr, seg_ct_mask (CT with full lesion masks, for "
        "comparison), lesion_embed (episodic, with the prototype classifier), baseline; with --cohort: seg_ct, "
        "seg_mr, seg_xr, lesion_embed (default all four; lesion_embed is left out, with the reason printed, when "
        "the cohort's train studies lack lesions of two classes)",
    )
    p.add_argument(
        "--cohort",
        default=None,
        metavar="DIR",
        help="fine-tune the served models (--repository) on a site's labelled cohort instead "
        "(docs/cohort.md): stops on any error cspine cohort check reports; trains on the manifest's train "
        "studies, the segmentation models with each modality's phantom recipe (400 steps unless --steps, "
        "learning rate 1e-3, BatchNorm frozen), the lesion embedding's last block and projection on 300 class "
        "episodes of the studies' labelled lesions; checkpoints to --checkpoints/cohort-<name>/ and resumes; "
        "prints the held-out Dice and few-shot accuracy (validation and test studies) of the served and the "
        "fine-tuned model; trains on the GPU when torch sees one (CUDA)",
    )
    p.add_argument("--repository", default="model_repository", help="with --cohort: the served models to start from")
    p.add_argument("--preset", default="full", choices=["full", "smoke"])
    p.add_argument(
        "--tumor-labels",
        choices=["box", "mask"],
        default=None,
        help="lesion supervision of segmentation models: box (default; one box per lesion) or mask",
    )
    p.add_argument(
        "--box-prior",
        choices=["core", "ellipsoid"],
        default=None,
        help="with box labels, what a box says about its lesion: core (CT and radiograph default) - the inner 80 %% of "
        "the inscribed ellipsoid is lesion, the rest of the box unknown; ellipsoid (MR default) - the whole inscribed "
        "ellipsoid is lesion, the rest of the box is not (the checkpoint's name says when it is not the default)",
    )
    p.add_argument(
        "--self-training-from",
        type=float,
        default=None,
        metavar="F",
        help="with box labels, the share of the steps after which the model's own lesion masks fill the boxes and "
        "training goes on with them (default 0.5, MR 1; 1: no self-training)",
    )
    p.add_argument(
        "--focus-stacks",
        type=int,
        default=None,
        metavar="N",
        help="CT: N more training stacks per batch, each holding an OPLL voxel of a study that has OPLL (default 0; "
        "the checkpoint's name says when it is not the default)",
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
    p.add_argument(
        "--scanner-variation",
        type=float,
        default=None,
        metavar="F",
        help="lesion_embed and baseline: the share F (0-1) of training lesions imaged by a randomly drawn scanner "
        "and protocol (noise, pixel size, contrast, slices, kernel; MR field and weighting) instead of the default "
        "site's (default: the preset's; full: 0.75, as shipped)",
    )
    p.add_argument("--cache", default=".cache/cspine", help="where generated training data is cached")
    p.add_argument("--checkpoints", default=".cache/cspine/checkpoints", help="checkpoint folder")
    p.add_argument("--workers", type=int, default=2, help="processes generating phantom data")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=partial(cmd_train, limits=settings.serve.analysis.limits))

    p = subparsers.add_parser(
        "export",
        help="export trained checkpoints to ONNX in the model repository",
        description="Without --version: the phantom-trained checkpoints as version 1 (the shipped models). With "
        "--version N --cohort DIR: the models cspine train --cohort DIR fine-tuned, as version set N (every "
        "served model in its N/ folder, the others copied from the served version), with versions/N/model_card.json "
        "(base version, cohort counts, held-out Dice), the competence reference refitted on the cohort's train "
        "studies and the base version's calibration. It does not serve it: cspine models use N does.",
    )
    p.add_argument("--checkpoints", default=".cache/cspine/checkpoints")
    p.add_argument("--repository", default="model_repository")
    p.add_argument("--version", type=int, default=None, metavar="N", help="the version set to write (above 1)")
    p.add_argument("--cohort", default=None, metavar="DIR", help="the labelled cohort the models were fine-tuned on")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=partial(cmd_export, limits=settings.serve.analysis.limits))
