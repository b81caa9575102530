"""``cspine evaluate models --cohort DIR``: a site's version sets through the whole pipeline, on its held-out
studies, against its own labels, so that it decides on figures which version to serve.

The cohort is checked first (any label error stops it, as training does). Each held-out study (``validation`` and
``test`` in the manifest) is analysed as the service analyses it (ingest, series selection, Triton, competence,
measurements) once per version set, by one local Triton that reloads the models between the sets. The figures:

- **Dice per structure** of each modality's label map on the labelled series' own grid (the map a DICOM SEG of
  the result carries) against the site's SEG, over the series of studies where that modality was assessed; a
  structure counts where the site labelled it; the mean is over ``MEAN_OVER``. **Lesion Dice** over the series
  with a tumor segment.
- **Lesion size**: the largest lesion's Feret diameter on each labelled series against that of the site's tumor
  segment, measured by the same code (``analysis.lesions.measure_lesions``); where the site gave only boxes, the
  longest side of its largest box. Error and bias per modality, over the tumor studies where a lesion was found.
- **Detection**: the study's tumor call against its class (``none`` or a tumor class).
- **Level accuracy**: the primary lesion's level against the manifest's ``level``, where it names one.
- **Cobb angle**: the study's C2–C7 Cobb angle against the manifest's ``cobb_deg``, or, where it has none, the
  angle cspine measures on the site's radiograph labels (its C2 and C7 bodies; the source is counted).
- **OPLL**: the study's OPLL call against whether the site's CT labels have an OPLL segment.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cspine.analysis.competence import CompetenceReference
from cspine.analysis.fusion import Calibration
from cspine.analysis.lesions import measure_lesions
from cspine.analysis.spine import measure_spine
from cspine.cohort.check import CohortReport, StudyReport, check_cohort, image_files, labelled_study
from cspine.cohort.training import HELD_OUT, require_clean
from cspine.cohort.versions import is_synthetic
from cspine.config import IngestLimits
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality, SeriesRole, StudyAnalysis, Volume
from cspine.errors import InvalidInputError, TritonUnavailableError
from cspine.fewshot.prototypes import default_prototypes
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts
from cspine.inference.model_config import available_sets, model_versions, served_set, use_version
from cspine.inference.specs import ENSEMBLES, MODALITY_ORDER, MODELS, SEG_LABELS
from cspine.modeling.evaluate import SITE_DICE_STRUCTURES
from cspine.pipeline import AnalysisOptions, analyze

# The structures the mean Dice is over, as for the held-out Dice of training (``cohort.training.held_out_dice``):
# every structure of a modality's table but the tumor and CT's OPLL (in few studies; each is reported on its own).
MEAN_OVER = {m: SITE_DICE_STRUCTURES[m.value.lower()] for m in MODALITY_ORDER}


@dataclass
class SeriesTruth:
    """One labelled series of a held-out study: the site's label map and its largest lesion's size. The map is
    kept compressed (every held-out study's is needed by each version set in turn): 61 times smaller on the
    SYNTHETIC community-ct cohort's maps (docs/cohort.md)."""

    role: SeriesRole
    modality: Modality
    packed: bytes | None  # the uint8 label map, zlib-compressed; None: only boxes
    shape: tuple[int, ...]
    diameter_mm: float | None  # the largest labelled lesion; None: no tumor label
    diameter_source: str = ""  # "segment" or "box"

    @staticmethod
    def of(role: SeriesRole, labels: np.ndarray, diameter_mm: float | None) -> SeriesTruth:
        packed = zlib.compress(np.ascontiguousarray(labels, dtype=np.uint8).tobytes(), 1)
        source = "segment" if diameter_mm is not None else ""
        return SeriesTruth(role, role.modality, packed, labels.shape, diameter_mm, source)

    @property
    def labels(self) -> np.ndarray | None:
        if self.packed is None:
            return None
        return np.frombuffer(zlib.decompress(self.packed), dtype=np.uint8).reshape(self.shape)


@dataclass
class StudyTruth:
    name: str
    tumor: bool
    level: str | None
    cobb_deg: float | None
    cobb_source: str  # "manifest", "labels" or ""
    opll: bool | None  # None: no CT labels
    series: dict[str, SeriesTruth] = field(default_factory=dict)  # by series UID


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return float(2.0 * np.logical_and(pred, truth).sum() / total) if total else 1.0


def _largest_diameter(mask: np.ndarray, volume: Volume, uid: str) -> float | None:
    lesions = measure_lesions(mask, volume, None, uid)
    return lesions[0].max_diameter_mm if lesions else None


def study_truth(folder: Path, report: StudyReport, limits: IngestLimits) -> StudyTruth:
    """What the site's labels and manifest say of a checked study, measured as cspine measures."""
    row = report.row
    assert row is not None  # held-out studies are the manifest's
    study = ingest_paths(image_files(folder), limits)
    chosen = select_series(study).chosen
    role_of = {series.series_instance_uid: role for role, series in chosen.items()}
    truth = StudyTruth(folder.name, row.tumor_class != "none", row.level or None, row.cobb, "", None)
    if truth.cobb_deg is not None:
        truth.cobb_source = "manifest"
    for lab in report.labels:
        role = role_of.get(lab.series_instance_uid)
        if role is None:
            continue
        volume = chosen[role].volume
        assert volume is not None and lab.labels is not None  # a study's report with its label maps
        names = SEG_LABELS[lab.modality]
        tumor = lab.labels == names.index("tumor")
        diameter = _largest_diameter(tumor, volume, lab.series_instance_uid) if tumor.any() else None
        truth.series[lab.series_instance_uid] = SeriesTruth.of(role, lab.labels, diameter)
        if lab.modality is Modality.CT:
            truth.opll = bool((lab.labels == names.index("opll")).any())
        if truth.cobb_deg is None and lab.modality is Modality.XR:
            truth.cobb_deg = measure_spine(Modality.XR, lab.labels, volume).cobb_angle_deg
            truth.cobb_source = "labels" if truth.cobb_deg is not None else ""
    for box in report.boxes:
        role = role_of.get(box.series_instance_uid)
        if role is None:
            continue
        volume = chosen[role].volume
        assert volume is not None
        extent = np.array(box.last) - np.array(box.first) + 1
        spacing = np.array([0.0 if volume.projection else volume.slice_spacing, *volume.pixel_spacing])
        side = float((extent * spacing).max())
        entry = truth.series.get(box.series_instance_uid)
        if entry is None:
            truth.series[box.series_instance_uid] = SeriesTruth(role, role.modality, None, (), side, "box")
        elif entry.diameter_source != "segment" and side > (entry.diameter_mm or 0.0):
            entry.diameter_mm, entry.diameter_source = side, "box"
    return truth


def study_record(truth: StudyTruth, analysis: StudyAnalysis) -> dict:
    """One study's figures under one version set: per labelled series, and of the study."""
    series_out: dict[str, dict] = {}
    for uid, series in truth.series.items():
        result = analysis.modality(series.modality)
        used = {s.series_instance_uid for s in result.series} if result is not None else set()
        assessed = result is not None and result.assessment.assessed and uid in used
        entry: dict = {"modality": series.modality.value, "assessed": assessed, "structures": {}, "lesion_dice": None}
        entry["size"] = None
        if assessed and result is not None:
            names = SEG_LABELS[series.modality]
            truth_labels = series.labels
            if truth_labels is not None and series.role in result.labels:
                predicted = result.labels[series.role]
                for index, name in enumerate(names[1:], start=1):
                    want = truth_labels == index
                    if name == "tumor":
                        entry["lesion_dice"] = _dice(predicted == index, want) if want.any() else None
                    elif want.any():
                        entry["structures"][name] = _dice(predicted == index, want)
            if series.diameter_mm is not None and result.lesions:  # the modality's largest lesion
                entry["size"] = {
                    "truth_mm": series.diameter_mm,
                    "predicted_mm": result.lesions[0].max_diameter_mm,
                    "source": series.diameter_source,
                }
        series_out[series.role.value] = entry
    primary = analysis.primary_lesion()
    spine = analysis.spine
    return {
        "study": truth.name,
        "truth": {
            "tumor": truth.tumor,
            "level": truth.level,
            "cobb_deg": truth.cobb_deg,
            "cobb_source": truth.cobb_source,
            "opll": truth.opll,
        },
        "assessed": analysis.fused.assessed,
        "detected": analysis.fused.tumor_detected,
        "primary_level": primary.vertebral_level if primary else None,
        "cobb_deg": spine.cobb_angle_deg,
        "opll": spine.opll.present if spine.opll else None,
        "series": series_out,
    }


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(float(np.mean(values)), 4) if values else None


def version_metrics(records: list[dict]) -> dict:
    """The figures of one version set over the held-out studies' records."""
    per_modality: dict[str, dict] = {}
    for modality in MODALITY_ORDER:
        entries = [e for r in records for e in r["series"].values() if e["modality"] == modality.value]
        if not entries:
            continue
        assessed = [e for e in entries if e["assessed"]]
        structures = sorted({s for e in assessed for s in e["structures"]})
        sizes = [e["size"] for e in assessed if e["size"]]
        per_modality[modality.value] = {
            "labelled": len(entries),  # labelled series (an MR study may have its T1 and T2 labelled)
            "assessed": len(assessed),
            "dice": {s: _mean([e["structures"].get(s) for e in assessed]) for s in structures},
            "mean_dice": _mean([_mean([e["structures"].get(s) for s in MEAN_OVER[modality]]) for e in assessed]),
            "lesion_dice": _mean([e["lesion_dice"] for e in assessed]),
            "lesion_dice_studies": sum(e["lesion_dice"] is not None for e in assessed),
            "size_mae_mm": _mean([abs(s["predicted_mm"] - s["truth_mm"]) for s in sizes]),
            "size_bias_mm": _mean([s["predicted_mm"] - s["truth_mm"] for s in sizes]),
            "size_studies": len(sizes),
            "size_from_boxes": sum(s["source"] == "box" for s in sizes),
        }
    tumor = [r for r in records if r["truth"]["tumor"]]
    free = [r for r in records if not r["truth"]["tumor"]]
    levels = [r for r in tumor if r["truth"]["level"] and r["detected"]]
    cobb = [r for r in records if r["truth"]["cobb_deg"] is not None and r["cobb_deg"] is not None]
    opll = [r for r in records if r["truth"]["opll"] is not None and r["opll"] is not None]
    return {
        "studies": len(records),
        "assessable": sum(r["assessed"] for r in records),
        "modalities": per_modality,
        "detection_sensitivity": _mean([r["detected"] for r in tumor]),
        "detection_specificity": _mean([not r["detected"] for r in free]),
        "tumor_studies": len(tumor),
        "level_accuracy": _mean([r["primary_level"] == r["truth"]["level"] for r in levels]),
        "level_studies": len(levels),
        "cobb_mae_deg": _mean([abs(r["cobb_deg"] - r["truth"]["cobb_deg"]) for r in cobb]),
        "cobb_studies": len(cobb),
        "cobb_truth": dict(Counter(r["truth"]["cobb_source"] for r in cobb)),
        "opll_accuracy": _mean([r["opll"] == r["truth"]["opll"] for r in opll]),
        "opll_studies": len(opll),
        "opll_present": sum(r["truth"]["opll"] for r in opll),
    }


def _versions(repository: Path, candidate: int | None) -> list[int]:
    """The served set, then the candidate (default: the highest other set; none when there is only one)."""
    current = served_set(repository)
    sets = available_sets(repository)
    if candidate is None:
        others = [v for v in sets if v != current]
        return [current, others[-1]] if others else [current]
    if candidate not in sets:
        raise InvalidInputError(f"no version set {candidate} in {repository}: the sets are {', '.join(map(str, sets))}")
    return [current] if candidate == current else [current, candidate]


def held_out(report: CohortReport, splits: tuple[str, ...] = HELD_OUT) -> list[StudyReport]:
    return [s for s in report.studies if s.row is not None and s.row.split in splits]


async def _run(
    folder: Path,
    truths: list[StudyTruth],
    repository: Path,
    url: str,
    versions: list[int],
    limits: IngestLimits,
    progress: bool,
) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    async with TritonClient(url) as client:
        for number in versions:
            use_version(repository, number)
            await client.reload((*MODELS, *ENSEMBLES))
            behind = await client.wait_versions(tuple(MODELS), number)
            if behind:
                raise TritonUnavailableError(f"Triton did not serve version {number} of {', '.join(behind)}")
            calibration, competence = Calibration.load(repository), CompetenceReference.load(repository)
            models, prototypes = model_versions(repository), default_prototypes(repository)
            records = []
            for truth in tqdm(truths, desc=f"version {number}", unit="study", disable=not progress):
                study = await asyncio.to_thread(ingest_paths, image_files(folder / truth.name), limits)
                analysis = await analyze(study, client, prototypes, calibration, AnalysisOptions(), models, competence)
                records.append(study_record(truth, analysis))
            out[number] = records
    return out


def evaluate_versions(
    folder: Path,
    repository: Path,
    candidate: int | None = None,
    limits: IngestLimits = IngestLimits(),
    progress: bool = True,
) -> dict:
    """Check the cohort (stop on errors), then analyse its held-out studies with the served version set and the
    candidate, on a local Triton over a copy of ``repository`` (the served set is left as it is)."""
    report = check_cohort(folder, limits=limits, progress=progress)
    require_clean(report)
    studies = held_out(report)
    if not studies:
        raise InvalidInputError(f"the cohort {folder} has no held-out study (split validation or test in its manifest)")
    versions = _versions(repository, candidate)
    shown = tqdm(studies, desc="labels", unit="study", disable=not progress)
    truths = [study_truth(folder / s.name, labelled_study(report, s, limits), limits) for s in shown]
    with tempfile.TemporaryDirectory(prefix="cspine-versions-") as work:
        copy = Path(work) / "repository"
        shutil.copytree(repository, copy, ignore=shutil.ignore_patterns("__pycache__"))
        with LocalTriton(copy, TritonPorts.free()) as triton:
            records = asyncio.run(_run(folder, truths, copy, triton.grpc_url, versions, limits, progress))
    return {
        "cohort": str(folder),
        "synthetic": is_synthetic(folder),
        "held_out_studies": len(studies),
        "served": versions[0],
        "versions": {str(v): version_metrics(records[v]) for v in versions},
        "studies": {str(v): records[v] for v in versions},
    }


def format_versions(result: dict) -> str:
    versions = list(result["versions"])
    names = [f"version {v}" + (" (served)" if int(v) == result["served"] else "") for v in versions]
    width = 44

    def f(value, digits: int = 3, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:.{digits}f}{unit}"

    rows: list[tuple[str, list[str]]] = []
    metrics = [result["versions"][v] for v in versions]
    rows.append(("studies assessable", [f"{m['assessable']} of {m['studies']}" for m in metrics]))
    for key in [m.value for m in MODALITY_ORDER if any(m.value in x["modalities"] for x in metrics)]:
        per = [m["modalities"].get(key, {}) for m in metrics]
        rows.append((f"{key} series assessed", [f"{p.get('assessed', 0)} of {p.get('labelled', 0)}" for p in per]))
        rows.append((f"{key} mean structure Dice", [f(p.get("mean_dice")) for p in per]))
        for structure in sorted({s for p in per for s in p.get("dice", {})}):
            rows.append((f"  {structure}", [f(p.get("dice", {}).get(structure)) for p in per]))
        rows.append(
            (f"{key} lesion Dice", [f"{f(p.get('lesion_dice'))} ({p.get('lesion_dice_studies', 0)})" for p in per])
        )
        rows.append(
            (
                f"{key} lesion size error / bias",
                [
                    f"{f(p.get('size_mae_mm'), 2, ' mm')} / {f(p.get('size_bias_mm'), 2, ' mm')} "
                    f"({p.get('size_studies', 0)})"
                    for p in per
                ],
            )
        )
    rows.append(("detection sensitivity", [f(m["detection_sensitivity"]) for m in metrics]))
    rows.append(("detection specificity", [f(m["detection_specificity"]) for m in metrics]))
    rows.append(("level accuracy", [f"{f(m['level_accuracy'])} ({m['level_studies']})" for m in metrics]))
    rows.append(("Cobb C2–C7 MAE", [f"{f(m['cobb_mae_deg'], 2, '°')} ({m['cobb_studies']})" for m in metrics]))
    rows.append(("OPLL accuracy", [f"{f(m['opll_accuracy'])} ({m['opll_studies']})" for m in metrics]))
    label = "SYNTHETIC " if result["synthetic"] else ""
    lines = [
        f"{label}cohort {result['cohort']}: {result['held_out_studies']} held-out studies through the pipeline "
        "(in brackets: the studies a figure is over)",
        f"{'':{width}}" + "".join(f"{n:>26}" for n in names),
    ]
    lines += [f"{name:{width}}" + "".join(f"{v:>26}" for v in values) for name, values in rows]
    return "\n".join(lines)
