"""A labelled cohort's ``manifest.csv``: one row per study folder with its pathology and its split.

Columns (a header row first; docs/cohort.md): ``study`` (the study's folder, relative to the cohort), ``class``
(``benign``, ``borderline``, ``malignant``, or ``none`` for a study without a tumor), ``subtype`` (optional),
``level`` (the tumor's main vertebra, optional), ``reference`` (where the pathology comes from: a report number,
never a patient identifier), ``split`` (``train``, ``validation`` or ``test``: held out from training) and
``cobb_deg`` (optional: the C2–C7 Cobb angle the site measured, in degrees, lordosis positive).
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path

from cspine.domain import VERTEBRAL_LEVELS

MANIFEST_FILE = "manifest.csv"
COLUMNS = ("study", "class", "subtype", "level", "reference", "split", "cobb_deg")
CLASSES = ("benign", "borderline", "malignant", "none")  # the classifier's classes, and no tumor
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class ManifestRow:
    study: str
    tumor_class: str
    subtype: str
    level: str
    reference: str
    split: str
    cobb_deg: str = ""  # as written; ``cobb`` reads it

    @property
    def cobb(self) -> float | None:
        return float(self.cobb_deg) if self.cobb_deg else None

    def as_csv(self) -> dict[str, str]:
        row = asdict(self)
        row["class"] = row.pop("tumor_class")
        return row


def write_manifest(path: Path, rows: list[ManifestRow]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row.as_csv())


def read_manifest(path: Path) -> tuple[dict[str, ManifestRow], list[str]]:
    """The rows by study, and what is wrong with the file (each problem names its line). A row with a problem is
    left out; a file that cannot be read gives no rows and one problem."""
    if not path.exists():
        return {}, [f"no {MANIFEST_FILE} in the cohort folder"]
    problems: list[str] = []
    rows: dict[str, ManifestRow] = {}
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("study", "class", "split") if c not in (reader.fieldnames or [])]
            if missing:
                return {}, [f"{MANIFEST_FILE} lacks the column(s) {', '.join(missing)} (header: {', '.join(COLUMNS)})"]
            for number, raw in enumerate(reader, start=2):
                row = ManifestRow(
                    study=(raw.get("study") or "").strip().strip("/"),
                    tumor_class=(raw.get("class") or "").strip().lower(),
                    subtype=(raw.get("subtype") or "").strip(),
                    level=(raw.get("level") or "").strip().upper(),
                    reference=(raw.get("reference") or "").strip(),
                    split=(raw.get("split") or "").strip().lower(),
                    cobb_deg=(raw.get("cobb_deg") or "").strip(),
                )
                problem = _row_problem(row, rows)
                if problem:
                    problems.append(f"{MANIFEST_FILE} line {number}: {problem}")
                else:
                    rows[row.study] = row
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return {}, [f"{MANIFEST_FILE} cannot be read ({type(exc).__name__}: {exc})"]
    return rows, problems


def _row_problem(row: ManifestRow, seen: dict[str, ManifestRow]) -> str:
    if not row.study:
        return "no study folder named"
    if row.study in seen:
        return f"study {row.study!r} is listed twice"
    if row.tumor_class not in CLASSES:
        return f"class {row.tumor_class!r} of {row.study!r} is not one of {', '.join(CLASSES)}"
    if row.split not in SPLITS:
        return f"split {row.split!r} of {row.study!r} is not one of {', '.join(SPLITS)}"
    if row.level and row.level not in VERTEBRAL_LEVELS:
        return f"level {row.level!r} of {row.study!r} is not one of {', '.join(VERTEBRAL_LEVELS)}"
    if row.cobb_deg:
        try:
            cobb = float(row.cobb_deg)
        except ValueError:
            cobb = float("nan")
        if not -90.0 <= cobb <= 90.0:
            return f"cobb_deg {row.cobb_deg!r} of {row.study!r} is not an angle in degrees between -90 and 90"
    if row.tumor_class == "none" and (row.subtype or row.level):
        return f"study {row.study!r} has class none but a tumor subtype or level"
    return ""
