"""What ``cspine inspect PATH… [--json]`` reports: the studies, series and selection ingest would make of
some files, and every file it would refuse, without analysing anything.

``inspect_paths(paths)`` returns a JSON-serialisable dict with these stable keys:

* ``files``: number of files examined;
* ``studies``: one entry per StudyInstanceUID, ingested separately, sorted by UID:

  * ``study_instance_uid``, ``files`` (files routed to this study),
  * ``error``: null, or the message of the CspineError that stopped the study as a whole,
  * ``series``: ``series_instance_uid``, ``series_number``, ``dicom_modality``, ``modality`` ("CT", "MR",
    "XR" or null), ``description``, ``instances`` (instances the series is built from), ``shape``
    ([slices, rows, columns] or null), ``spacing_mm`` ([slice, row, column] or null), ``orientation``,
    ``slice_thickness`` (mm or null), ``notices`` (``code``, ``message``) about this series;
  * ``selection``: every role ("ct", "mr_t2", "mr_t1", "xr") → the chosen series' UID or null,
  * ``notices``: every notice of ingest and selection (``code``, ``message``, ``series_instance_uid``);

* ``refused``: files ingest refuses on their own: ``file``, ``error_type`` (the CspineError class),
  ``error`` (its message);
* ``skipped``: files that belong to no study (a DICOMDIR): ``file``, ``code``, ``message``.

Patient name, ID and birth date are never read into the report. ``format_inspect(report)`` renders it as
text for a terminal.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cspine.client.files import iter_files
from cspine.config import IngestLimits
from cspine.dicom.ingest import StudyBuilder
from cspine.dicom.selection import select_series
from cspine.domain import Notice, Selection, Series, SeriesRole, Study
from cspine.errors import CspineError

logger = logging.getLogger(__name__)

__all__ = ["format_inspect", "inspect_paths"]


def _files(paths: Iterable[Path | str], refused: list[dict[str, Any]]) -> list[Path]:
    files: list[Path] = []
    for given in paths:
        try:
            files.extend(iter_files([given]))
        except CspineError as exc:
            refused.append({"file": str(given), "error_type": type(exc).__name__, "error": str(exc)})
    return files


def _notice(notice: Notice, with_series: bool = True) -> dict[str, Any]:
    entry: dict[str, Any] = {"code": notice.code.value, "message": notice.message}
    if with_series:
        entry["series_instance_uid"] = notice.series_instance_uid
    return entry


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _series_entry(series: Series, notices: list[Notice]) -> dict[str, Any]:
    volume = series.volume
    return {
        "series_instance_uid": series.series_instance_uid,
        "series_number": series.series_number,
        "dicom_modality": series.dicom_modality,
        "modality": series.modality.value if series.modality is not None else None,
        "description": series.description,
        "instances": len(series.headers),
        "shape": list(volume.shape) if volume is not None else None,
        "spacing_mm": [_round(v) for v in volume.spacing] if volume is not None else None,
        "orientation": series.orientation.value,
        "slice_thickness": _round(volume.slice_thickness) if volume is not None else None,
        "notices": [
            _notice(n, with_series=False) for n in notices if n.series_instance_uid == series.series_instance_uid
        ],
    }


def _study_entry(uid: str, files: int, study: Study | None, selection: Selection | None, error: str | None):
    notices = (study.notices if study else []) + (selection.notices if selection else [])
    chosen = selection.chosen if selection else {}
    return {
        "study_instance_uid": uid,
        "files": files,
        "error": error,
        "series": [_series_entry(s, notices) for s in study.series] if study else [],
        "selection": {role.value: chosen[role].series_instance_uid if role in chosen else None for role in SeriesRole},
        "notices": [_notice(n) for n in notices],
    }


def inspect_paths(paths: Iterable[Path | str], limits: IngestLimits = IngestLimits()) -> dict[str, Any]:
    """Group the files by study, ingest and select each study, and report it (keys: module docstring)."""
    refused: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    files = _files(paths, refused)
    builders: dict[str, StudyBuilder] = {}
    counts: dict[str, int] = {}
    for path in files:
        label = str(path)
        probe = StudyBuilder(limits)  # reads the header once alone, to learn the study and any refusal
        try:
            probe.add_file(label, path)
        except CspineError as exc:
            refused.append({"file": label, "error_type": type(exc).__name__, "error": str(exc)})
            continue
        uid = probe.study_instance_uid
        if uid is None:
            skipped.extend({"file": label, "code": n.code.value, "message": n.message} for n in probe.notices)
            continue
        builder = builders.setdefault(uid, StudyBuilder(limits))
        try:
            builder.add_file(label, path)
        except CspineError as exc:  # a study-wide limit, or a file that changed since the probe
            refused.append({"file": label, "error_type": type(exc).__name__, "error": str(exc)})
            continue
        counts[uid] = counts.get(uid, 0) + 1
    studies = []
    for uid in sorted(builders):
        study = selection = error = None
        try:
            study = builders[uid].build()
            selection = select_series(study)
        except CspineError as exc:
            error = f"{type(exc).__name__}: {exc}"
        studies.append(_study_entry(uid, counts.get(uid, 0), study, selection, error))
    logger.info("inspected %d files: %d studies, %d refused", len(files), len(studies), len(refused))
    return {"files": len(files), "studies": studies, "refused": refused, "skipped": skipped}


# --------------------------------------------------------------------------------------------------------
# Text


def _number(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _series_line(entry: dict[str, Any]) -> str:
    shape = "×".join(str(v) for v in entry["shape"]) if entry["shape"] else "-"
    spacing = "×".join(_number(v) for v in entry["spacing_mm"]) if entry["spacing_mm"] else "-"
    number = entry["series_number"] if entry["series_number"] is not None else "?"
    return (
        f"  {number!s:>6}  {entry['dicom_modality'] or '-':<5}  {entry['modality'] or '-':<4}  "
        f"{entry['orientation']:<10}  {shape:<14}  {spacing:<18}  {_number(entry['slice_thickness']):>6}  "
        f"{entry['instances']:>5}  {entry['description']}"
    )


def format_inspect(report: dict[str, Any]) -> str:
    """The report as text: a table of series per study, the selection, notices, refused files."""
    studies, refused, skipped = report["studies"], report["refused"], report["skipped"]
    lines = [f"{report['files']} file(s): {len(studies)} study(ies), {len(refused)} refused, {len(skipped)} skipped"]
    for study in studies:
        lines += ["", f"Study {study['study_instance_uid']} ({study['files']} file(s))"]
        if study["error"]:
            lines.append(f"  not ingested: {study['error']}")
            continue
        lines.append(
            f"  {'series':>6}  {'dicom':<5}  {'mod':<4}  {'plane':<10}  {'shape':<14}  {'spacing mm':<18}  "
            f"{'thick':>6}  {'inst':>5}  description"
        )
        lines += [_series_line(entry) for entry in study["series"]]
        numbers = {s["series_instance_uid"]: s["series_number"] for s in study["series"]}
        chosen = [
            f"{role} ← series {'?' if numbers.get(uid) is None else numbers[uid]}" if uid else f"{role} ← none"
            for role, uid in study["selection"].items()
        ]
        lines.append("  selection: " + "; ".join(chosen))
        if study["notices"]:
            lines.append("  notices:")
            lines += [f"    [{n['code']}] {n['message']}" for n in study["notices"]]
    if refused:
        lines += ["", "Refused:"]
        lines += [f"  {r['file']}: {r['error_type']}: {r['error']}" for r in refused]
    if skipped:
        lines += ["", "Skipped:"]
        lines += [f"  {s['file']}: {s['message']}" for s in skipped]
    return "\n".join(lines)
