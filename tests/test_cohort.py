"""A site's labelled cohort (docs/cohort.md): ``cspine phantom --labels dicom`` writes SYNTHETIC cases as DICOM
SEG, boxes.json and manifest.csv; ``cspine cohort check`` reads them back voxel for voxel against the phantom's
own label maps, and catches each label defect planted in a copy (unmapped code, frame of reference, spacing,
frames off the slices, empty mask, box outside, missing labels, tumor labels against the class, manifest rows).
Real files from pydicom's test data (a real liver SEG by dcmqi, a real CT slice) meet it beside the phantom."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.pixels import pack_bits
from sqlalchemy import create_engine, text

from cspine import cli
from cspine.analysis.fusion import Calibration
from cspine.cohort.check import check_cohort, format_report, image_files, labelled_study
from cspine.cohort.manifest import MANIFEST_FILE
from cspine.cohort.versions import refit_calibration
from cspine.config import TritonClientConfig
from cspine.domain import Modality
from cspine.errors import CspineError, DuplicateCaseError, TritonUnavailableError
from cspine.fewshot.prototypes import Adaptation, SupportSet, default_support, embedding_key
from cspine.fewshot.store import SupportStore
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts
from cspine.inference.model_config import model_versions, served_set, use_version, version_file
from cspine.inference.runner import onnx_session
from cspine.inference.specs import LESION_EMBED, MODELS, SEG_GEOMETRY, SEG_LABELS
from cspine.modeling.data import model_labels
from cspine.modeling.export import EmbedExport, load_embed_onnx, load_seg_onnx
from cspine.modeling.networks import SegExport
from cspine.service import AnalysisService

REPOSITORY = Path(__file__).resolve().parents[1] / "model_repository"
# Seed 1 of the default site: case-0001 has an osteoid osteoma (benign), case-0002 no tumor.
SEED = 1
TUMOR_CASE, FREE_CASE = "case-0001", "case-0002"


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SYNTHETIC labelled cohort of two cases, written by the CLI."""
    out = tmp_path_factory.mktemp("labelled") / "cohort"
    assert (
        cli.main(["phantom", "--out", str(out), "--cases", "2", "--seed", str(SEED), "--labels", "dicom", "--quiet"])
        == 0
    )
    return out


@pytest.fixture
def cohort(labelled: Path, tmp_path: Path) -> Path:
    """A copy of the labelled cohort a test may damage."""
    copy = tmp_path / "cohort"
    shutil.copytree(labelled, copy)
    return copy


def _problems(folder: Path, severity: str = "error") -> list[tuple[str, str, str]]:
    report = check_cohort(folder)
    out = [("cohort", p.code, p.message) for p in report.problems if p.severity == severity]
    return out + [(s.name, p.code, p.message) for s in report.studies for p in s.problems if p.severity == severity]


def _codes(folder: Path, severity: str = "error") -> set[tuple[str, str]]:
    return {(study, code) for study, code, _ in _problems(folder, severity)}


def test_the_phantom_writes_a_cohort_that_checks_clean_and_reads_back_voxel_for_voxel(labelled: Path, capsys):
    rows = (labelled / MANIFEST_FILE).read_text().splitlines()
    assert rows[0] == "study,class,subtype,level,reference,split,cobb_deg"
    assert rows[1].startswith(f"{TUMOR_CASE},benign,osteoid_osteoma,")
    cobb = json.loads((labelled / FREE_CASE / "truth.json").read_text())["cobb_angle_c2_c7_deg"]
    assert rows[2] == f"{FREE_CASE},none,,,SYNTHETIC phantom truth.json,train,{cobb:.2f}"
    assert sorted(p.name for p in (labelled / TUMOR_CASE / "labels").iterdir()) == [
        "ct.dcm",
        "mr_t1.dcm",
        "mr_t2.dcm",
        "xr.dcm",
    ]
    report = check_cohort(labelled, keep_labels=True)
    assert report.count("error") == 0, format_report(report)
    assert report.class_counts() == {"train": {"benign": 1, "none": 1}}
    dropped = check_cohort(labelled)  # the default: each study's label maps dropped once it is checked
    assert all(lab.labels is None for s in dropped.studies for lab in s.labels)
    again = labelled_study(dropped, dropped.studies[0])
    assert [lab.source for lab in again.labels] == [lab.source for lab in report.studies[0].labels]
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(again.labels, report.studies[0].labels, strict=True))
    for study in report.studies:
        assert len(study.labels) == 4  # CT, MR T1 and T2, the radiograph: every series cspine chooses
        with np.load(labelled / study.name / "labels.npz") as npz:
            for lab in study.labels:
                key = lab.modality.value.lower()
                structure, levels = npz[f"{key}_labels"], npz[f"{key}_levels"]
                if structure.ndim == 2:
                    structure, levels = structure[None], levels[None]
                expected = model_labels(lab.modality, structure, levels)
                assert lab.labels.shape == expected.shape
                assert np.array_equal(lab.labels, expected), f"{study.name} {lab.source}"
                if lab.modality is Modality.XR:
                    assert {"c2_body", "c5_body", "c7_body"} <= set(lab.voxels)
    tumor, free = report.studies
    assert tumor.boxes and not free.boxes
    # each box is tight around tumor voxels of its series: tumor on every face of it
    by_series = {lab.series_instance_uid: lab for lab in tumor.labels}
    for box in tumor.boxes:
        lab = by_series[box.series_instance_uid]
        inside = lab.labels[tuple(slice(a, b + 1) for a, b in zip(box.first, box.last, strict=True))]
        where = np.argwhere(inside == SEG_LABELS[lab.modality].index("tumor"))
        assert where.min(0).tolist() == [0, 0, 0]
        assert where.max(0).tolist() == [b - a for a, b in zip(box.first, box.last, strict=True)]
    assert cli.main(["cohort", "check", str(labelled), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["errors"] == 0 and printed["class_counts"] == {"train": {"benign": 1, "none": 1}}
    assert printed["studies"][0]["series"]["ct"]["voxels"]["tumor"] > 0


def test_every_phantom_seg_passes_dciodvfy(labelled: Path):
    assert shutil.which("dciodvfy"), "dciodvfy (Debian package dicom3tools) must be installed: make sysdeps"
    for path in sorted((labelled / TUMOR_CASE / "labels").glob("*.dcm")):
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        lines = (run.stdout + run.stderr).splitlines()
        assert "Segmentation" in (line.strip() for line in lines), lines[:3]
        assert not [line for line in lines if line.startswith(("Error", "Warning"))], path.name


def _edit_seg(path: Path, edit) -> None:
    ds = pydicom.dcmread(path)
    edit(ds)
    ds.save_as(path, enforce_file_format=True)


def test_an_unknown_segment_code_is_an_error_until_codes_csv_maps_it(cohort: Path, capsys):
    seg = cohort / TUMOR_CASE / "labels" / "ct.dcm"
    before = {lab.source: lab.labels for lab in check_cohort(cohort, keep_labels=True).studies[0].labels}

    def local_code(ds):
        for segment in ds.SegmentSequence:
            if segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "3572006":  # vertebral body
                code = segment.SegmentedPropertyTypeCodeSequence[0]
                code.CodingSchemeDesignator, code.CodeValue, code.CodeMeaning = "99LOCAL", "VB", "Wirbelkoerper"

    _edit_seg(seg, local_code)
    errors = _problems(cohort)
    assert {(s, c) for s, c, _ in errors} == {(TUMOR_CASE, "unmapped_code")}
    assert "(99LOCAL, VB, Wirbelkoerper)" in errors[0][2] and "codes.csv" in errors[0][2]
    assert cli.main(["cohort", "check", str(cohort), "--quiet"]) == 1
    assert "unmapped_code" in capsys.readouterr().out

    (cohort / "codes.csv").write_text("scheme,code,structure,level\n99LOCAL,VB,vertebral_body,\n")
    report = check_cohort(cohort, keep_labels=True)
    assert report.count("error") == 0
    after = {lab.source: lab.labels for lab in report.studies[0].labels}
    assert all(np.array_equal(before[k], after[k]) for k in before)

    (cohort / "codes.csv").write_text("scheme,code,structure\n99LOCAL,VB,vertebra\n")
    assert ("cohort", "codes") in _codes(cohort)


@pytest.mark.parametrize(
    "defect, code, words",
    [
        ("frame_of_reference", "frame_of_reference", "frame of reference"),
        ("spacing", "geometry", "pixel spacing"),
        ("orientation", "geometry", "orientation"),
        ("position", "geometry", "lie on no slice"),
        ("empty", "empty_mask", "no labelled voxel"),
    ],
)
def test_a_seg_that_does_not_fit_its_series_is_an_error(cohort: Path, defect: str, code: str, words: str):
    seg = cohort / TUMOR_CASE / "labels" / "ct.dcm"

    def damage(ds):
        shared = ds.SharedFunctionalGroupsSequence[0]
        if defect == "frame_of_reference":
            ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
        elif defect == "spacing":
            spacing = shared.PixelMeasuresSequence[0].PixelSpacing
            shared.PixelMeasuresSequence[0].PixelSpacing = [float(spacing[0]) * 1.1, float(spacing[1])]
        elif defect == "orientation":
            shared.PlaneOrientationSequence[0].ImageOrientationPatient = [0, 1, 0, 1, 0, 0]
        elif defect == "position":
            plane = ds.PerFrameFunctionalGroupsSequence[3].PlanePositionSequence[0]
            plane.ImagePositionPatient = [float(v) + 5.0 for v in plane.ImagePositionPatient]
        else:  # the tumor segment's frames emptied
            tumor = next(s.SegmentNumber for s in ds.SegmentSequence if s.SegmentLabel == "Tumor")
            frames = ds.pixel_array.copy()
            for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
                if item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == tumor:
                    frames[i] = 0
            ds.PixelData = pack_bits(frames)

    _edit_seg(seg, damage)
    errors = _problems(cohort)
    assert {(s, c) for s, c, _ in errors} == {(TUMOR_CASE, code)}, errors
    assert words in errors[0][2] and "labels/ct.dcm" in errors[0][2]


def test_a_truncated_seg_is_an_error_not_a_crash(cohort: Path):
    seg = cohort / TUMOR_CASE / "labels" / "mr_t1.dcm"
    seg.write_bytes(seg.read_bytes()[:3000])
    errors = _problems(cohort)
    assert [(s, c) for s, c, _ in errors] == [(TUMOR_CASE, "seg_unreadable")]
    assert errors[0][2] == (
        "labels/mr_t1.dcm lacks Rows, Columns, SegmentSequence, PixelData: truncated, or not a whole SEG"
    )


def test_boxes_outside_their_images_and_tumor_labels_against_the_class_are_errors(cohort: Path):
    boxes_path = cohort / TUMOR_CASE / "boxes.json"
    boxes = json.loads(boxes_path.read_text())
    item = next(b for b in boxes["boxes"] if "corners_mm" in b)
    item["corners_mm"][1] = [v + 500.0 for v in item["corners_mm"][1]]
    boxes_path.write_text(json.dumps(boxes))
    errors = _problems(cohort)
    assert {(s, c) for s, c, _ in errors} == {(TUMOR_CASE, "box_outside")}
    assert "1 box(es) reach outside" in errors[0][2]

    # the tumor case without any tumor label: its SEGs and boxes gone
    shutil.rmtree(cohort / TUMOR_CASE / "labels")
    boxes_path.unlink()
    assert _codes(cohort) == {(TUMOR_CASE, "tumor_label")}
    warnings = _problems(cohort, "warning")
    assert sum(c == "missing_labels" and s == TUMOR_CASE for s, c, _ in warnings) == 4  # CT, MR T1, MR T2, XR

    # the tumor-free case called benign in the manifest, the tumor case's labels back, but called none
    manifest = cohort / MANIFEST_FILE
    text = manifest.read_text().replace(f"{FREE_CASE},none,,,", f"{FREE_CASE},benign,,,")
    manifest.write_text(text)
    assert (FREE_CASE, "tumor_label") in _codes(cohort)


def test_manifest_rows_must_match_the_study_folders(cohort: Path):
    manifest = cohort / MANIFEST_FILE
    lines = manifest.read_text().splitlines()
    manifest.write_text(
        "\n".join(
            [
                lines[0],
                lines[1].replace(",benign,", ",maligant,"),
                "case-0099,none,,,x,train",
                f"{FREE_CASE},none,,,x,train,120",  # not a Cobb angle: the row is left out
            ]
        )
        + "\n"
    )
    errors = _problems(cohort)
    codes = {(s, c) for s, c, _ in errors}
    assert codes == {("cohort", "manifest"), (TUMOR_CASE, "manifest"), (FREE_CASE, "manifest")}
    messages = " | ".join(m for _, _, m in errors)
    assert "class 'maligant'" in messages and "'case-0099', which is not a folder" in messages
    assert "not in manifest.csv" in messages and "cobb_deg '120' of 'case-0002' is not an angle" in messages
    (manifest).unlink()
    assert ("cohort", "manifest") in _codes(cohort)


def test_real_files_from_pydicom_data_are_checked_not_trusted(cohort: Path):
    """A real SEG (dcmqi's liver example, pydicom-data) labels a CT the study does not have; a real CT slice
    (pydicom's CT_small.dcm) is ingested and chosen as the service would, and reported as unlabelled."""
    liver = Path(get_testdata_file("liver.dcm"))
    shutil.copy(liver, cohort / TUMOR_CASE / "liver-seg.dcm")
    errors = _problems(cohort)
    assert errors == [(TUMOR_CASE, "seg_source", "liver-seg.dcm labels no image series of the study cspine analyses")]

    real = cohort / "real-ct-slice"
    real.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), real / "CT_small.dcm")
    with (cohort / MANIFEST_FILE).open("a") as f:
        f.write("real-ct-slice,none,,,pydicom test data CT_small.dcm,test\n")
    report = check_cohort(cohort)
    study = next(s for s in report.studies if s.name == "real-ct-slice")
    assert list(study.roles) == ["ct"]
    assert [(p.severity, p.code, p.message) for p in study.problems] == [
        ("warning", "missing_labels", "no structure labels for the CT series")
    ]
    assert report.class_counts() == {"train": {"benign": 1, "none": 1}, "test": {"none": 1}}


# --------------------------------------------------------------------------------------------------------
# Fine-tuning the served segmentation models on a cohort (cspine train --cohort)


@pytest.mark.parametrize("name", ["seg_ct", "seg_mr", "seg_xr"])
def test_a_served_onnx_model_loads_into_pytorch_and_computes_the_same(name: str):
    net, config = load_seg_onnx(REPOSITORY / name / "1" / "model.onnx")
    geometry = SEG_GEOMETRY[Modality(config["modality"])]
    x = np.random.default_rng(0).normal(size=(3, geometry.channels, geometry.size, geometry.size)).astype(np.float32)
    labels, features = onnx_session(REPOSITORY / name / "1" / "model.onnx").run(None, {"image": x})
    with torch.no_grad():
        want_labels, want_features = SegExport(net)(torch.from_numpy(x))
    assert np.array_equal(labels, want_labels.numpy())
    assert np.abs(features - want_features.numpy()).max() < 1e-5


def test_training_on_a_cohort_with_label_errors_stops_and_names_them(cohort: Path, tmp_path: Path, capsys):
    boxes_path = cohort / TUMOR_CASE / "boxes.json"
    boxes = json.loads(boxes_path.read_text())
    boxes["boxes"][0]["series_instance_uid"] = "1.2.3.4"
    boxes_path.write_text(json.dumps(boxes))
    args = ["train", "--cohort", str(cohort), "--models", "seg_ct", "--steps", "2", "--checkpoints", str(tmp_path)]
    assert cli.main([*args, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "1 label error(s)" in err
    assert "its series is not among the study's images" in err
    assert not list(tmp_path.glob("cohort-*/*.pt"))


def test_fine_tuning_on_a_cohort_resumes_keeps_batchnorm_frozen_and_reports_served_and_fine_tuned(
    cohort: Path, tmp_path: Path, capsys
):
    manifest = cohort / MANIFEST_FILE
    manifest.write_text(
        manifest.read_text().replace(
            f"{FREE_CASE},none,,,SYNTHETIC phantom truth.json,train",
            f"{FREE_CASE},none,,,SYNTHETIC phantom truth.json,test",
        )
    )
    args = [
        "train",
        "--cohort",
        str(cohort),
        "--models",
        "seg_ct",
        "--steps",
        "4",
        "--checkpoints",
        str(tmp_path),
        "--quiet",
    ]
    assert cli.main([*args, "--stop-after", "2"]) == 0
    first = capsys.readouterr().out
    assert "1 train studies, 1 held out" in first and "(step 2 of 4, 1 studies)" in first
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "(step 4 of 4, 1 studies)" in out and "served " in out and "fine-tuned " in out
    checkpoint = tmp_path / "cohort-cohort" / "seg_ct.pt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["step"] == 4 and len(state["history"]) == 4
    assert state["config"]["cases"] == [
        p.name for p in (tmp_path / "cohort-cohort" / "cases").glob(f"{TUMOR_CASE}-*.npz")
    ]
    means = [v for k, v in state["modules"]["net"].items() if k.endswith("running_mean")]
    assert means and all(float(m.abs().max()) == 0.0 for m in means)  # BatchNorm stayed frozen
    metrics = json.loads((tmp_path / "cohort-cohort" / "metrics.json").read_text())
    assert metrics["models"]["seg_ct"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    held = metrics["models"]["seg_ct"]["held_out"]
    assert held["served"]["images"] == held["candidate"]["images"] == 1
    for model in ("served", "candidate"):
        assert 0.0 < held[model]["mean_dice"] <= 1.0
        assert held[model]["lesion_dice"] is None  # the held-out study is tumor-free


def test_the_served_lesion_embedding_loads_into_pytorch_and_computes_the_same():
    path = REPOSITORY / "lesion_embed" / "1" / "model.onnx"
    encoder, config = load_embed_onnx(path)
    assert config["widths"] == [32, 64, 96, 128]
    rng = np.random.default_rng(0)
    rois = rng.normal(size=(5, 3, 64, 64)).astype(np.float32)
    onehot = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
    (want,) = onnx_session(path).run(None, {"roi": rois, "modality": onehot})
    with torch.no_grad():
        got = EmbedExport(encoder)(torch.from_numpy(rois), torch.from_numpy(onehot)).numpy()
    assert got.shape == (5, LESION_EMBED.outputs[0].shape[-1]) and np.abs(got - want).max() < 1e-5


# Classes given to the 5 radiograph-only tumor studies of the embedding test (the manifest is rewritten: the
# fine-tuning run needs lesions of two classes in its train split, and the held-out one must have one of them).
EMBED_SPLITS = {
    "case-0001": ("benign", "train"),
    "case-0002": ("malignant", "train"),
    "case-0003": ("benign", "train"),
    "case-0004": ("malignant", "train"),
    "case-0005": ("benign", "test"),
}


@pytest.fixture(scope="module")
def tumor_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 SYNTHETIC radiograph-only tumor studies, their classes and splits rewritten (EMBED_SPLITS)."""
    out = tmp_path_factory.mktemp("tumors") / "tumors"
    args = ["phantom", "--out", str(out), "--cases", "5", "--seed", "3", "--modalities", "xr", "--tumor", "malignant"]
    assert cli.main([*args, "--labels", "dicom", "--quiet"]) == 0
    lines = (out / MANIFEST_FILE).read_text().splitlines()
    rows = [lines[0]]
    for line in lines[1:]:
        cells = line.split(",")
        cells[1], cells[5] = EMBED_SPLITS[cells[0]]
        rows.append(",".join(cells))
    (out / MANIFEST_FILE).write_text("\n".join(rows) + "\n")
    return out


def test_fine_tuning_the_lesion_embedding_on_a_cohort_trains_the_head_keeps_the_trunk_and_reports_few_shot(
    tumor_cohort: Path, tmp_path: Path, capsys
):
    from cspine.cohort.embedding import study_rois

    report = check_cohort(tumor_cohort)
    assert [s.row.tumor_class for s in report.studies if s.row] == [c for c, _ in EMBED_SPLITS.values()]
    # the ROI is cut about the labelled lesion: the tumor label's centre is the ROI's centre
    study = next(s for s in report.studies if s.name == "case-0001")
    rois = study_rois(tumor_cohort / "case-0001", labelled_study(report, study))
    assert np.isnan(rois[0]).all() and np.isnan(rois[1]).all() and np.isfinite(rois[2]).all()
    assert float(np.abs(rois[2, 0]).max()) > 0.0 and not rois[2, 1:].any()  # a radiograph fills the first plane

    args = ["train", "--cohort", str(tumor_cohort), "--models", "lesion_embed", "--checkpoints", str(tmp_path)]
    assert cli.main([*args, "--quiet", "--stop-after", "3"]) == 0
    out = capsys.readouterr().out
    assert "5 train studies" not in out and "4 train studies, 1 held out" in out
    assert "lesion_embed: " in out and "(episode 3 of 300, 4 train lesions)" in out
    assert "held-out accuracy, served -> fine-tuned: XR (1) " in out
    run = tmp_path / "cohort-tumors"
    state = torch.load(run / "lesion_embed.pt", map_location="cpu", weights_only=False)
    assert state["step"] == 3 and len(state["history"]) == 3
    assert state["config"]["lesions"]["XR"] == {"benign": 2, "borderline": 0, "malignant": 2}
    served, _ = load_embed_onnx(REPOSITORY / "lesion_embed" / "1" / "model.onnx")
    tuned = state["modules"]["encoder"]
    for key, value in served.state_dict().items():
        same = torch.equal(value, tuned[key])
        if key.startswith("trunk.") or "running_" in key or key.endswith("num_batches_tracked"):
            assert same, key  # the trunk and every BatchNorm's statistics stay the served ones
    assert not torch.equal(served.state_dict()["project.2.weight"], tuned["project.2.weight"])
    metrics = json.loads((run / "metrics.json").read_text())
    entry = metrics["models"]["lesion_embed"]
    assert entry["held_out_lesions"]["XR"] == {"benign": 1, "borderline": 0, "malignant": 0}
    for model in ("served", "candidate"):
        figures = entry["held_out"][model]["XR"]
        assert figures["queries"] == 1 and figures["classes"] == ["benign", "malignant"]
        assert figures["all"]["accuracy"] in (0.0, 1.0) and 0.0 <= figures["1"]["accuracy"] <= 1.0
        assert "5" not in figures  # 2 train lesions per class: no 5-case draws
    # resumed to the end, the same run goes on from step 3
    assert cli.main([*args, "--quiet", "--stop-after", "5"]) == 0
    assert "(episode 5 of 300" in capsys.readouterr().out
    resumed = torch.load(run / "lesion_embed.pt", map_location="cpu", weights_only=False)
    assert resumed["history"][:3] == state["history"]
    # another model trained later on the same cohort joins the run's figures (export reads them all)
    seg = ["train", "--cohort", str(tumor_cohort), "--models", "seg_xr", "--steps", "2", "--checkpoints", str(tmp_path)]
    assert cli.main([*seg, "--quiet"]) == 0
    assert set(json.loads((run / "metrics.json").read_text())["models"]) == {"lesion_embed", "seg_xr"}


def test_a_cohort_without_lesions_of_two_classes_leaves_the_embedding_out_or_stops_when_it_is_named(
    labelled: Path, tmp_path: Path, capsys
):
    args = ["train", "--cohort", str(labelled), "--models", "lesion_embed", "--checkpoints", str(tmp_path), "--quiet"]
    assert cli.main(args) == 2
    assert "need lesions of at least 2 classes to fine-tune lesion_embed" in capsys.readouterr().err
    # not named (the default models): the run goes on without it, and says why
    from cspine.cohort.training import train_on_cohort

    results = train_on_cohort(
        labelled, [], REPOSITORY, tmp_path, progress=False, embedding=True, embedding_optional=True
    )
    assert results["models"] == {
        "lesion_embed": {
            "skipped": "the cohort's train studies need lesions of at least 2 classes to fine-tune lesion_embed"
        }
    }
    assert not (tmp_path / "cohort-cohort" / "lesion_embed.pt").exists()


# --------------------------------------------------------------------------------------------------------
# Model versions: cspine export --version N --cohort, cspine models use N, served by a real tritonserver


@pytest.fixture(scope="module")
def versioned(labelled: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A copy of the shipped repository with version set 2 exported: seg_ct fine-tuned for 6 steps on the
    SYNTHETIC labelled cohort, the other models copied. Its export's output too."""
    work = tmp_path_factory.mktemp("versioned")
    repository, checkpoints = work / "repository", work / "checkpoints"
    shutil.copytree(REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    train = ["train", "--cohort", str(labelled), "--models", "seg_ct", "--steps", "6", "--quiet"]
    assert cli.main([*train, "--checkpoints", str(checkpoints), "--repository", str(repository)]) == 0
    export = ["export", "--cohort", str(labelled), "--checkpoints", str(checkpoints), "--repository", str(repository)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main([*export, "--version", "2", "--quiet"]) == 0
    return repository, out.getvalue()


def _copy(repository: Path, tmp_path: Path) -> Path:
    """A copy a test may switch between version sets."""
    copy = tmp_path / "repository"
    shutil.copytree(repository, copy)
    return copy


def _ct_image() -> np.ndarray:
    geometry = SEG_GEOMETRY[Modality.CT]
    return np.random.default_rng(3).normal(size=(2, geometry.channels, geometry.size, geometry.size)).astype(np.float32)


def test_an_exported_version_holds_every_model_its_card_and_its_files(versioned, capsys):
    repository, exported = versioned
    assert "serve it with cspine models use 2" in exported
    export = ["export", "--cohort", "unused", "--checkpoints", "unused", "--repository", str(repository)]
    assert cli.main([*export, "--version", "2", "--quiet"]) == 2  # a version is written once
    assert "cannot be written" in capsys.readouterr().err

    v1, v2 = (repository / "seg_ct" / v / "model.onnx" for v in ("1", "2"))
    assert v1.read_bytes() != v2.read_bytes()
    for name in ("seg_mr", "seg_xr", "lesion_embed", "proto_classify"):  # not fine-tuned: copied
        assert (repository / name / "2" / "model.onnx").read_bytes() == (
            repository / name / "1" / "model.onnx"
        ).read_bytes()
        assert (repository / name / "2" / "model.py").exists()
    card = json.loads((repository / "model_card.v2.json").read_text())
    assert card["version"] == 2 and card["base_version"] == 1
    assert card["cohort"] == {
        "name": "cohort",
        "synthetic": True,
        "studies": 2,
        "classes_per_split": {"train": {"benign": 1, "none": 1}},
    }
    assert card["fine_tuned"]["seg_ct"]["steps"] == 6 and card["fine_tuned"]["seg_ct"]["train_studies"] == 2
    assert card["copied_from_base"] == ["seg_mr", "seg_xr", "lesion_embed", "proto_classify"]
    assert card["calibration"] == {  # too few train studies to refit it: version 1's, and the card says why
        "detection": "version 1's: 1 train studies with a tumor and 1 without; a refit needs 5 of each",
        "classification": "version 1's: 1 train studies with a tumor; a refit needs 15 with a lesion embedding",
    }
    assert (repository / "calibration.v2.json").read_bytes() == (repository / "calibration.json").read_bytes()
    assert card["default support set"] == "version 1's, not rebuilt: version 2 copies lesion_embed from it"
    assert all("no reference: fewer than 5 train studies" in card["competence"][m] for m in ("CT", "MR", "XR"))
    assert TUMOR_CASE not in json.dumps(card)  # counts, never which study
    meta = {p.key: p.value for p in onnx.load(str(v2)).metadata_props}
    assert meta["base_version"] == "1" and json.loads(meta["fine_tuned_on"])["studies"] == 2
    assert sorted(p.name for p in repository.glob("*.v2.*")) == [
        "calibration.v2.json",
        "competence.v2.json",
        "competence.v2.npz",
        "model_card.v2.json",
    ]
    # written, not served: version 1 stays served until `cspine models use 2`
    assert served_set(repository) == 1
    assert cli.main(["models", "list", "--repository", str(repository), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["served"] == 1 and [v["version"] for v in listed["versions"]] == [1, 2]
    assert cli.main(["models", "use", "3", "--repository", str(repository)]) == 2
    assert "no version set 3" in capsys.readouterr().err


def test_a_version_s_calibration_is_refitted_on_the_cohort_s_train_studies_through_the_pipeline(
    versioned, labelled: Path, tmp_path: Path
):
    """With the minimum study counts lowered to what the 2-case SYNTHETIC cohort has (1 with a tumor, 1 without)."""
    repository = _copy(versioned[0], tmp_path)
    base = Calibration.load(repository)
    calibration, parts = refit_calibration(
        check_cohort(labelled), repository, 2, 1, progress=False, detection_min=1, classification_min=1
    )
    assert parts["detection"].startswith("refitted: train studies of the SYNTHETIC cohort cohort, version 2; 2 studies")
    assert parts["classification"].startswith("refitted: ")
    assert "the pooling weights of the 1 studies with a tumor and a lesion embedding" in parts["classification"]
    assert calibration.classification_weights != base.classification_weights
    # pooling or one modality, chosen again on the same held-out answers (1 study cannot show a gain: pooling)
    choice = calibration.classification_choice
    assert choice["studies"] == 1 and choice["chosen"] == "pooled" and calibration.classification_order == ()
    assert choice["fitted_on"].endswith(
        "each classified by the prototypes of the others (5 folds; the support rule over the default set, fitted)"
    )
    assert set(choice["alone"]) <= {"CT", "MR", "XR"} and choice["alone"]
    assert f"pooled accuracy {choice['pooled_accuracy']:.3f}" in parts["classification"]
    assert calibration.fitted_on == "train studies of the SYNTHETIC cohort cohort, version 2; 2 studies"
    assert calibration.detection != base.detection and calibration.detection_weights != base.detection_weights
    assert set(calibration.classification_weights) == set(Modality)
    assert all(0.0 <= w <= 5.0 for w in calibration.classification_weights.values())
    # the same counts under the shipped minimums: nothing is refitted, and no Triton is started for it
    calibration, parts = refit_calibration(check_cohort(labelled), repository, 2, 1, progress=False)
    assert calibration == base and all(p.startswith("version 1's") for p in parts.values())


def test_a_running_service_switches_version_sets_and_rolls_back_without_a_restart_or_a_failed_request(
    versioned, labelled: Path, tmp_path: Path, capsys
):
    """One tritonserver process throughout: `cspine models use N` is picked up by the service, which has Triton
    reload the models (a loaded model is replaced without losing availability) while requests keep coming."""
    repository = _copy(versioned[0], tmp_path)
    image = _ct_image()
    want = {
        v: onnx_session(repository / "seg_ct" / str(v) / "model.onnx").run(None, {"image": image})[0] for v in (1, 2)
    }
    assert not np.array_equal(want[1], want[2])
    instances = [(str(p), p.read_bytes()) for p in image_files(labelled / TUMOR_CASE)]

    async def scenario(triton: LocalTriton) -> dict:
        async with TritonClient(triton.grpc_url) as client:
            service = AnalysisService(client, repository)
            seen: dict = {"before": (service.version_set, [m.version for m in service.models])}
            answers: list[int] = []
            errors: list[str] = []
            stop = asyncio.Event()

            async def requests() -> None:
                while not stop.is_set():
                    try:
                        out = await client.infer("seg_ct", {"image": image})
                        answers.append(next(v for v in (1, 2) if np.array_equal(out["labels"], want[v])))
                    except Exception as error:  # noqa: BLE001 - every failure is counted
                        errors.append(repr(error))

            running = asyncio.create_task(requests())
            for version in (2, 1, 2):
                assert cli.main(["models", "use", str(version), "--repository", str(repository)]) == 0
                assert await service.refresh_models()
                assert not await service.refresh_models()  # nothing changed since
                out = await client.infer("seg_ct", {"image": image})
                seen[version] = {
                    "set": service.version_set,
                    "labels": np.array_equal(out["labels"], want[version]),
                    "reported": {m.version.split()[0] for m in (await service.analyze(instances)).models},
                    "competence": service.competence.disclosure.trained_on,
                }
            stop.set()
            await running
            seen["answers"], seen["errors"] = answers, errors
            return seen

    with LocalTriton(repository, TritonPorts.free()) as triton:
        pid = triton.process.pid if triton.process else None
        seen = asyncio.run(scenario(triton))
        assert triton.process is not None and triton.process.pid == pid and triton.restarts == 0
    assert "running cspine serve on it switches" in capsys.readouterr().out
    assert seen["before"] == (1, ["1 (sha256:" + v.split(":", 1)[1] for v in seen["before"][1]])
    for version in (1, 2):
        assert seen[version]["set"] == version and seen[version]["labels"]
        assert seen[version]["reported"] == {str(version)}  # every model of the result, at the set's version
    assert "fine-tuned on the SYNTHETIC labelled cohort" in seen[2]["competence"]  # competence.v2.json
    assert "fine-tuned" not in seen[1]["competence"]
    assert seen["errors"] == [] and {1, 2} <= set(seen["answers"]) and len(seen["answers"]) > 10
    assert [m.version.split()[0] for m in model_versions(repository)] == ["2"] * 5  # the last switch, to 2
    assert version_file(repository, "calibration.json") == repository / "calibration.v2.json"


def test_a_version_set_triton_cannot_load_is_not_switched_to(versioned, tmp_path: Path, caplog):
    """seg_mr's version 2 is broken: Triton loads seg_ct's version 2 before it meets that, so seg_ct is loaded at
    version 1 again, and Triton serves version set 1 whole, as the service reports."""
    repository = _copy(versioned[0], tmp_path)
    (repository / "seg_mr" / "2" / "model.onnx").write_bytes(b"not a model")
    image = _ct_image()
    v1 = onnx_session(repository / "seg_ct" / "1" / "model.onnx").run(None, {"image": image})[0]

    async def scenario(url: str) -> dict:
        async with TritonClient(url) as client:
            service = AnalysisService(client, repository)
            assert cli.main(["models", "use", "2", "--repository", str(repository)]) == 0
            switched = await service.refresh_models()
            again = await service.refresh_models()  # within VERSION_RETRY_S: not tried again
            await client.check_ready()  # every model answers
            return {
                "switched": (switched, again),
                "set": service.version_set,
                "reported": [m.version.split()[0] for m in service.models],
                "ready": await client.ready_versions(),
                "seg_ct_is_v1": np.array_equal((await client.infer("seg_ct", {"image": image}))["labels"], v1),
            }

    with LocalTriton(repository, TritonPorts.free()) as triton:
        seen = asyncio.run(scenario(triton.grpc_url))
    assert seen["switched"] == (False, False) and seen["set"] == 1 and seen["reported"] == ["1"] * 5
    assert {name: seen["ready"][name] for name in MODELS} == {name: {1} for name in MODELS}
    assert seen["seg_ct_is_v1"]
    assert "did not load seg_mr" in caplog.text and "still serving version set 1, trying again in 60 s" in caplog.text
    assert caplog.text.count("did not load seg_mr") == 1


# --------------------------------------------------------------------------------------------------------
# A version set with its own lesion embedding: its own default support set, and the support store's cases per
# embedding


@pytest.fixture(scope="module")
def embedded(tumor_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the shipped repository with version set 2: lesion_embed fine-tuned for 3 episodes on the 4 train
    studies of the SYNTHETIC tumor cohort, the other models copied."""
    work = tmp_path_factory.mktemp("embedded")
    repository, checkpoints = work / "repository", work / "checkpoints"
    shutil.copytree(REPOSITORY, repository, ignore=shutil.ignore_patterns("__pycache__"))
    places = ["--checkpoints", str(checkpoints), "--repository", str(repository), "--quiet"]
    train = ["train", "--cohort", str(tumor_cohort), "--models", "lesion_embed", "--stop-after", "3"]
    assert cli.main([*train, *places]) == 0
    assert cli.main(["export", "--cohort", str(tumor_cohort), "--version", "2", *places]) == 0
    return repository


def test_a_version_with_its_own_lesion_embedding_gets_a_default_support_set_it_embedded(embedded: Path):
    card = json.loads((embedded / "model_card.v2.json").read_text())
    assert card["fine_tuned"]["lesion_embed"]["steps"] == 3
    assert card["fine_tuned"]["lesion_embed"]["train_lesions"]["XR"] == {"benign": 2, "borderline": 0, "malignant": 2}
    assert card["copied_from_base"] == ["seg_ct", "seg_mr", "seg_xr", "proto_classify"]
    v1, v2 = (embedded / "lesion_embed" / v / "model.onnx" for v in ("1", "2"))
    assert v1.read_bytes() != v2.read_bytes()
    meta = {p.key: p.value for p in onnx.load(str(v2)).metadata_props}
    assert meta["base_version"] == "1" and json.loads(meta["fine_tune"])["episodes"] == 300
    load_embed_onnx(v2)  # it can be fine-tuned in turn
    support = SupportSet.load(embedded / "default_support.v2.npz")
    assert card["default support set"].startswith(f"rebuilt: the {len(support.labels)} train studies with a tumor")
    assert "default_support.v2.npz" in card["files"]
    assert set(support.labels) == {"benign", "malignant"} and len(support.labels) <= 4
    assert support.synthetic and support.site  # the site's own cases (SYNTHETIC here), not default ones
    assert support.source.startswith("SYNTHETIC train study of the cohort tumors: its lesion")
    assert np.isnan(support.embeddings[:, :2]).all() and np.isfinite(support.embeddings[:, 2]).all()  # radiographs
    assert np.allclose(np.linalg.norm(support.embeddings[:, 2], axis=1), 1.0, atol=1e-4)  # the embedding's output
    # served: version 1's embedding is the shipped one (key ""), version 2's its own, with its own default set
    repository = embedded.parent / "keyed"
    shutil.copytree(embedded, repository)
    assert embedding_key(repository) == "" and default_support(repository).labels[0] == "benign"
    use_version(repository, 2)
    assert len(embedding_key(repository)) == 16 and default_support(repository).labels == support.labels


def test_a_service_switching_to_a_version_with_its_own_embedding_serves_that_embedding_s_cases_and_back(
    embedded: Path, tumor_cohort: Path, tmp_path: Path
):
    repository = _copy(embedded, tmp_path)
    store = SupportStore(
        f"sqlite:///{tmp_path / 'support.db'}",
        adaptation=Adaptation.of_repository("fitted", repository),
        embedding=embedding_key(repository),
    )
    store.migrate()
    assert store.seed_defaults(default_support(repository)) and store.current_version() == 1
    files = sorted(p for p in (tumor_cohort / "case-0005" / "xr").glob("*.dcm"))
    instances = [(p.name, p.read_bytes()) for p in files]

    async def scenario(url: str) -> dict:
        seen: dict = {}
        async with TritonClient(url) as client:
            service = AnalysisService(client, repository, store=store)
            seen["before"] = service.prototypes
            use_version(repository, 2)
            assert await service.refresh_models()
            seen["v2"] = (service.prototypes, service.version_number, service.synthetic_support_set, store.embedding)
            case, info = await service.add_case(instances, "benign", "biopsy 5", "", False, "dr test")
            seen["added"] = (case, info, service.prototypes, service.synthetic_support_set)
            seen["cases"] = store.list_cases()
            use_version(repository, 1)
            assert await service.refresh_models()
            seen["back"] = (service.prototypes, store.embedding)
            # the same study added while the set switches to 2 again: it is embedded and recorded by one
            # embedding, before the switch (version 1's: a new case) or after it (version 2's: a duplicate)
            use_version(repository, 2)
            seen["race"] = await asyncio.gather(
                service.refresh_models(),
                service.add_case(instances, "benign", "biopsy 5", "", False, "dr test"),
                return_exceptions=True,
            )
        return seen

    with LocalTriton(repository, TritonPorts.free()) as triton:
        seen = asyncio.run(scenario(triton.grpc_url))
    store.close()
    shipped = SupportSet.load()  # version 1's: the shipped SYNTHETIC set
    v2_support = SupportSet.load(repository / "default_support.v2.npz")
    prototypes, number, synthetic, key = seen["v2"]
    assert len(key) == 16 and number == 2 and synthetic  # version 2's own cases, seeded as store version 2
    assert prototypes.labels == tuple(dict.fromkeys(v2_support.labels)) and set(prototypes.prototypes) == {Modality.XR}
    assert [(c.site_cases, c.default_cases) for c in prototypes.composition] == [
        (v2_support.labels.count(label), 0) for label in prototypes.labels
    ]
    case, info, after, synthetic = seen["added"]
    assert info.number == 3 and case.embedding == key and case.in_use and case.modalities == (Modality.XR,)
    benign = prototypes.labels.index("benign")
    assert after.composition[benign].site_cases == prototypes.composition[benign].site_cases + 1
    assert not synthetic  # a case of the site's own is in use
    listed = seen["cases"]
    assert sum(c.in_use for c in listed) == len(v2_support.labels) + 1
    assert sum(not c.in_use and c.embedding == "" for c in listed) == len(shipped.labels)
    back, key = seen["back"]
    assert key == "" and back.labels == seen["before"].labels
    for modality, array in seen["before"].prototypes.items():
        assert np.array_equal(back.prototypes[modality], array)  # version 1's cases alone, as before
    switched, raced = seen["race"]
    assert switched is True
    engine = create_engine(f"sqlite:///{tmp_path / 'support.db'}")
    with engine.connect() as conn:
        vectors = dict(conn.execute(text("SELECT case_id, vector FROM case_embeddings WHERE modality = 'XR'")).all())
    engine.dispose()
    if isinstance(raced, DuplicateCaseError):  # after the switch: version 2's embedding, as the first time
        pass
    else:
        added, _ = raced
        assert added.embedding == "" and vectors[added.id] != vectors[case.id]  # version 1's embedding made it


def test_a_triton_that_loads_every_set_answers_each_pinned_gateway_with_its_own_set(
    embedded: Path, tumor_cohort: Path, tmp_path: Path, capsys
):
    """The Helm chart's layout: Triton's copy of the repository loads every set (`cspine models use all`), each
    gateway's copy names its own set, and its client names that set in every call (CSPINE_TRITON_PIN_VERSIONS).
    Version 2's lesion embedding differs from version 1's, and Triton's default answer would be version 2's."""
    triton_repository = tmp_path / "triton"
    shutil.copytree(embedded, triton_repository)
    assert cli.main(["models", "use", "all", "--repository", str(triton_repository)]) == 0
    assert "every version set (1, 2) is named" in capsys.readouterr().out
    with pytest.raises(CspineError, match="cspine serves one version per model"):
        served_set(triton_repository)  # a Triton-only repository: no gateway serves from it
    gateways = {}
    for version in (1, 2):
        gateways[version] = tmp_path / f"gateway-{version}"
        shutil.copytree(embedded, gateways[version])
        use_version(gateways[version], version)
    files = sorted(p for p in (tumor_cohort / "case-0005" / "xr").glob("*.dcm"))
    instances = [(p.name, p.read_bytes()) for p in files]

    def embedding(analysis) -> np.ndarray:
        return analysis.modality(Modality.XR).lesions[0].embedding

    def probabilities(analysis) -> list[float]:
        return [p.probability for p in analysis.modality(Modality.XR).lesions[0].assessment.probabilities]

    async def scenario(url: str) -> dict:
        seen: dict = {}
        async with TritonClient(url) as unpinned:
            seen["unpinned"] = embedding(await AnalysisService(unpinned, gateways[1]).analyze(instances))
            # set 2 is the highest: unpinned, the lesion_classify ensemble gives what the pinned two calls give
            seen["ensemble"] = probabilities(await AnalysisService(unpinned, gateways[2]).analyze(instances))
        for version, repository in gateways.items():
            async with TritonClient(url, TritonClientConfig(pin_versions=True)) as client:
                service = AnalysisService(client, repository)
                analysis = await service.analyze(instances)
                await client.check_ready()
                client.version_set = 3  # a set this Triton does not have
                with pytest.raises(TritonUnavailableError, match="seg_ct is not ready at version 3"):
                    await client.check_ready()
                seen[version] = (embedding(analysis), {m.version.split()[0] for m in analysis.models})
                seen[f"probabilities {version}"] = probabilities(analysis)
        return seen

    with LocalTriton(triton_repository, TritonPorts.free()) as triton:
        seen = asyncio.run(scenario(triton.grpc_url))
    (v1, reported_1), (v2, reported_2) = seen[1], seen[2]
    assert reported_1 == {"1"} and reported_2 == {"2"}
    assert np.array_equal(v2, seen["unpinned"])  # unpinned, Triton answers with its highest version
    assert not np.allclose(v1, v2, atol=1e-3)  # pinned to 1: version 1's embedding, not the highest
    assert np.allclose(seen["probabilities 2"], seen["ensemble"], atol=1e-6) and len(seen["ensemble"]) >= 2


# --------------------------------------------------------------------------------------------------------
# cspine evaluate models --cohort: the served version set and a candidate through the pipeline


def test_evaluate_models_on_a_cohort_puts_the_candidate_beside_the_served_version(
    versioned, cohort: Path, tmp_path: Path, capsys
):
    """Both SYNTHETIC studies held out here (the candidate was fine-tuned on them: this tests the evaluation, not
    the candidate)."""
    repository = _copy(versioned[0], tmp_path)
    manifest = cohort / MANIFEST_FILE
    manifest.write_text(manifest.read_text().replace(",train,", ",test,"))
    args = ["evaluate", "models", "--cohort", str(cohort), "--repository", str(repository), "--quiet"]
    assert cli.main([*args, "--json", "--out", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert served_set(repository) == 1  # evaluated on a copy: the served set is left alone
    assert result["synthetic"] and result["held_out_studies"] == 2 and result["served"] == 1
    assert set(result["versions"]) == {"1", "2"}
    truth = {
        r["study"]: r["truth"]
        for r in json.loads((tmp_path / "out" / "cohort-versions.json").read_text())["studies"]["1"]
    }
    phantom = {c: json.loads((cohort / c / "truth.json").read_text()) for c in (TUMOR_CASE, FREE_CASE)}
    for case, t in truth.items():
        assert t["cobb_source"] == "manifest" and t["cobb_deg"] == pytest.approx(
            phantom[case]["cobb_angle_c2_c7_deg"], abs=0.005
        )
        assert t["tumor"] == (case == TUMOR_CASE) and t["opll"] == phantom[case]["opll"]["present"]
    for version, m in result["versions"].items():
        assert m["studies"] == 2 and m["assessable"] == 2, version
        for modality in ("CT", "MR", "XR"):
            per = m["modalities"][modality]
            assert per["labelled"] == (4 if modality == "MR" else 2)  # the MR T1 and T2 series are labelled
            assert 1 <= per["assessed"] <= per["labelled"], (version, modality)
            assert 0.8 < per["mean_dice"] <= 1.0, (version, modality, per)
        for modality in ("CT", "MR"):
            per = m["modalities"][modality]
            assert per["lesion_dice_studies"] >= 1 and 0.5 < per["lesion_dice"] <= 1.0, (version, modality)
            assert per["size_studies"] >= 1 and per["size_mae_mm"] == pytest.approx(abs(per["size_bias_mm"]))
        assert m["modalities"]["CT"]["dice"].keys() == {"vertebral_body", "posterior_elements", "disc", "canal"}
        assert m["detection_sensitivity"] == m["detection_specificity"] == 1.0 and m["tumor_studies"] == 1
        assert m["cobb_studies"] == 2 and m["cobb_mae_deg"] < 6.0 and m["cobb_truth"] == {"manifest": 2}
        assert m["opll_studies"] == 2 and m["opll_accuracy"] == 1.0 and m["level_studies"] == 1
    # Version 2 has no competence reference (fewer than 5 train studies): every labelled series is assessed.
    assert all(p["assessed"] == p["labelled"] for p in result["versions"]["2"]["modalities"].values())
    assert result["versions"]["1"]["modalities"]["CT"] != result["versions"]["2"]["modalities"]["CT"]  # fine-tuned
    assert result["versions"]["1"]["modalities"]["MR"] == result["versions"]["2"]["modalities"]["MR"]  # copied
    assert cli.main(args) == 0
    table = capsys.readouterr().out
    assert "SYNTHETIC cohort" in table and "version 1 (served)" in table and "version 2" in table
    assert "CT lesion size error / bias" in table and "Cobb C2–C7 MAE" in table
    assert cli.main([*args, "--candidate", "7"]) == 2
    assert "no version set 7" in capsys.readouterr().err
