"""The fuzzing corpus (tests/data/fuzz_corpus, made by `cspine fuzz ingest`; its README says how) replayed
through ingest: every input alone, and uploads that combine several, become a Study or a CspineError with a
message — never another exception, never slowly. Inputs that once crashed ingest stay in it as regressions.

Also the fuzz driver's own parts that need no fuzzing run: the bundle format and the mutators.
"""

from __future__ import annotations

import io
import random
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from cspine.dicom.fuzz import BUNDLE_MAGIC, FUZZ_LIMITS, crossover, mutate, pack, unpack
from cspine.dicom.ingest import ingest
from cspine.errors import CspineError, DicomInputError
from support.dicom import fuzz_seed_files

pytestmark = pytest.mark.filterwarnings("ignore")  # damaged inputs make pydicom warn about most things

CORPUS_DIR = Path(__file__).parent / "data" / "fuzz_corpus"
INPUTS = sorted(p for p in CORPUS_DIR.iterdir() if re.fullmatch(r"[0-9a-f]{40}", p.name))


def ingest_or_refuse(items: list[tuple[str, bytes]]) -> str:
    """The property: a Study, or a CspineError with a message (naming one of the instances when it is about
    one); returns the outcome's name."""
    try:
        study = ingest(items, FUZZ_LIMITS)
    except CspineError as exc:
        assert str(exc).strip(), type(exc).__name__
        if isinstance(exc, DicomInputError):
            assert exc.instance in {label for label, _ in items}, str(exc)
        return type(exc).__name__
    assert study.study_instance_uid
    for series in study.series:
        if series.volume is not None:
            assert series.volume.voxels.shape[0] == len(series.volume.slice_offsets)
    return "Study"


def test_the_corpus_is_there_small_and_described():
    sizes = [p.stat().st_size for p in INPUTS]
    assert 50 <= len(INPUTS) < 500
    assert sum(sizes) < 3_000_000
    readme = (CORPUS_DIR / "README.md").read_text()
    assert "cspine fuzz ingest" in readme and "atheris" in readme


@pytest.mark.timeout(20)
@pytest.mark.parametrize("path", INPUTS, ids=lambda p: p.name[:12])
def test_each_corpus_input_is_ingested_or_refused_with_a_message(path):
    ingest_or_refuse(unpack(path.read_bytes()))


def _study_uid(data: bytes) -> str | None:
    try:
        return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID)
    except Exception:
        return None


def _combinations() -> list[list[bytes]]:
    """Uploads of several corpus instances: those of one study together (up to 6 a group), and a few drawn
    at random (which mostly end at the second study)."""
    instances = [data for path in INPUTS for _, data in unpack(path.read_bytes())]
    by_study: dict[str, list[bytes]] = {}
    for data in instances:
        uid = _study_uid(data)
        if uid:
            by_study.setdefault(uid, []).append(data)
    groups = [group[:6] for group in by_study.values() if len(group) > 1]
    rng = random.Random(17)
    groups = rng.sample(groups, min(len(groups), 12))
    groups += [rng.sample(instances, min(len(instances), rng.randint(2, 6))) for _ in range(6)]
    return groups


@pytest.mark.timeout(120)
def test_corpus_instances_uploaded_together_are_ingested_or_refused():
    groups = _combinations()
    assert len(groups) >= 10
    outcomes = [ingest_or_refuse([(f"instance {k + 1}", data) for k, data in enumerate(group)]) for group in groups]
    assert "Study" in outcomes  # the same-study groups are not all refused: the combinations reach assembly


def test_a_bundle_unpacks_to_its_instances_and_a_plain_file_to_itself():
    assert unpack(pack([b"one", b"", b"three"])) == [
        ("instance 1", b"one"),
        ("instance 2", b""),
        ("instance 3", b"three"),
    ]
    assert unpack(b"DICM...") == [("instance 1", b"DICM...")]
    # A length that runs past the end takes the rest; a cut length field ends the bundle.
    assert unpack(BUNDLE_MAGIC + b"\xff\x00\x00\x00abc") == [("instance 1", b"abc")]
    assert unpack(BUNDLE_MAGIC + b"\x01\x00") == []


def test_the_mutators_return_bytes_within_the_size_limit():
    seeds = [data for _, data in fuzz_seed_files()]
    rng = random.Random(3)
    pool = list(seeds)
    for _ in range(2000):
        data = rng.choice(pool)
        if rng.random() < 0.2:
            out = crossover(data, rng.choice(pool), 8192, rng.getrandbits(32))
        else:
            out = mutate(data, 8192, rng.getrandbits(32), lambda d, size: d[:size])
        assert isinstance(out, bytes) and len(out) <= 8192
        pool.append(out)
    bundles = [p for p in pool if p.startswith(BUNDLE_MAGIC)]
    assert bundles and any(len(unpack(b)) > 1 for b in bundles)  # series uploads are made


@pytest.mark.timeout(120)
def test_the_fuzz_worker_runs_inputs_through_ingest(tmp_path):
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for n, (_, data) in enumerate(fuzz_seed_files()[:3]):
        (corpus / f"seed-{n}").write_bytes(data)
    config = tmp_path / "worker.json"
    stats = tmp_path / "stats.json"
    config.write_text(f'{{"crashes": "{tmp_path}", "stats": "{stats}", "cpu_budget_s": null}}')
    result = subprocess.run(
        [sys.executable, "-m", "cspine.dicom.fuzz", f"--config={config}", "-runs=300", "-seed=1", str(corpus)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 300 runs" in result.stderr
    assert not list(tmp_path.glob("python-*")), "a crash input was saved"


def test_the_worker_saves_an_input_that_raises_a_foreign_exception_with_its_traceback(tmp_path):
    from cspine.dicom.fuzz import _Worker, _WorkerConfig

    def broken_ingest(items, limits):
        if items[0][1] == b"boom":
            raise KeyError("Rows")
        if items[0][1] == b"silent":
            raise CspineError("")
        raise CspineError("instance 1: refused")

    worker = _Worker(_WorkerConfig(str(tmp_path), str(tmp_path / "stats.json"), None), broken_ingest, CspineError)
    for data in (b"fine", b"boom", b"boom", b"silent"):
        worker(data)
    worker.write_stats(finished=True)
    assert worker.outcomes == {"CspineError": 1, "crash": 3}
    signatures = sorted(worker.crashes.values())  # one per crashing input: the repeated one counts once
    assert len(signatures) == 2
    assert signatures[0] == "CspineError with an empty message" and signatures[1].startswith("KeyError at ")
    saved = sorted(p.name for p in tmp_path.glob("python-*"))
    assert len(saved) == 4  # two inputs, each with its .txt
    boom = next(p for p in tmp_path.glob("python-*.txt") if "KeyError" in p.read_text())
    assert "Traceback" in boom.read_text() and "broken_ingest" in boom.read_text()
