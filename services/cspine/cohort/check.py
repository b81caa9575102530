"""``cspine cohort check DIR``: is a labelled cohort (docs/cohort.md) fit to train and evaluate on?

Every study's images are ingested and their series chosen as the service would; every SEG and tumor box is read
against the series it labels (``cohort.labels``); the manifest is matched with the study folders. Each problem is
an error (training stops on it), a warning (worth a look: an image series without labels, a structure missing
from one) or information (a label the modality's model does not use).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from cspine.client.files import is_part10, iter_files
from cspine.cohort.codes import XR_BODY_LEVELS, CodeMap
from cspine.cohort.labels import BOXES_FILE, SEGMENTATION_STORAGE, Box, Problem, SeriesLabels, read_boxes, read_seg
from cspine.cohort.manifest import MANIFEST_FILE, SPLITS, ManifestRow, read_manifest
from cspine.config import IngestLimits
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality, SeriesRole
from cspine.errors import CspineError

# The structures a modality's labels should hold (pathology, OPLL and the radiograph's other bodies may be absent).
EXPECTED: dict[Modality, tuple[str, ...]] = {
    Modality.CT: ("vertebral_body", "posterior_elements", "disc", "canal"),
    Modality.MR: ("vertebral_body", "posterior_elements", "disc", "csf", "cord"),
    Modality.XR: tuple(f"{level.lower()}_body" for level in XR_BODY_LEVELS) + ("posterior_elements", "disc"),
}


@dataclass
class StudyReport:
    name: str
    row: ManifestRow | None
    roles: dict[str, str] = field(default_factory=dict)  # role → series UID, as series selection chose them
    labels: list[SeriesLabels] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def count(self, severity: str) -> int:
        return sum(p.severity == severity for p in self.problems)

    def as_dict(self) -> dict:
        labelled = {lab.series_instance_uid: lab for lab in self.labels}
        return {
            "study": self.name,
            "split": self.row.split if self.row else None,
            "class": self.row.tumor_class if self.row else None,
            "series": {
                role: {
                    "series_instance_uid": uid,
                    "labels": labelled[uid].source if uid in labelled else None,
                    "voxels": labelled[uid].voxels if uid in labelled else {},
                    "boxes": sum(b.series_instance_uid == uid for b in self.boxes),
                }
                for role, uid in self.roles.items()
            },
            "problems": [{"severity": p.severity, "code": p.code, "message": p.message} for p in self.problems],
        }


@dataclass
class CohortReport:
    folder: Path
    studies: list[StudyReport]
    problems: list[Problem]  # of the cohort as a whole: its manifest and code map

    def count(self, severity: str) -> int:
        return sum(p.severity == severity for p in self.problems) + sum(s.count(severity) for s in self.studies)

    def class_counts(self) -> dict[str, dict[str, int]]:
        counts: dict[str, Counter[str]] = {split: Counter() for split in SPLITS}
        for study in self.studies:
            if study.row is not None:
                counts[study.row.split][study.row.tumor_class] += 1
        return {split: dict(sorted(c.items())) for split, c in counts.items() if c}

    def as_dict(self) -> dict:
        return {
            "cohort": str(self.folder),
            "studies": [s.as_dict() for s in self.studies],
            "class_counts": self.class_counts(),
            "problems": [{"severity": p.severity, "code": p.code, "message": p.message} for p in self.problems],
            "errors": self.count("error"),
            "warnings": self.count("warning"),
        }


def _sop_class(path: Path) -> str | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except (InvalidDicomError, OSError, ValueError, EOFError):
        return None
    return str(ds.get("SOPClassUID", "")) or None


def split_files(folder: Path) -> tuple[list[Path], list[Path]]:
    """A study folder's DICOM files: the images (everything but SEG, for ingest) and the SEG objects."""
    files = [p for p in iter_files([folder]) if is_part10(p)]
    segs = [p for p in files if _sop_class(p) == SEGMENTATION_STORAGE]
    return [p for p in files if p not in segs], segs


def image_files(folder: Path) -> list[Path]:
    return split_files(folder)[0]


def check_study(
    folder: Path, row: ManifestRow | None, codes: CodeMap, limits: IngestLimits = IngestLimits()
) -> StudyReport:
    """One study folder's images and labels, checked."""
    report = StudyReport(folder.name, row)
    problems = report.problems
    images, segs = split_files(folder)
    if not images:
        problems.append(Problem("error", "no_images", "no DICOM image in the study folder"))
        return report
    try:
        study = ingest_paths(images, limits)
    except CspineError as exc:
        problems.append(Problem("error", "ingest", f"the images cannot be ingested as the service would: {exc}"))
        return report
    chosen = select_series(study).chosen
    report.roles = {role.value: series.series_instance_uid for role, series in chosen.items()}
    if not chosen:
        problems.append(
            Problem("error", "no_images", "no series cspine analyses (axial CT, sagittal MR, lateral radiograph)")
        )
    for path in segs:
        source = str(path.relative_to(folder))
        try:
            ds = pydicom.dcmread(path)
            labels, found = read_seg(ds, source, study, codes)
        except (
            InvalidDicomError,
            OSError,
            ValueError,
            AttributeError,
            KeyError,
            TypeError,
            RuntimeError,
            NotImplementedError,
        ) as exc:
            problems.append(Problem("error", "seg_unreadable", f"{source} cannot be read: {type(exc).__name__}: {exc}"))
            continue
        problems.extend(found)
        if labels is None:
            continue
        if any(other.series_instance_uid == labels.series_instance_uid for other in report.labels):
            problems.append(Problem("error", "labelled_twice", f"{source} labels a series another SEG already labels"))
            continue
        report.labels.append(labels)
    if (folder / BOXES_FILE).exists():
        report.boxes, found = read_boxes(folder / BOXES_FILE, study)
        problems.extend(found)
    labelled = {lab.series_instance_uid: lab for lab in report.labels}
    for role, series in chosen.items():
        modality = role.modality
        lab = labelled.get(series.series_instance_uid)
        if lab is None:
            problems.append(
                Problem("warning", "missing_labels", f"no structure labels for the {_role_name(role)} series")
            )
            continue
        missing = [s for s in EXPECTED[modality] if s not in lab.voxels]
        if missing:
            problems.append(
                Problem("warning", "missing_structures", f"the {_role_name(role)} labels have no {', '.join(missing)}")
            )
    unused = [lab.source for lab in report.labels if lab.series_instance_uid not in report.roles.values()]
    for source in unused:
        problems.append(
            Problem("warning", "unused_labels", f"{source} labels a series cspine does not choose to analyse")
        )
    _check_tumor(report)
    return report


def _role_name(role: SeriesRole) -> str:
    return {"ct": "CT", "mr_t1": "MR T1", "mr_t2": "MR T2", "xr": "radiograph"}[role.value]


def _check_tumor(report: StudyReport) -> None:
    """A study with a tumor class needs a tumor label (segment or box); a tumor-free one must have none."""
    if report.row is None:
        return
    tumor_voxels = sum(lab.voxels.get("tumor", 0) for lab in report.labels)
    labelled = tumor_voxels > 0 or bool(report.boxes)
    if report.row.tumor_class != "none" and not labelled:
        report.problems.append(
            Problem("error", "tumor_label", f"class {report.row.tumor_class} but no tumor segment or box")
        )
    if report.row.tumor_class == "none" and labelled:
        report.problems.append(Problem("error", "tumor_label", "class none but a tumor segment or box"))


def study_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_cohort(
    folder: Path, limits: IngestLimits = IngestLimits(), progress: bool = False, keep_labels: bool = False
) -> CohortReport:
    """Check every study of a cohort folder against its manifest and code map. Each study's label maps are
    dropped once it is checked (a cohort of hundreds of CTs would not fit in memory), unless ``keep_labels``:
    ``labelled_study`` reads one study's again."""
    from tqdm import tqdm

    problems: list[Problem] = []
    try:
        codes = CodeMap.load(folder)
    except CspineError as exc:
        problems.append(Problem("error", "codes", str(exc)))
        codes = CodeMap({})
    rows, manifest_problems = read_manifest(folder / MANIFEST_FILE)
    problems.extend(Problem("error", "manifest", p) for p in manifest_problems)
    folders = study_folders(folder)
    names = {p.name for p in folders}
    for study in sorted(set(rows) - names):
        problems.append(Problem("error", "manifest", f"{MANIFEST_FILE} lists {study!r}, which is not a folder here"))
    studies = []
    for path in tqdm(folders, desc="cohort check", unit="study", disable=not progress):
        report = check_study(path, rows.get(path.name), codes, limits)
        if path.name not in rows:
            report.problems.insert(0, Problem("error", "manifest", f"not in {MANIFEST_FILE}"))
        if not keep_labels:
            for labels in report.labels:
                labels.labels = None
        studies.append(report)
    return CohortReport(folder, studies, problems)


def labelled_study(report: CohortReport, study: StudyReport, limits: IngestLimits = IngestLimits()) -> StudyReport:
    """A study of a checked cohort with its label maps (read again: ``check_cohort`` drops them)."""
    return check_study(report.folder / study.name, study.row, CodeMap.load(report.folder), limits)


def format_report(report: CohortReport) -> str:
    """The report as a table per study and its problems, for a terminal."""
    lines = [f"cohort {report.folder}: {len(report.studies)} studies"]
    for split, counts in report.class_counts().items():
        lines.append(f"  {split}: " + ", ".join(f"{c} {n}" for c, n in counts.items()))
    lines.append("")
    lines.append(f"{'study':<24} {'split':<10} {'class':<11} {'labelled series':<34} {'boxes':>5}  errors warnings")
    for study in report.studies:
        labelled = {lab.series_instance_uid for lab in study.labels}
        series = " ".join(f"{role}{'+' if uid in labelled else '-'}" for role, uid in study.roles.items()) or "-"
        split = study.row.split if study.row else "?"
        tumor_class = study.row.tumor_class if study.row else "?"
        lines.append(
            f"{study.name:<24} {split:<10} {tumor_class:<11} {series:<34} {len(study.boxes):>5}  "
            f"{study.count('error'):>6} {study.count('warning'):>8}"
        )
    every = [("cohort", p) for p in report.problems] + [(s.name, p) for s in report.studies for p in s.problems]
    shown = [(name, p) for name, p in every if p.severity != "info"]
    if shown:
        lines.append("")
        for name, p in shown:
            lines.append(f"{p.severity:<7} {name}: {p.code}: {p.message}")
    lines.append("")
    lines.append(
        f"{report.count('error')} error(s), {report.count('warning')} warning(s) in {len(report.studies)} studies "
        "(role+ has structure labels, role- has none)"
    )
    if len(every) > len(shown):
        lines.append(f"{len(every) - len(shown)} note(s) on labels a modality's model does not use: --json lists them")
    return "\n".join(lines)
