"""Shared fixtures: a small SYNTHETIC phantom cohort, made once per test session by the real generator."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

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


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhantomCase]:
    root = tmp_path_factory.mktemp("phantom")
    cases = {}
    for index, (name, tumor, opll) in enumerate(COHORT):
        case = build_case(name, COHORT_SEED, index, PhantomOptions(tumor=tumor, opll=opll))
        truth = write_case(case, root / name)
        with np.load(root / name / "labels.npz") as npz:
            labels = {k: npz[k] for k in npz.files}
        assert json.loads((root / name / "truth.json").read_text()) == truth
        cases[name] = PhantomCase(root / name, truth, labels, case)
    return cases


def free_port() -> int:
    from cspine.inference.local_triton import free_ports

    return free_ports(1)[0]


@pytest.fixture(scope="session")
def triton():
    """One real tritonserver (the bundled binary, CPU, Python backend) over the shipped model repository."""
    from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository

    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
    with LocalTriton(default_repository(), ports) as server:
        yield server
