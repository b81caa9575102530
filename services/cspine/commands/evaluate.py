"""``cspine evaluate`` (models, embedding, sites, adaptation, pipeline, competence, study) and ``cspine calibrate``:
evaluations that print figures and the fit of the fusion weights and competence reference. The work is the
library's (modeling/, evaluation/); here are the flags and what is printed and written."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
from pathlib import Path

from cspine.commands.client_args import add_data_dir_argument, add_tls_arguments
from cspine.config import Settings
from cspine.inference.local_triton import default_repository


def cmd_evaluate_models(args: argparse.Namespace) -> int:
    if args.cohort:
        return _evaluate_cohort_versions(args)
    from cspine.modeling.figures import format_metrics, write_figures
    from cspine.modeling.recipes import PRESETS, dump, evaluate_models

    metrics = evaluate_models(
        Path(args.repository), Path(args.cache), PRESETS[args.preset], workers=args.workers, progress=not args.quiet
    )
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(dump(metrics))
        write_figures(metrics, Path(args.repository), Path(args.cache), PRESETS[args.preset], out)
    print(dump(metrics) if args.json else format_metrics(metrics))
    return 0


def _evaluate_cohort_versions(args: argparse.Namespace) -> int:
    from cspine.cohort.evaluate import evaluate_versions, format_versions

    result = evaluate_versions(Path(args.cohort), Path(args.repository), args.candidate, progress=not args.quiet)
    _write_json(args.out, "cohort-versions.json", result)
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "studies"}, indent=2))
    else:
        print(format_versions(result))
    return 0


def _site_names(text: str) -> list[str]:
    """Comma-separated site names (empty: every site); an unknown name is a ValueError listing the known ones."""
    from cspine.phantom.sites import SITES, get_site

    sites = [s.strip() for s in text.split(",") if s.strip()] or list(SITES)
    for site in sites:
        get_site(site)
    return sites


def _write_json(out: str | None, name: str, result: dict) -> None:
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / name).write_text(json.dumps(result, indent=2) + "\n")


def _checkpoints(values: list[str]) -> dict[str, Path]:
    """NAME=PATH pairs; a missing file or a name given twice is a ValueError."""
    named: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--checkpoint wants NAME=PATH, not {value!r}")
        if name in named or name == "shipped":
            raise ValueError(f"--checkpoint name {name!r} is used twice (shipped is the repository's)")
        if not Path(path).is_file():
            raise ValueError(f"--checkpoint {name}: no file {path}")
        named[name] = Path(path)
    return named


def cmd_evaluate_segmentation(args: argparse.Namespace) -> int:
    from cspine.domain import Modality
    from cspine.modeling.evaluate import eval_cohort, onnx_seg, seg_comparison, torch_seg
    from cspine.modeling.export import model_path
    from cspine.modeling.recipes import ARTIFACTS, SEG_NAMES
    from cspine.modeling.train import load_seg

    checkpoints = {}
    for name, path in _checkpoints(args.checkpoint).items():
        try:
            net, state = load_seg(path)
        except (KeyError, RuntimeError, pickle.UnpicklingError) as e:
            raise ValueError(f"--checkpoint {name}: {path} is not a segmentation checkpoint of cspine train") from e
        checkpoints[name] = (Modality(state["config"]["modality"]), torch_seg(net))
    modalities = {m for m, _ in checkpoints.values()} or set(SEG_NAMES.values())
    repository = Path(args.repository)
    models = {n: (m, onnx_seg(model_path(repository, n))) for n, m in SEG_NAMES.items() if m in modalities}
    if Modality.CT in modalities and (ARTIFACTS / "seg_ct_mask.onnx").exists():
        models["seg_ct_mask"] = (Modality.CT, onnx_seg(ARTIFACTS / "seg_ct_mask.onnx"))
    for name in checkpoints:
        if name in models:
            raise ValueError(f"--checkpoint name {name!r} is a shipped model's; name it otherwise")
    models.update(checkpoints)
    if args.studies_from:
        cases = sorted(p for p in Path(args.studies_from).glob("case-*") if (p / "truth.json").is_file())
        if not cases:
            raise ValueError(f"--studies-from {args.studies_from}: no phantom case folders (case-*/truth.json)")
        measured_on = f"SYNTHETIC phantom studies in {args.studies_from} ({len(cases)})"
    else:
        cases = eval_cohort(Path(args.cache), args.seed, args.studies)
        measured_on = f"SYNTHETIC phantom studies seed {args.seed} ({len(cases)})"
    reference = {m: n for n, m in SEG_NAMES.items()}
    result = {
        "synthetic": True,
        "measured_on": measured_on + ": DICOM, ingest and serving preprocessing, labels mapped back to each series",
        "reference": {m.value: n for m, n in reference.items() if m in modalities},
        "models": seg_comparison(cases, models, reference),
    }
    _write_json(args.out, "segmentation.json", result)
    print(json.dumps(result, indent=2) if args.json else _format_segmentation(result))
    return 0


def _format_segmentation(result: dict) -> str:
    from cspine.modeling.evaluate import ABSENT_MARK_MM3

    lines = [
        f"Measured on {result['measured_on']}.",
        "lesion Dice per series: mean [95 % CI] (minus the shipped model)",
    ]
    for name, entry in result["models"].items():
        for role, figure in entry["lesion_dice"].items():
            low, high = figure["ci95"]
            line = f"  {name:24s} {role:6s} {figure['mean']:.3f} [{low:.2f}, {high:.2f}] of {figure['cases']}"
            if "minus_reference" in figure:
                d_low, d_high = figure["minus_reference_ci95"]
                line += f"  ({figure['minus_reference']:+.3f} [{d_low:+.3f}, {d_high:+.3f}])"
            lines.append(line)
    sized = {name: entry for name, entry in result["models"].items() if "size_mae_mm" in entry}
    if sized:
        lines.append("CT lesion size (largest lesion's Feret diameter): MAE, bias (mm)")
    for name, entry in sized.items():
        lines.append(f"  {name:24s} {entry['size_mae_mm']:.2f}, {entry['size_bias_mm']:+.2f}")
    lines.append("structure Dice: mean [95 % CI] over the series holding it")
    for name, entry in result["models"].items():
        ci = entry["structure_dice_ci95"]
        structures = ", ".join(
            f"{k} {v:.3f} [{ci[k][0]:.2f}, {ci[k][1]:.2f}]" for k, v in entry["structure_dice"].items()
        )
        lines.append(f"  {name:24s} {structures}")
        if len(entry["structure_dice_by_series"]) > 1:
            for role, by_role in entry["structure_dice_by_series"].items():
                lines.append(f"  {'':24s} {role}: " + ", ".join(f"{k} {v:.3f}" for k, v in by_role.items()))
    lines.append(
        f"series marking a structure they lack (≥ {ABSENT_MARK_MM3:g} mm³ of it): marked of absent (median mm³)"
    )
    for name, entry in result["models"].items():
        marked = ", ".join(
            f"{k} {v['series']} of {v['of']} ({v['median_mm3']:g})" for k, v in entry["marked_where_absent"].items()
        )
        lines.append(f"  {name:24s} {marked}")
    return "\n".join(lines)


def cmd_evaluate_embedding(args: argparse.Namespace) -> int:
    from cspine.evaluation.service_cut import episode_accuracy, service_cut_bank
    from cspine.modeling.data import UNSEEN_SUBTYPES, lesion_bank
    from cspine.modeling.evaluate import onnx_embed, torch_embed
    from cspine.modeling.export import model_path
    from cspine.modeling.recipes import proto_classifier

    repository, cache = Path(args.repository), Path(args.cache)
    models = {"shipped": (onnx_embed(model_path(repository, "lesion_embed")), proto_classifier(repository))}
    models.update({name: torch_embed(path) for name, path in _checkpoints(args.checkpoint).items()})
    progress = not args.quiet
    cut = service_cut_bank(cache, args.seed, UNSEEN_SUBTYPES, args.studies, args.workers, progress)
    banks = {
        "service_cut": cut.usable(),
        "ground_truth": lesion_bank(
            cache, args.seed, UNSEEN_SUBTYPES, args.lesions, workers=args.workers, progress=progress
        ),
    }
    result = {
        "synthetic": True,
        "measured_on": {
            "service_cut": f"SYNTHETIC phantom studies seed {args.seed}, {args.studies} per unseen subtype, through "
            f"the pipeline (local Triton), ROIs cut about the matched lesions; {len(banks['service_cut'])} studies "
            "with a tumor detected",
            "ground_truth": f"SYNTHETIC lesions seed {args.seed}, {args.lesions} per unseen subtype, ROIs cut about "
            "their true centres",
            "episodes": args.episodes,
        },
        "models": {
            name: {
                bank: episode_accuracy(lesions, embed, classify, episodes=args.episodes)
                for bank, lesions in banks.items()
            }
            for name, (embed, classify) in models.items()
        },
    }
    _write_json(args.out, "embedding.json", result)
    print(json.dumps(result, indent=2) if args.json else format_embedding(result))
    return 0


def format_embedding(result: dict) -> str:
    lines = [f"{result['measured_on'][bank]}:" for bank in ("service_cut", "ground_truth")]
    lines.append("balanced accuracy, k = 1 / 5 lesions per class (the rest are queries), per modality")
    width = max(len(name) for name in result["models"])
    for bank in ("service_cut", "ground_truth"):
        lines.append(f"{bank:<13} {'model':<{width}} {'CT':>13} {'MR':>13} {'XR':>13}")
        for name, banks in result["models"].items():
            cells = []
            for modality in ("CT", "MR", "XR"):
                figures = banks[bank][modality]
                cells.append(
                    " / ".join(f"{figures[k]['balanced_accuracy']:.3f}" if k in figures else "—" for k in ("1", "5"))
                )
            lines.append(f"{'':<13} {name:<{width}} " + " ".join(f"{c:>13}" for c in cells))
    return "\n".join(lines)


def cmd_evaluate_sites(args: argparse.Namespace) -> int:
    from cspine.modeling.evaluate import site_metrics

    result = site_metrics(
        Path(args.repository),
        Path(args.cache),
        _site_names(args.sites),
        args.seed,
        args.cases,
        args.lesions,
        workers=args.workers,
        progress=not args.quiet,
    )
    _write_json(args.out, "sites.json", result)
    print(json.dumps(result, indent=2) if args.json else format_sites(result))
    return 0


def cmd_evaluate_adaptation(args: argparse.Namespace) -> int:
    from cspine.evaluation.adaptation import format_adaptation, run_adaptation

    result = run_adaptation(
        Path(args.repository),
        Path(args.cache),
        _site_names(",".join(args.site)),
        args.seed,
        repeats=args.repeats,
        baseline=not args.no_baseline,
        workers=args.workers,
    )
    _write_json(args.out, "adaptation.json", result)
    print(json.dumps(result, indent=2) if args.json else format_adaptation(result))
    return 0


def _signed(figure: dict) -> str:
    return f"{figure['value']:+.3f} [{figure['ci95'][0]:+.3f}, {figure['ci95'][1]:+.3f}]"


def format_sites(result: dict) -> str:
    """Per site: mean Dice per modality, lesion Dice (box) per modality, classification accuracy; the drop from
    the default site with its 95 % interval; and, on the same lesions, the accuracy with the default site's
    scanners and the paired drop the site's scanners cause."""
    lines = [
        f"SYNTHETIC sites: {result['cases']} studies per site (seed {result['seed']}), lesions of seed "
        f"{result['lesion_seed']}; classification on ground-truth ROIs with the default support set"
    ]
    for site, m in result["sites"].items():
        dice = m["segmentation"]["mean_dice"]
        lesion = m["segmentation"]["lesion_dice_box_by_modality"]
        accuracy = m["classification"]
        lines.append(
            f"{site:<15} Dice "
            + " ".join(f"{k} {v['mean']:.3f}" for k, v in dice.items())
            + "  lesion Dice "
            + " ".join(f"{k} {v:.3f}" for k, v in lesion.items() if v is not None)
            + f"  accuracy ({m['lesions']} lesions) "
            + " ".join(f"{k} {v['accuracy']:.3f}" for k, v in accuracy.items())
        )
        drop = m.get("drop_from_default")
        if drop:
            lines.append(
                f"{'':<15} drop from default: Dice "
                + " ".join(f"{k} {_signed(v)}" for k, v in drop["mean_dice"].items())
                + f"  accuracy fused {_signed(drop['accuracy']['fused'])}"
            )
        paired = m.get("scanner_drop_paired")
        if paired:
            same = m["classification_default_scanners"]
            lines.append(
                f"{'':<15} same lesions, default scanners: accuracy "
                + " ".join(f"{k} {v['accuracy']:.3f}" for k, v in same.items())
                + "; drop by the site's scanners (paired) "
                + " ".join(f"{k} {_signed(v)}" for k, v in paired.items())
            )
    return "\n".join(lines)


def _cohort_run(args: argparse.Namespace, default_dir: str):
    from cspine.evaluation.cohort import CohortRun

    return CohortRun(
        cohort=Path(args.cohort or default_dir),
        cases=args.cases,
        seed=args.seed,
        triton_url=args.triton_url,
        workers=args.workers,
        progress=not args.quiet,
    )


def cmd_evaluate_pipeline(args: argparse.Namespace) -> int:
    from cspine.evaluation.cohort import evaluate, format_metrics, metrics

    records = evaluate(_cohort_run(args, f".cache/cspine/pipeline-eval/seed{args.seed}-{args.cases}"))
    result = metrics(records)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "records.json").write_text(json.dumps(records, indent=1) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_metrics(result))
    return 0


def cmd_evaluate_competence(args: argparse.Namespace) -> int:
    from cspine.evaluation.competence import evaluate_competence, format_competence

    run = _cohort_run(args, f".cache/cspine/pipeline-eval/seed{args.seed}-{args.cases}")
    result = evaluate_competence(run, args.triton_url, progress=not args.quiet)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "competence.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=2) if args.json else format_competence(result))
    return 0


def cmd_evaluate_study(args: argparse.Namespace) -> int:
    from cspine.evaluation.study import Server, evaluate_cohort

    server = None
    if args.server:
        from cspine.client import ClientError
        from cspine.commands.client_args import client_token, tls_of

        try:
            server = Server(args.server, client_token(args), client_token(args, "curator"), tls=tls_of(args))
        except ClientError as exc:
            print(f"cspine: error: {exc}", file=sys.stderr)
            return 2
    metrics, paths = evaluate_cohort(
        Path(args.cohort), Path(args.out), args.support, server=server, n_boot=args.bootstrap, progress=not args.quiet
    )
    if args.json:
        print(json.dumps(metrics, indent=2))
    else:
        print(format_study_headline(metrics))
        print(f"report: {paths['report']}  metrics: {paths['metrics']}  predictions: {paths['predictions']}")
    return 0


def format_study_headline(m: dict) -> str:
    def f(figure) -> str:
        if not figure or figure.get("value") is None:
            return "n/a"
        lo, hi = figure["ci95"] or (None, None)
        return f"{figure['value']:.3f}" + (f" [{lo:.3f}, {hi:.3f}]" if lo is not None else "")

    synthetic = " (SYNTHETIC data)" if m.get("synthetic") else ""
    lines = [f"{m['cases']} cases{synthetic}: accuracy {f(m['accuracy'])}, ECE {f(m['ece'])}"]
    for label, figures in m["per_class"].items():
        lines.append(
            f"  {label:<12} sensitivity {f(figures['sensitivity'])}  specificity {f(figures['specificity'])}  "
            f"AUC {f(figures['auc'])}"
        )
    d = m["detection"]
    lines.append(f"  detection    sensitivity {f(d['sensitivity'])}  specificity {f(d['specificity'])}")
    lines.append("  by modalities: " + ", ".join(f"{k} {f(v)}" for k, v in m["by_modalities"].items()))
    return "\n".join(lines)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import numpy as np

    from cspine.analysis.fusion import Calibration
    from cspine.evaluation.calibrate import build_default_support, fit_calibration
    from cspine.evaluation.cohort import evaluate
    from cspine.fewshot.prototypes import DEFAULT_SUPPORT, PrototypeSet, default_prototypes
    from cspine.inference.specs import MODALITY_ORDER

    repository = Path(args.repository)
    if args.competence_only:
        from cspine.evaluation.competence import fit_competence

        cohort = Path(args.cache) / "competence" / f"reference-seed{args.reference_seed}-{args.reference_cases}"
        reference = fit_competence(repository, cohort, args.reference_cases, args.reference_seed, args.workers)
        path = reference.save(repository)
        for modality, feature_reference in reference.references.items():
            print(f"{modality.value}: OOD threshold {feature_reference.threshold:.3f} — {feature_reference.fitted_on}")
        print(f"wrote {path}")
        return 0
    embed = repository / "lesion_embed" / "1" / "model.onnx"
    run = _cohort_run(args, f".cache/cspine/pipeline-calibration/seed{args.seed}-{args.cases}")
    if args.choose_classification:
        from cspine.evaluation.calibrate import choose_classification

        current = Calibration.load(repository)
        records = evaluate(run, Calibration.uniform(), default_prototypes())
        order, choice = choose_classification(records, current.classification_weights)
        fitted = replace(
            current,
            classification_order=order,
            classification_choice={
                **choice,
                "fitted_on": f"SYNTHETIC phantom cohort seed {args.seed}, {args.cases} studies",
            },
        )
        print(f"wrote {fitted.save(repository)}:\n{json.dumps(fitted.to_json(), indent=2)}")
        return 0
    if args.classification_only or args.detection_only:
        current = Calibration.load(repository)
        records = evaluate(run, Calibration.uniform(), default_prototypes())
        refit = fit_calibration(records, embed, f"SYNTHETIC phantom cohort seed {args.seed}")
        if args.detection_only:
            fitted = replace(
                current,
                detection=refit.detection,
                detection_weights=refit.detection_weights,
                fitted_on=refit.fitted_on,
                classification_fitted_on=current.classification_fitted_on or current.fitted_on,
            )
        else:
            fitted = replace(
                current,
                classification_weights=refit.classification_weights,
                classification_weights_ci95=refit.classification_weights_ci95,
                classification_fitted_on=refit.classification_fitted_on,
                embed_model_sha256=refit.embed_model_sha256,
                classification_order=refit.classification_order,
                classification_choice=refit.classification_choice,
            )
        print(f"wrote {fitted.save(repository)}:\n{json.dumps(fitted.to_json(), indent=2)}")
        return 0
    support = build_default_support(Path(args.cache), embed, args.per_subtype, args.workers, args.triton_url)
    support.save(DEFAULT_SUPPORT)
    prototypes = PrototypeSet.from_support(support)
    counts = (~np.isnan(support.embeddings[:, :, 0])).sum(axis=0)
    present = ", ".join(f"{m.value} {int(n)}" for m, n in zip(MODALITY_ORDER, counts, strict=True))
    print(
        f"default support set: {len(support.labels)} SYNTHETIC cases ({present} lesions), prototype set "
        f"{prototypes.version}"
    )
    if args.support_only:
        return 0
    records = evaluate(run, Calibration.uniform(), prototypes)
    fitted = fit_calibration(records, embed, f"SYNTHETIC phantom cohort seed {args.seed}")
    path = fitted.save(repository)
    print(f"wrote {path}:\n{json.dumps(fitted.to_json(), indent=2)}")
    return 0


def _add_cohort_arguments(p: argparse.ArgumentParser, settings: Settings, cases: int, seed: int) -> None:
    p.add_argument("--cases", type=int, default=cases, help=f"SYNTHETIC studies (default {cases})")
    p.add_argument("--seed", type=int, default=seed, help=f"phantom seed (default {seed})")
    p.add_argument("--cohort", default=None, help="folder for the cohort (default: under .cache/cspine)")
    p.add_argument(
        "--triton-url",
        default=settings.serve.triton_url,
        help="an external Triton's gRPC address (env CSPINE_TRITON_URL; default: start the local Triton)",
    )
    p.add_argument("--workers", type=int, default=2, help="processes generating the cohort (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _lesion_evaluation_arguments(e: argparse.ArgumentParser, written: str) -> None:
    """The flags ``evaluate embedding`` and ``evaluate sites`` share: where models and data are, what is written."""
    e.add_argument("--repository", default="model_repository")
    e.add_argument("--cache", default=".cache/cspine")
    e.add_argument("--out", default=None, help=f"also write {written} here")
    e.add_argument("--json", action="store_true", help="print the figures as JSON")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--quiet", action="store_true")


def register(subparsers: argparse._SubParsersAction, settings: Settings) -> None:
    p = subparsers.add_parser("evaluate", help="evaluations that print figures")
    evaluate = p.add_subparsers(dest="evaluate", required=True)
    e = evaluate.add_parser(
        "models",
        help="segmentation Dice, lesion size error and few-shot accuracy on held-out SYNTHETIC data; with --cohort, "
        "a site's version sets through the pipeline on its held-out studies",
        description=(
            "Without --cohort: the shipped models on held-out SYNTHETIC phantom data (Dice on the model grid, lesion "
            "size, few-shot accuracy). With --cohort DIR (a labelled cohort, docs/cohort.md): the cohort is checked, "
            "then its held-out studies (split validation or test) are analysed through the whole pipeline by a local "
            "Triton, once with the served version set and once with the candidate, and compared with the site's "
            "labels: Dice per structure and lesion Dice on each labelled series, lesion size error, detection, level "
            "accuracy, Cobb angle MAE and OPLL accuracy, side by side."
        ),
    )
    e.add_argument(
        "--cohort",
        default=None,
        metavar="DIR",
        help="a labelled cohort: compare the served version set with --candidate on its held-out studies",
    )
    e.add_argument(
        "--candidate",
        type=int,
        default=None,
        metavar="N",
        help="with --cohort: the version set to compare with the served one (default: the highest other set)",
    )
    e.add_argument("--repository", default="model_repository")
    e.add_argument(
        "--preset",
        default="full",
        choices=["full", "smoke"],
        help="full: 24 studies, 200 episodes per K; smoke: a tiny run",
    )
    e.add_argument("--cache", default=".cache/cspine")
    e.add_argument(
        "--out",
        default=None,
        help="also write metrics.json and PNG figures here (with --cohort: cohort-versions.json, per study too)",
    )
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_evaluate_models)
    e = evaluate.add_parser(
        "segmentation",
        help="the shipped segmentation models beside trained checkpoints on held-out SYNTHETIC studies: lesion Dice "
        "with CIs, structure Dice, lesion size",
        description=(
            "The shipped segmentation models (and the CT model trained on full lesion masks, the reference for box "
            "supervision) beside checkpoints of `cspine train` (before `cspine export`), on the same held-out "
            "SYNTHETIC studies through DICOM, ingest and the serving preprocessing: lesion Dice per series with its "
            "95 % bootstrap interval over the studies and the paired difference to the shipped model, each "
            "structure's Dice, and on CT the largest lesion's size error. Only the modalities of the checkpoints "
            "given are run (all three without one)."
        ),
    )
    e.add_argument(
        "--checkpoint", action="append", default=[], metavar="NAME=PATH", help="a segmentation .pt to compare (repeat)"
    )
    e.add_argument(
        "--seed", type=int, default=9001, help="phantom seed of the studies (default 9001, as evaluate models)"
    )
    e.add_argument("--studies", type=int, default=24, help="studies (default 24, as evaluate models)")
    e.add_argument(
        "--studies-from",
        default=None,
        metavar="DIR",
        help="instead, the phantom studies already written in DIR (case-*/ with truth.json and labels.npz), e.g. "
        "a cohort of evaluate pipeline under the cache",
    )
    _lesion_evaluation_arguments(e, "segmentation.json")
    e.set_defaults(func=cmd_evaluate_segmentation)
    e = evaluate.add_parser(
        "embedding",
        help="the shipped lesion embedding beside trained checkpoints, on ROIs cut as the service cuts and about true "
        "centres",
        description=(
            "Prototype-classifier balanced accuracy per modality at 1 and 5 lesions per class, on the unseen subtypes "
            "(never in meta-training): SYNTHETIC studies run through the pipeline on a local Triton with their ROIs "
            "cut about the lesions it matched (as the service cuts them), and SYNTHETIC lesions cut about their true "
            "centres. Compares the shipped lesion_embed with checkpoints of `cspine train` (before `cspine export`)."
        ),
    )
    e.add_argument(
        "--checkpoint", action="append", default=[], metavar="NAME=PATH", help="a lesion_embed.pt to compare (repeat)"
    )
    e.add_argument("--seed", type=int, default=9201, help="phantom seed of the studies and lesions (default 9201)")
    e.add_argument(
        "--studies", type=int, default=20, help="studies per unseen subtype through the pipeline (default 20)"
    )
    e.add_argument(
        "--lesions", type=int, default=60, help="lesions per unseen subtype cut about their centres (default 60)"
    )
    e.add_argument("--episodes", type=int, default=300, help="episodes per modality and k (default 300)")
    _lesion_evaluation_arguments(e, "embedding.json")
    e.set_defaults(func=cmd_evaluate_embedding)
    e = evaluate.add_parser(
        "sites",
        help="the shipped models on the SYNTHETIC sites (cspine phantom --site): Dice and lesion classification",
        description=(
            "Per site of the phantom (default: all), generate (once, cached) a cohort of SYNTHETIC studies and a set "
            "of lesions of the site's population, seen by the site's scanners; print the segmentation Dice of the "
            "shipped CT/MR/XR models against the phantom's label maps and the accuracy of the shipped embedding with "
            "the default support set (prototype classifier) on ground-truth lesion ROIs. The models were trained "
            "on the default site: the others are distribution shifts (docs/phantom.md)."
        ),
    )
    e.add_argument("--sites", default="", help="comma-separated site names (default: every site)")
    e.add_argument("--cases", type=int, default=16, help="SYNTHETIC studies per site (default 16)")
    e.add_argument("--lesions", type=int, default=120, help="SYNTHETIC lesions per site (default 120)")
    e.add_argument("--seed", type=int, default=9600, help="studies' seed; lesions use seed + 1 (default 9600)")
    _lesion_evaluation_arguments(e, "sites.json")
    e.set_defaults(func=cmd_evaluate_sites)
    e = evaluate.add_parser(
        "adaptation",
        help="few-shot adaptation per SYNTHETIC site: each method at 0-20 site cases per class, the baseline, "
        "a new class",
        description=(
            "Per site of the phantom (default: all), render (once, cached) a class-balanced pool of the site's "
            "SYNTHETIC lesions and lesions of one subtype it adds as a new class. Then, on the same query lesions, "
            "the shipped embedding and prototype classifier with the default support set plus k of the site's cases "
            "per class (k = 0, 1, 5, 10, 20; repeated support draws) by each method (plain: the support rule; "
            "fitted; transductive) and the fine-tuned baseline; modalities fused as the service fuses them. Prints "
            "balanced accuracy and ECE per method and k, the new class's recall and the fused accuracy beside the "
            "best single modality. Measured on ground-truth lesion ROIs, not through the pipeline "
            "(docs/evaluation.md)."
        ),
    )
    e.add_argument(
        "--site", action="append", default=[], help="a site name (repeat, or comma-separate; default: every site)"
    )
    e.add_argument("--seed", type=int, default=9700, help="the lesions' seed; new-class lesions use seed + 1")
    e.add_argument("--repeats", type=int, default=10, help="support draws per number of site cases (default 10)")
    e.add_argument("--no-baseline", action="store_true", help="leave out the fine-tuned baseline (faster)")
    e.add_argument(
        "--repository",
        default="model_repository",
        help="the models: its served version set's embedding, classifier and calibration (cspine models use N)",
    )
    e.add_argument("--cache", default=".cache/cspine")
    e.add_argument("--out", default=None, help="also write adaptation.json here")
    e.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    e.add_argument("--workers", type=int, default=2, help="processes rendering the lesions (default 2)")
    e.set_defaults(func=cmd_evaluate_adaptation)
    e = evaluate.add_parser(
        "pipeline",
        help="the whole pipeline on held-out SYNTHETIC studies: detection, size, level, Cobb, canal, OPLL, times",
        description=(
            "Generate (once, cached) a held-out SYNTHETIC phantom cohort, analyse every study through Triton "
            "(the local one unless --triton-url) and compare with each case's truth.json. The default seed, 9800, "
            "gives the held-out figures of docs/pipeline.md; seed 9300 is the tuning cohort the outside-C2 rule "
            "and the Cobb method were tuned on, whose figures flatter them."
        ),
    )
    _add_cohort_arguments(e, settings, cases=60, seed=9800)
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--out", default=None, help="also write metrics.json and per-study records.json here")
    e.set_defaults(func=cmd_evaluate_pipeline)
    e = evaluate.add_parser(
        "competence",
        help="what cspine can assess: in-domain pass rate, out-of-domain catch rate per layer, OOD score AUROC",
        description=(
            "Run the full pipeline (the local Triton unless --triton-url) on in-domain SYNTHETIC phantom studies "
            "(by default seed 9300: the pipeline evaluation's tuning cohort, not the competence reference's), "
            "on REAL out-of-domain DICOM files from installed packages (tests/data/real_ood/README.md) and on "
            "SYNTHETIC out-of-domain studies; print the in-domain assessable rate and detection figures, the share "
            "of out-of-domain studies given no tumor call and the layer that stopped them, and the ROC AUC of the "
            "out-of-distribution score (docs/competence.md)."
        ),
    )
    _add_cohort_arguments(e, settings, cases=60, seed=9300)
    e.add_argument("--json", action="store_true", help="print the figures as JSON")
    e.add_argument("--out", default=None, help="also write competence.json here")
    e.set_defaults(func=cmd_evaluate_competence)

    e = evaluate.add_parser(
        "study",
        help="clinical validation on a labelled cohort through the API: sensitivity, specificity, AUC … with CIs",
        description=(
            "Add the first N cases per class to the support set (SupportSet.AddCase), analyse the rest "
            "(AnalyzeStudy: all modalities and each alone) and compare with each case's reference.json. Writes "
            "REPORT_DIR/report.html, metrics.json and predictions.csv; resumes an interrupted run. Without --server "
            "it starts the embedded default itself. The cohort format is in docs/evaluation.md."
        ),
    )
    e.add_argument("cohort", help="COHORT_DIR: one folder per case with its DICOM and reference.json")
    e.add_argument("--server", default=None, help="a running cspine server (default: start the embedded one)")
    e.add_argument("--token", default=settings.client.token, help="a curator token for --server")
    add_data_dir_argument(e, settings.client, "where to find the tokens of --server when no --token is given")
    add_tls_arguments(e, settings.client)
    e.add_argument("--support", type=int, default=5, help="cases per class added to the support set (default 5)")
    e.add_argument("--out", default="out/study", help="REPORT_DIR (default out/study)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs (default 1000)")
    e.add_argument("--json", action="store_true", help="print metrics.json instead of the headline")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_evaluate_study)

    p = subparsers.add_parser(
        "calibrate",
        help="rebuild the default SYNTHETIC support set and fit the fusion weights (model_repository/calibration.json)",
    )
    _add_cohort_arguments(p, settings, cases=48, seed=9400)
    p.add_argument("--repository", default=str(default_repository()))
    p.add_argument("--cache", default=".cache/cspine")
    p.add_argument("--per-subtype", type=int, default=12, help="default support studies per subtype (default 12)")
    only = p.add_mutually_exclusive_group()
    only.add_argument(
        "--competence-only",
        action="store_true",
        help="only fit the competence reference (model_repository/competence.json): the segmentation models' "
        "feature statistics and out-of-distribution thresholds, on a SYNTHETIC reference cohort",
    )
    only.add_argument(
        "--classification-only",
        action="store_true",
        help="only refit the classification weights and their intervals on the calibration cohort, with the shipped "
        "default support set; the detection curves and weights stay as they are",
    )
    only.add_argument(
        "--detection-only",
        action="store_true",
        help="only refit the detection curves and weights on the calibration cohort, with the shipped default "
        "support set (after a segmentation model changed); the classification weights and choice stay as they are",
    )
    only.add_argument(
        "--support-only",
        action="store_true",
        help="only rebuild the default support set (SYNTHETIC studies of every subtype through the pipeline, "
        "--per-subtype of each); calibration.json stays as it is",
    )
    only.add_argument(
        "--choose-classification",
        action="store_true",
        help="only choose, on the calibration cohort with the shipped weights and default support set, between "
        "pooling the matched lesions and the best-supported single modality, taken only where the 95 %% interval "
        "of its gain lies above 0 (calibration.json classification_order, classification_choice)",
    )
    p.add_argument("--reference-cases", type=int, default=30, help="studies of that reference cohort (default 30)")
    p.add_argument("--reference-seed", type=int, default=9500, help="its phantom seed (default 9500)")
    p.set_defaults(func=cmd_calibrate)
