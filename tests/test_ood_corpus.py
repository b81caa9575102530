"""The out-of-domain corpora (evaluation/ood_corpus.py): the REAL files are found in the installed packages and
ingest as the service would ingest them; the SYNTHETIC studies are labelled SYNTHETIC, hold no spine where
they should not, and are reproducible from their seed."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cspine.dicom.ingest import ingest
from cspine.dicom.selection import select_series
from cspine.domain import NoticeCode, ReasonCode, SeriesRole
from cspine.evaluation import ood_corpus
from cspine.evaluation.ood_corpus import (
    LABELS_FILE,
    TRUTH_FILE,
    CorpusPackageMissingError,
    real_ood_studies,
    synthetic_ood_studies,
)
from cspine.phantom.anatomy import Label
from cspine.phantom.writer import SYNTHETIC_NOTE

pytestmark = pytest.mark.filterwarnings("ignore")  # pydicom warns about several of the real files

# name: (DICOM modality, volume shape or None, role selection fills or None) of each series as ingest and
# selection see it: the real headers decide all of it.
REAL = {
    "ct-head-skull-base-slice": ([("CT", (1, 512, 512))], "ct"),
    "ct-head-vertex-slice": ([("CT", (1, 512, 512))], "ct"),
    "ct-neck-slice": ([("CT", (1, 512, 512))], "ct"),
    "ct-thoracic-spine-slice": ([("CT", (1, 128, 128))], "ct"),
    "ct-abdomen-slice": ([("CT", (1, 512, 512))], "ct"),
    "ct-head-thumbnails": ([("CT", (4, 16, 16))], "ct"),
    "ct-brain-perfusion-map": ([("CT", (2, 512, 512))], "ct"),
    "mr-head-enhanced": ([("MR", None)], None),
    "mr-shoulder-slice": ([("MR", (1, 1024, 1024))], None),
    "mr-abdomen-mpr": ([("MR", (1, 300, 484))], None),
    "cr-chest-pa": ([("CR", None)], None),
    "cr-leg-ap": ([("CR", None)], None),
    "cr-cspine-thumbnails": ([("CR", (1, 16, 16))] * 3, "xr"),
    "dx-cat-thorax": ([("DX", (1, 2614, 3072))], None),
    "dx-cat-thorax-as-lateral": ([("DX", (1, 2614, 3072))], "xr"),
    "sc-ct-brain-drawing": ([("CT", None)], None),
    "us-lymph-node": ([("US", None)], None),
    "nm-bone-scan": ([("NM", None)], None),
}
FILES = {"ct-head-thumbnails": 4, "cr-cspine-thumbnails": 3, "sc-ct-brain-drawing": 2}


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ood_corpus.CorpusStudy]:
    return {s.name: s for s in real_ood_studies(tmp_path_factory.mktemp("real-ood"))}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("synthetic-ood")


@pytest.fixture(scope="module")
def synthetic(synthetic_root: Path) -> dict[str, ood_corpus.CorpusStudy]:
    return {s.name: s for s in synthetic_ood_studies(synthetic_root, seed=5)}


def _ingest(files) -> object:
    """As the service does: Part-10 bytes, labelled, in one upload."""
    return ingest((f"{i}:{p.name}", p.read_bytes()) for i, p in enumerate(files))


def test_every_real_study_is_found_with_its_source(real):
    assert list(real) == list(REAL)
    versions = {d: importlib.metadata.version(d) for d in ("pydicom", "pydicom-data", "deid-data")}
    for name, study in real.items():
        assert len(study.files) == FILES.get(name, 1), name
        assert all(p.is_file() for p in study.files), name
        package = study.source.split(":")[0]
        assert package in {f"{d}=={v}" for d, v in versions.items()}, study.source
        assert ReasonCode(study.expected) in ReasonCode, name
        assert study.description
    assert (
        real["ct-brain-perfusion-map"].source
        == f"pydicom-data=={versions['pydicom-data']}: data_store/data/eCT_Supplemental.dcm"
    )
    assert real["dx-cat-thorax"].source == f"deid-data=={versions['deid-data']}: deid_data/data/animals/cat.dcm"


@pytest.mark.parametrize("name", list(REAL))
def test_real_study_ingests_as_the_service_would(real, name):
    study = _ingest(real[name].files)
    series, role = REAL[name]
    got = sorted((s.dicom_modality, s.volume.shape if s.volume is not None else None) for s in study.series)
    assert got == sorted(series)
    assert not [n for n in study.notices if n.code is NoticeCode.NOT_AN_IMAGE]
    chosen = select_series(study).chosen
    assert [r.value for r in chosen] == ([role] if role else [])


def test_real_headers_say_what_the_table_says(real):
    perfusion = pydicom.dcmread(real["ct-brain-perfusion-map"].files[0], stop_before_pixels=True)
    assert list(perfusion.ImageType)[:4] == ["DERIVED", "PRIMARY", "PERFUSION", "RCBF"]
    assert int(perfusion.NumberOfFrames) == 2
    neck = pydicom.dcmread(real["ct-neck-slice"].files[0], stop_before_pixels=True)
    assert (neck.Modality, neck.BodyPartExamined) == ("CT", "NECK")
    head = pydicom.dcmread(real["ct-head-skull-base-slice"].files[0], stop_before_pixels=True)
    assert head.BodyPartExamined == "HEAD"
    lateral = pydicom.dcmread(real["cr-cspine-thumbnails"].files[0], stop_before_pixels=True)
    assert (lateral.BodyPartExamined, lateral.ViewPosition, lateral.Rows) == ("CSPINE", "LL", 16)


def test_the_relabelled_cat_keeps_its_pixels(real):
    original = pydicom.dcmread(real["dx-cat-thorax"].files[0])
    copy = pydicom.dcmread(real["dx-cat-thorax-as-lateral"].files[0])
    assert real["dx-cat-thorax-as-lateral"].files[0] != real["dx-cat-thorax"].files[0]
    assert original.ViewPosition == "AP" and copy.ViewPosition == "LL"
    assert list(copy.PatientOrientation) == ["F", "A"]
    assert copy.PixelData == original.PixelData
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert getattr(copy, keyword) != getattr(original, keyword)
    assert copy.file_meta.MediaStorageSOPInstanceUID == copy.SOPInstanceUID
    assert copy.SeriesDescription == original.SeriesDescription == "Thorax LAT"


def test_a_missing_package_is_named(tmp_path, monkeypatch):
    version = importlib.metadata.version

    def without_deid_data(name: str) -> str:
        if name == "deid-data":
            raise importlib.metadata.PackageNotFoundError(name)
        return version(name)

    monkeypatch.setattr(importlib.metadata, "version", without_deid_data)
    with pytest.raises(CorpusPackageMissingError, match="deid-data"):
        real_ood_studies(tmp_path)


# --------------------------------------------------------------------------------------------------------
# SYNTHETIC


def test_synthetic_studies_are_labelled_synthetic(synthetic):
    assert list(synthetic) == ["synthetic-neck-without-spine", "synthetic-head-ct", "synthetic-cspine-few-slices"]
    for study in synthetic.values():
        assert study.source.startswith("SYNTHETIC") and study.description.startswith("SYNTHETIC")
        for path in study.files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            assert str(ds.PatientName).startswith("SYNTHETIC^OOD-"), path
            assert ds.SeriesDescription.startswith("SYNTHETIC") and "OOD test" in ds.SeriesDescription
            assert ds.ImageComments == SYNTHETIC_NOTE
        truth = json.loads((study.files[0].parent.parent / TRUTH_FILE).read_text())
        assert truth["synthetic"] is True and truth["expected_reason"] == study.expected


@pytest.mark.parametrize("name", ["synthetic-neck-without-spine", "synthetic-head-ct"])
def test_studies_without_a_spine_have_no_spine_in_their_truth(synthetic, name):
    folder = synthetic[name].files[0].parent.parent
    truth = json.loads((folder / TRUTH_FILE).read_text())
    with np.load(folder / LABELS_FILE) as npz:
        labels = {k: npz[k] for k in npz.files}
    assert set(labels) == ({"ct_labels", "mr_labels", "xr_labels"} if "neck" in name else {"ct_labels"})
    for array in labels.values():
        assert set(np.unique(array)) == {Label.BACKGROUND, Label.SOFT_TISSUE}
    for series in truth["series"].values():
        assert series["labels_present"] == ["background", "soft_tissue"]
    expected = ReasonCode.NO_VERTEBRAL_COLUMN if "neck" in name else ReasonCode.NO_CANAL  # see ood_corpus._SYNTHETIC
    assert synthetic[name].expected == expected.value


def test_the_neck_without_spine_fills_every_role(synthetic):
    """Every role is filled with a usable series, so only the images can tell there is no spine."""
    study = _ingest(synthetic["synthetic-neck-without-spine"].files)
    chosen = select_series(study).chosen
    assert set(chosen) == {SeriesRole.CT, SeriesRole.MR_T1, SeriesRole.MR_T2, SeriesRole.XR}
    ct = chosen[SeriesRole.CT].volume
    assert ct.shape[0] >= 40 and ct.shape[0] * ct.spacing[0] > 100.0
    air = float((ct.voxels < -900).mean())
    assert 0.2 < air < 0.9  # a neck in air, no bone anywhere
    assert float(ct.voxels.max()) < 400.0


def test_the_head_ct_is_a_full_volume_with_a_skull(synthetic):
    study = _ingest(synthetic["synthetic-head-ct"].files)
    ct = select_series(study).chosen[SeriesRole.CT].volume
    assert ct.shape[0] >= 40 and ct.shape[0] * ct.spacing[0] > 100.0
    bone = float((ct.voxels > 700).mean())
    soft = ct.voxels[(ct.voxels > -50) & (ct.voxels < 200)]
    assert 0.005 < bone < 0.2  # the skull's shell
    assert soft.size > 0.15 * ct.voxels.size and 25.0 < float(np.median(soft)) < 45.0  # brain-like, ~35 HU


def test_the_few_slice_ct_is_a_cervical_spine_of_one_to_three_slices(synthetic):
    study = _ingest(synthetic["synthetic-cspine-few-slices"].files)
    ct = select_series(study).chosen[SeriesRole.CT].volume
    assert 1 <= ct.shape[0] <= 3 and len(synthetic["synthetic-cspine-few-slices"].files) == ct.shape[0]
    folder = synthetic["synthetic-cspine-few-slices"].files[0].parent.parent
    with np.load(folder / LABELS_FILE) as npz:
        present = set(np.unique(npz["ct_labels"]))
    assert Label.VERTEBRAL_BODY in present and Label.CSF in present  # a real cut through C4, just too thin
    assert float(ct.voxels.max()) > 700.0


def test_the_same_seed_writes_the_same_studies(synthetic, synthetic_root, tmp_path):
    again = synthetic_ood_studies(tmp_path, seed=5)
    for study in again:
        first = synthetic[study.name]
        assert [p.relative_to(synthetic_root) for p in first.files] == [p.relative_to(tmp_path) for p in study.files]
        assert all(a.read_bytes() == b.read_bytes() for a, b in zip(first.files, study.files, strict=True))
