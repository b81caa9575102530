"""Damaged DICOM (flipped bytes, truncations, splices) is ingested or refused with a CspineError — never
another exception, never a hang. Hypothesis runs derandomized, so every run tries the same cases.

The seeds are the builders' files (compressed syntaxes, multi-frame, big endian …) and one CT slice, one
MR slice and the radiograph of a small SYNTHETIC phantom case.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cspine.config import IngestLimits
from cspine.dicom.ingest import ingest
from cspine.errors import CspineError
from cspine.phantom.generate import PhantomOptions, generate_case
from cspine.phantom.scanner import Shift
from support.dicom import fuzz_seed_files

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.timeout(120)]


def phantom_seed_files() -> list[tuple[str, bytes]]:
    """A CT slice, an MR slice and the radiograph of a SYNTHETIC case at a quarter resolution (fast)."""
    with tempfile.TemporaryDirectory(prefix="cspine-fuzz-") as tmp:
        options = PhantomOptions(tumor="malignant", shift=Shift(resolution=4.0))
        truth = generate_case(Path(tmp) / "case", "fuzz", 5, 0, options)
        picks = {role: truth["series"][role]["files"] for role in ("ct", "mr_t2", "xr")}
        files = [picks["ct"][len(picks["ct"]) // 2], picks["mr_t2"][0], picks["xr"][0]]
        return [(f"phantom/{f}", (Path(tmp) / "case" / f).read_bytes()) for f in files]


SEEDS = fuzz_seed_files() + phantom_seed_files()
# Small limits keep a header that claims a huge image from costing time before it is refused.
LIMITS = IngestLimits(max_study_voxels=20_000_000, max_frame_bytes=16 * 1024 * 1024)
FUZZ = settings(
    derandomize=True,
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def ingest_or_refuse(items: list[tuple[str, bytes]]) -> None:
    """The property: a Study or a CspineError naming an instance, nothing else."""
    try:
        study = ingest(items, LIMITS)
    except CspineError as exc:
        assert str(exc)
        return
    for series in study.series:
        if series.volume is not None:
            assert series.volume.voxels.shape[0] == len(series.volume.slice_offsets)


seed_index = st.integers(min_value=0, max_value=len(SEEDS) - 1)
interesting_byte = st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE, 0x20, 0x5C])


@FUZZ
@given(
    seed_index,
    st.lists(
        st.tuples(st.floats(0, 1, exclude_max=True), interesting_byte | st.integers(0, 255)), min_size=1, max_size=12
    ),
)
def test_flipped_bytes_are_ingested_or_refused(index, flips):
    name, data = SEEDS[index]
    damaged = bytearray(data)
    for where, value in flips:
        damaged[132 + int(where * (len(damaged) - 132))] = value  # past the preamble, where it matters
    ingest_or_refuse([(name, bytes(damaged))])


@FUZZ
@given(seed_index, st.floats(0, 1, exclude_max=True))
def test_truncated_files_are_ingested_or_refused(index, where):
    name, data = SEEDS[index]
    ingest_or_refuse([(name, data[: int(where * len(data))])])


@FUZZ
@given(seed_index, seed_index, st.floats(0, 1), st.floats(0, 1), st.floats(0, 1))
def test_spliced_files_are_ingested_or_refused(first, second, cut, start, end):
    """The head of one file joined to a piece of another (or of itself)."""
    (name, head), (_, tail) = SEEDS[first], SEEDS[second]
    lo, hi = sorted((int(start * len(tail)), int(end * len(tail))))
    ingest_or_refuse([(name, head[: int(cut * len(head))] + tail[lo:hi])])


@FUZZ
@given(seed_index, st.floats(0, 1), st.integers(1, 64), st.sampled_from([b"\x00", b"\xff", b"\xfe\xff\x00\xe0"]))
def test_overwritten_runs_are_ingested_or_refused(index, where, length, filler):
    """A run of zeros, ones or item tags: lengths and tags inside the header go wrong together."""
    name, data = SEEDS[index]
    at = 132 + int(where * (len(data) - 132))
    run = (filler * length)[:length]
    ingest_or_refuse([(name, data[:at] + run + data[at + length :])])


def test_damaged_and_intact_instances_together_are_refused_or_ingested():
    # A whole upload: every seed intact, plus one of them cut short.
    items = list(SEEDS)
    items.append(("cut", SEEDS[0][1][:-20]))
    ingest_or_refuse(items)


def test_the_seed_files_themselves_are_ingested():
    for name, data in SEEDS:
        study = ingest([(name, data)], LIMITS)
        assert any(series.volume is not None for series in study.series), name
