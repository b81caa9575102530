"""Model versions made from a site's cohort (``cspine export --version N --cohort DIR``).

A version set N holds every served model with weights in its ``N/`` folder (``model_config`` has the rules): the
segmentation models fine-tuned on the cohort (``cspine train --cohort``) exported from their checkpoints, the
others copied from the version they were fine-tuned from. Beside them, in the repository's root with ``.vN`` in
their names (``model_config.version_file``):

- ``model_card.json``: the base version, the cohort (its name, studies and classes per split: no patient data),
  each fine-tuned model's run and its held-out Dice beside the base version's, and what was inherited;
- ``competence.json``/``.npz``: the out-of-distribution reference refitted on the cohort's train studies with
  version N's segmentation models (their features are not the base version's);
- ``calibration.json``: refitted on the cohort's train studies run through the pipeline with version N
  (``refit_calibration``), each part only where the cohort has enough studies for it: the detection curves and
  weights with ``DETECTION_MIN_STUDIES`` tumor and tumor-free studies, the classification weights with
  ``CLASSIFICATION_MIN_STUDIES`` tumor studies with a classified lesion. A part not refitted is the base
  version's, and the model card says which.

Writing a version does not serve it: ``cspine models use N`` does.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import cspine
from cspine.analysis.competence import COMPETENCE_FILE
from cspine.analysis.fusion import CALIBRATION_FILE, Calibration
from cspine.cohort.check import CohortReport, check_cohort, image_files
from cspine.cohort.training import require_clean
from cspine.config import IngestLimits
from cspine.domain import Disclosure, Modality
from cspine.errors import InvalidInputError
from cspine.fewshot.prototypes import DEFAULT_SUPPORT, SupportSet, default_support
from cspine.inference.model_config import available_sets, served_set, version_file
from cspine.inference.specs import MODALITY_ORDER, MODELS, SEG_MODEL_NAMES

MODEL_CARD = "model_card.json"


def run_folder(checkpoints: Path, cohort: Path) -> Path:
    """Where ``cspine train --cohort`` keeps a cohort's fine-tuning run."""
    return checkpoints / f"cohort-{cohort.resolve().name}"


def is_synthetic(cohort: Path) -> bool:
    """Whether the cohort is one cspine phantom wrote (its cohort.json says synthetic)."""
    path = cohort / "cohort.json"
    try:
        return bool(json.loads(path.read_text()).get("synthetic")) if path.exists() else False
    except ValueError:
        return False


def cohort_summary(report: CohortReport) -> dict:
    """What the model card says of the cohort: counts only, never a study's identity beyond its split."""
    return {
        "name": report.folder.resolve().name,
        "synthetic": is_synthetic(report.folder),
        "studies": len(report.studies),
        "classes_per_split": report.class_counts(),
    }


DETECTION_MIN_STUDIES = 5  # train studies with a tumor, and without one, to refit the detection curves and weights
CLASSIFICATION_MIN_STUDIES = 15  # train studies with a tumor and a classified matched lesion, for the weights


def _calibration_records(
    report: CohortReport, repository: Path, version: int, limits: IngestLimits, progress: bool
) -> list[dict]:
    """The cohort's train studies through the pipeline with version set ``version`` (a local Triton on a copy of
    the repository), as ``cspine calibrate`` runs its cohort: equal weights, the default support set."""
    import asyncio
    import tempfile

    from tqdm import tqdm

    from cspine.analysis.competence import CompetenceReference
    from cspine.dicom.ingest import ingest_paths
    from cspine.evaluation.cohort import calibration_record
    from cspine.fewshot.prototypes import default_prototypes
    from cspine.inference.client import TritonClient
    from cspine.inference.local_triton import LocalTriton, TritonPorts
    from cspine.inference.model_config import model_versions, use_version
    from cspine.pipeline import AnalysisOptions, analyze

    train = [s for s in report.studies if s.row is not None and s.row.split == "train"]

    async def run(url: str, copy: Path) -> list[dict]:
        records = []
        competence, models, prototypes = CompetenceReference.load(copy), model_versions(copy), default_prototypes(copy)
        async with TritonClient(url) as client:
            for study in tqdm(train, desc="calibration", unit="study", disable=not progress):
                assert study.row is not None
                ingested = await asyncio.to_thread(ingest_paths, image_files(report.folder / study.name), limits)
                analysis = await analyze(
                    ingested, client, prototypes, Calibration.uniform(), AnalysisOptions(), models, competence
                )
                records.append(calibration_record(study.row.tumor_class, analysis))
        return records

    with tempfile.TemporaryDirectory(prefix="cspine-calibration-") as work:
        copy = Path(work) / "repository"
        shutil.copytree(repository, copy, ignore=shutil.ignore_patterns("__pycache__"))
        use_version(copy, version)
        with LocalTriton(copy, TritonPorts.free()) as triton:
            return asyncio.run(run(triton.grpc_url, copy))


def records_support(records: list[dict], synthetic: bool = False, source: str = "") -> SupportSet:
    """The tumor studies of pipeline ``records`` (``evaluation.cohort.calibration_record``) with a lesion embedding
    as the site's support cases: per modality the matched lesion's embedding (NaN where none), the study's class."""
    import numpy as np

    from cspine.inference.specs import EMBEDDING_DIM

    rows, labels = [], []
    for record in records:
        found = [record["modalities"][m.value]["embedding"] for m in MODALITY_ORDER]
        if record["truth"]["tumor"] and any(found):
            rows.append([np.array(e, np.float32) if e else np.full(EMBEDDING_DIM, np.nan, np.float32) for e in found])
            labels.append(record["truth"]["class"])
    embeddings = np.array(rows, dtype=np.float32).reshape(len(rows), len(MODALITY_ORDER), EMBEDDING_DIM)
    return SupportSet(embeddings, tuple(labels), synthetic, source, site=True)


def site_classification(
    records: list[dict],
    repository: Path,
    version: int,
    start: dict[Modality, float],
    default: SupportSet | None,
) -> tuple[dict[Modality, float], tuple[Modality, ...], dict]:
    """How version ``version`` turns the modalities' class evidence into the study's, fitted to tumor studies'
    records (their class and per modality the matched lesion's embedding) as the service fits it once a site has
    enough cases of every class (``fewshot.prototypes``): each study classified by the prototypes of the others by
    the support rule over the ``default`` set (None: no default cases, as when the records are version
    ``version``'s default set), with version ``version``'s classifier scale. Returns the weights of log-linear
    pooling that minimise the cross-entropy of those held-out answers, pulled towards ``start``; and, judged on the
    same answers by ``choose_classification``, whether one modality beats pooling beyond doubt (its order, else
    empty) with the figures behind the choice."""
    import numpy as np

    from cspine.evaluation.calibrate import choose_classification
    from cspine.fewshot.adapt import exported_scale, pooling_weights
    from cspine.fewshot.prototypes import Adaptation, held_out_log_probabilities
    from cspine.modeling.data import CLASSES

    site = records_support(records)
    if default is None:
        default = SupportSet(site.embeddings[:0], ())
    both = SupportSet(np.concatenate([default.embeddings, site.embeddings]), default.labels + site.labels)
    flags = np.array([True] * len(default.labels) + [False] * len(site.labels))
    labels = tuple(dict.fromkeys(both.labels))
    scale = exported_scale(repository / "proto_classify" / str(version) / "model.onnx")
    held_out, truth = held_out_log_probabilities(both, flags, labels, Adaptation("fitted", scale))
    begin = np.array([start[m] for m in MODALITY_ORDER])
    pooled = pooling_weights(held_out, truth, begin)
    weights = {m: round(float(w), 4) for m, w in zip(MODALITY_ORDER, pooled, strict=True)}
    present = ~np.isnan(site.embeddings).any(axis=2)  # [site cases, modalities], the rows of held_out
    columns = [CLASSES.index(label) for label in labels]
    answers = []
    for i, t in enumerate(truth):
        evidence = {}
        for m, modality in enumerate(MODALITY_ORDER):
            probabilities = np.zeros(len(CLASSES))
            probabilities[columns] = np.exp(held_out[i, m])
            evidence[modality.value] = {"probabilities": probabilities.tolist() if present[i, m] else None}
        answers.append({"truth": {"tumor": True, "class": labels[t]}, "modalities": evidence})
    order, choice = choose_classification(answers, weights)
    return weights, order, choice


def refit_calibration(
    report: CohortReport,
    repository: Path,
    version: int,
    base: int,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
    detection_min: int = DETECTION_MIN_STUDIES,
    classification_min: int = CLASSIFICATION_MIN_STUDIES,
    records: list[dict] | None = None,
    records_are_default: bool = False,
) -> tuple[Calibration, dict[str, str]]:
    """Version ``version``'s calibration: the base version's, with each part refitted on the cohort's train studies
    (their pipeline ``records`` with version ``version``, run when not given and needed) where there are enough of
    them. The classification weights are fitted against the repository's served default support set, or, with
    ``records_are_default`` (version ``version``'s support set is made of these records), against the records
    alone. Returns it and, per part, what it was fitted on or why it was not refitted."""
    from dataclasses import replace

    from cspine.evaluation.calibrate import fit_calibration

    inherited = Calibration.from_json(json.loads(version_file(repository, CALIBRATION_FILE, base).read_text()))
    rows = [s.row for s in report.studies if s.row is not None and s.row.split == "train"]
    tumor = sum(r.tumor_class != "none" for r in rows)
    free = len(rows) - tumor
    detection_ok = tumor >= detection_min and free >= detection_min
    why = {
        "detection": f"version {base}'s: {tumor} train studies with a tumor and {free} without; a refit needs "
        f"{detection_min} of each",
        "classification": f"version {base}'s: {tumor} train studies with a tumor; a refit needs {classification_min} "
        "with a lesion embedding",
    }
    if not detection_ok and tumor < classification_min:
        return inherited, why
    if records is None:
        records = _calibration_records(report, repository, version, limits, progress)
    summary = cohort_summary(report)
    fitted_on = f"train studies of the {'SYNTHETIC ' if summary['synthetic'] else ''}cohort {summary['name']}, " + (
        f"version {version}"
    )
    calibration = inherited
    if detection_ok:
        embed = repository / "lesion_embed" / str(version) / "model.onnx"
        fitted = fit_calibration(records, embed, fitted_on)
        calibration = replace(
            calibration,
            detection=fitted.detection,
            detection_weights=fitted.detection_weights,
            fitted_on=fitted.fitted_on,
        )
        why["detection"] = f"refitted: {fitted.fitted_on} ({tumor} with a tumor, {free} without)"
    cases = [r for r in records if r["truth"]["tumor"] and any(m["embedding"] for m in r["modalities"].values())]
    if len(cases) >= classification_min:
        against = None if records_are_default else default_support(repository)
        start = inherited.classification_weights
        weights, order, choice = site_classification(cases, repository, version, start, against)
        rule = "their own prototypes" if against is None else "the support rule over the default set"
        held_out = f"each classified by the prototypes of the others (5 folds; {rule}, fitted)"
        calibration = replace(
            calibration,
            classification_weights=weights,
            classification_weights_ci95={},
            classification_fitted_on=f"{fitted_on}: the pooling weights of the {len(cases)} studies with a tumor and "
            f"a lesion embedding, {held_out}, as the service refits them from a site's cases",
            embed_model_sha256=_sha256(repository / "lesion_embed" / str(version) / "model.onnx"),
            classification_order=order,
            classification_choice={**choice, "fitted_on": f"{fitted_on}, {held_out}"},
        )
        single = "/".join(m.value for m in order) if order else ""
        why["classification"] = (
            f"refitted: {calibration.classification_fitted_on}; on the same answers, "
            + (f"one modality ({single} first)" if order else "pooling")
            + f": pooled accuracy {choice['pooled_accuracy']:.3f}, the best single-modality order "
            f"({'/'.join(choice['order'])}) {choice['single_accuracy']:.3f}, its gain's 95 % interval "
            f"[{choice['single_gain_ci95'][0]:.3f}, {choice['single_gain_ci95'][1]:.3f}]"
        )
    else:
        why["classification"] = (
            f"version {base}'s: {len(cases)} train studies with a tumor and a lesion embedding; a refit needs "
            f"{classification_min}"
        )
    return calibration, why


def export_version(
    repository: Path,
    cohort: Path,
    checkpoints: Path,
    version: int,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
) -> Path:
    """Write version set ``version`` from the cohort's fine-tuning run; returns its model card."""
    import torch

    from cspine.evaluation.competence import FOLDS, fit_references
    from cspine.inference.runner import OnnxRunner
    from cspine.inference.specs import seg_spec
    from cspine.modeling.export import export_embed, export_seg, load_embed_onnx, load_seg_onnx

    base = served_set(repository)
    taken = [name for name in MODELS if (repository / name / str(version)).exists()]
    if version <= 1 or taken or version_file(repository, MODEL_CARD, version).exists():
        raise InvalidInputError(
            f"version {version} cannot be written: versions above 1 that the repository does not hold yet "
            f"(it holds {', '.join(map(str, available_sets(repository)))})"
        )
    run = run_folder(checkpoints, cohort)
    metrics_path = run / "metrics.json"
    if not metrics_path.exists():
        raise InvalidInputError(f"no fine-tuning run of {cohort} in {run}: run cspine train --cohort {cohort} first")
    metrics = json.loads(metrics_path.read_text())
    report = check_cohort(cohort, limits=limits, progress=progress)
    require_clean(report)
    fine_tuned: dict[str, dict] = {}
    staging = checkpoints / f".export-{version}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    written: list[Path] = []
    try:
        for name in MODELS:
            source = repository / name / str(base)
            target = repository / name / str(version)
            target.mkdir(parents=True)
            written.append(target)
            for path in source.iterdir():
                if path.is_file() and path.name != "model.onnx":
                    shutil.copy2(path, target / path.name)
            checkpoint = run / f"{name}.pt"
            entry = metrics.get("models", {}).get(name)
            if entry is None or "skipped" in entry or not checkpoint.exists():
                shutil.copy2(source / "model.onnx", target / "model.onnx")
                continue
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            if state["config"].get("start_sha256") != _sha256(source / "model.onnx"):
                raise InvalidInputError(
                    f"{checkpoint} was fine-tuned from {state['config']['start']}, not from the served version {base} "
                    f"of {repository}"
                )
            identity = ("cases", "lesions", "cohort", "start", "start_sha256")
            config = {k: v for k, v in state["config"].items() if k not in identity}
            metadata = {
                "training_steps": str(state["step"]),
                "base_version": str(base),
                "fine_tuned_on": json.dumps(cohort_summary(report)),
            }
            staged = staging / name
            if name == "lesion_embed":
                encoder, base_config = load_embed_onnx(source / "model.onnx")
                encoder.load_state_dict(state["modules"]["encoder"])
                # the base's configuration (its architecture), so that this version can be fine-tuned in turn
                export_embed(encoder.eval(), staged, {**metadata, "training_config": base_config, "fine_tune": config})
                fine_tuned[name] = {
                    "steps": state["step"],
                    "train_lesions": entry["train_lesions"],
                    "held_out_few_shot_accuracy": entry.get("held_out"),
                }
            else:
                net, _ = load_seg_onnx(source / "model.onnx")
                net.load_state_dict(state["modules"]["net"])
                export_seg(
                    net.eval(), Modality(state["config"]["modality"]), staged, {**metadata, "training_config": config}
                )
                fine_tuned[name] = {
                    "steps": state["step"],
                    "train_studies": entry["train_studies"],
                    "held_out_dice_on_model_grid": entry.get("held_out"),
                }
            shutil.move(str(staged / name / "1" / "model.onnx"), target / "model.onnx")
        files = {
            name: version_file(repository, name, version) for name in (CALIBRATION_FILE, COMPETENCE_FILE, MODEL_CARD)
        }
        files["competence.npz"] = files[COMPETENCE_FILE].with_suffix(".npz")
        written += list(files.values())
        shutil.copy2(version_file(repository, CALIBRATION_FILE, base), files[CALIBRATION_FILE])  # until refitted
        train_studies = [
            image_files(report.folder / s.name) for s in report.studies if s.row is not None and s.row.split == "train"
        ]
        runners = {
            m: OnnxRunner(seg_spec(m), repository / SEG_MODEL_NAMES[m] / str(version) / "model.onnx", 2)
            for m in MODALITY_ORDER
        }
        summary = cohort_summary(report)
        label = "SYNTHETIC " if summary["synthetic"] else ""
        disclosure = Disclosure(
            trained_on=f"version {base}'s models, fine-tuned on the {label}labelled cohort {summary['name']} "
            f"({len(train_studies)} train studies)",
            intended_use="Research and engineering use only; not for clinical use or diagnosis.",
        )
        sha256 = {m: _sha256(repository / SEG_MODEL_NAMES[m] / str(version) / "model.onnx") for m in MODALITY_ORDER}
        reference = fit_references(
            train_studies,
            runners,
            f"train studies of the {label}cohort {summary['name']}",
            sha256,
            disclosure,
            progress,
        )
        reference.save(repository, version)
        # With its own embedding, version N gets its own default support set: the train studies' lesions as the
        # service finds and embeds them with N (the base's vectors are another embedding's); else the base's.
        records = None
        embedding_tuned = "lesion_embed" in fine_tuned
        support_file = version_file(repository, DEFAULT_SUPPORT.name, version)
        if embedding_tuned:
            records = _calibration_records(report, repository, version, limits, progress)
            origin = f"{label}train study of the cohort {summary['name']}: its lesion as version {version} finds "
            origin += "and embeds it"
            support = records_support(records, summary["synthetic"], origin)
            if len(set(support.labels)) < 2:
                raise InvalidInputError(
                    f"version {version}'s own lesion embedding needs its own default support set, but the pipeline "
                    f"found lesions of {len(set(support.labels))} class(es) in the cohort's train studies"
                )
            written.append(support_file)
            support.save(support_file)
            counts = ", ".join(f"{c} {support.labels.count(c)}" for c in dict.fromkeys(support.labels))
            inherited_support = (
                f"rebuilt: the {len(support.labels)} train studies with a tumor and a lesion found and embedded by "
                f"version {version} ({counts})"
            )
        else:
            base_file = version_file(repository, DEFAULT_SUPPORT.name, base)
            if base_file.exists():
                written.append(support_file)
                shutil.copy2(base_file, support_file)
            inherited_support = f"version {base}'s, not rebuilt: version {version} copies lesion_embed from it"
        calibration, calibration_parts = refit_calibration(
            report, repository, version, base, limits, progress, records=records, records_are_default=embedding_tuned
        )
        calibration.save(repository, version)
        card = {
            "version": version,
            "base_version": base,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cspine_version": cspine.__version__,
            "cohort": summary,
            "fine_tuned": fine_tuned,
            "copied_from_base": [n for n in MODELS if n not in fine_tuned],
            "competence": {
                m.value: reference.references[m].fitted_on
                if m in reference.references
                else f"no reference: fewer than {FOLDS} train studies with {m.value}; the out-of-distribution "
                "check is off for it in this version"
                for m in MODALITY_ORDER
            },
            "calibration": calibration_parts,
            "default support set": inherited_support,
            "files": sorted([p.name for p in files.values()] + [support_file.name] * support_file.exists()),
        }
        files[MODEL_CARD].write_text(json.dumps(card, indent=2) + "\n")
    except BaseException:
        for path in written:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return files[MODEL_CARD]


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()
