"""The session's SYNTHETIC phantom cohort: one case of each tumor class and one tumor-free, written by the real
generator with its truth.json and label maps."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import generate_uid

from cspine.phantom.generate import Case, PhantomOptions, build_case, write_case


@dataclass
class PhantomCase:
    """A written SYNTHETIC case: its folder, truth.json, label maps, and the in-memory case."""

    path: Path
    truth: dict
    labels: dict[str, np.ndarray]
    case: Case

    def files(self, role: str) -> list[Path]:
        return [self.path / f for f in self.truth["series"][role]["files"]]


# (case id, tumor, opll): one of each class, one tumor-free, OPLL forced where the truth test needs it.
COHORT = [
    ("malignant", "malignant", "yes"),
    ("benign", "benign", "no"),
    ("borderline", "borderline", "random"),
    ("none", "none", "yes"),
]
COHORT_SEED = 11


def write_cohort(root: Path) -> dict[str, PhantomCase]:
    """The cohort written under ``root``, one folder per case id."""
    cases = {}
    for index, (name, tumor, opll) in enumerate(COHORT):
        case = build_case(name, COHORT_SEED, index, PhantomOptions(tumor=tumor, opll=opll))
        truth = write_case(case, root / name)
        with np.load(root / name / "labels.npz") as npz:
            labels = {k: npz[k] for k in npz.files}
        assert json.loads((root / name / "truth.json").read_text()) == truth
        cases[name] = PhantomCase(root / name, truth, labels, case)
    return cases


def mixed_study(main: PhantomCase, radiograph_of: PhantomCase, folder: Path) -> list[Path]:
    """``main``'s CT and MR with ``radiograph_of``'s radiograph, written to ``folder`` as one new study (a new
    StudyInstanceUID, ``main``'s patient): its radiograph shows a lesion at another level than its CT and MR."""
    study_uid = generate_uid()
    patient = pydicom.dcmread(main.files("ct")[0], stop_before_pixels=True)
    sources = [f for role in main.truth["series"] if role != "xr" for f in main.files(role)]
    paths = []
    for index, source in enumerate([*sources, *radiograph_of.files("xr")]):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID = study_uid
        for keyword in ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"):
            setattr(ds, keyword, patient.get(keyword, ""))
        paths.append(folder / f"{index:04d}.dcm")
        ds.save_as(paths[-1])
    return paths
