"""Shared fixtures: a small SYNTHETIC phantom cohort made once per session by the real generator, a real
local Triton, and a throwaway PostgreSQL 15 cluster."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, text

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


def analyse(triton, study, options=None):
    """The pipeline on an ingested study through the ``triton`` fixture's server, with everything the service
    ships: the default prototypes, the calibration, the model versions and the competence reference."""
    import asyncio

    from cspine.analysis.competence import CompetenceReference
    from cspine.analysis.fusion import Calibration
    from cspine.fewshot.prototypes import default_prototypes
    from cspine.inference.client import TritonClient
    from cspine.inference.local_triton import default_repository
    from cspine.pipeline import AnalysisOptions, analyze, model_versions

    repository = default_repository()

    async def go():
        async with TritonClient(triton.grpc_url, timeout_s=120.0) as client:
            return await analyze(
                study,
                client,
                default_prototypes(),
                Calibration.load(repository),
                options or AnalysisOptions(),
                model_versions(repository),
                CompetenceReference.load(repository),
            )

    return asyncio.run(go())


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


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (trust auth); yields a function making a fresh database."""
    assert (PG_BIN / "initdb").exists(), f"PostgreSQL 15 must be installed ({PG_BIN}): apt-get install postgresql-15"
    root = Path(tempfile.mkdtemp(prefix="cspine-pg-"))
    as_user = []
    if os.geteuid() == 0:  # initdb refuses root
        shutil.chown(root, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()

    def pg(tool: str, *args: str) -> None:
        subprocess.run([*as_user, str(PG_BIN / tool), *args], check=True, capture_output=True, timeout=60)

    pg("initdb", "-D", str(root / "data"), "--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    pg("pg_ctl", "-D", str(root / "data"), "-l", str(root / "log"), "-o", options, "-w", "start")
    admin = create_engine(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", isolation_level="AUTOCOMMIT")
    databases = itertools.count(1)

    def new_database() -> str:
        name = f"store_{next(databases)}"
        with admin.connect() as conn:
            conn.execute(text(f"CREATE DATABASE {name}"))
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"

    try:
        yield new_database
    finally:
        admin.dispose()
        pg("pg_ctl", "-D", str(root / "data"), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)
