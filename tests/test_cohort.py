"""A site's labelled cohort (docs/cohort.md): ``cspine phantom --labels dicom`` writes SYNTHETIC cases as DICOM
SEG, boxes.json and manifest.csv; ``cspine cohort check`` reads them back voxel for voxel against the phantom's
own label maps, and catches each label defect planted in a copy (unmapped code, frame of reference, spacing,
frames off the slices, empty mask, box outside, missing labels, tumor labels against the class, manifest rows).
Real files from pydicom's test data (a real liver SEG by dcmqi, a real CT slice) meet it beside the phantom."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import pack_bits

from cspine import cli
from cspine.cohort.check import check_cohort, format_report
from cspine.cohort.manifest import MANIFEST_FILE
from cspine.domain import Modality
from cspine.inference.specs import SEG_LABELS
from cspine.modeling.data import model_labels

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
    assert rows[0] == "study,class,subtype,level,reference,split"
    assert rows[1].startswith(f"{TUMOR_CASE},benign,osteoid_osteoma,")
    assert rows[2] == f"{FREE_CASE},none,,,SYNTHETIC phantom truth.json,train"
    assert sorted(p.name for p in (labelled / TUMOR_CASE / "labels").iterdir()) == [
        "ct.dcm",
        "mr_t1.dcm",
        "mr_t2.dcm",
        "xr.dcm",
    ]
    report = check_cohort(labelled)
    assert report.count("error") == 0, format_report(report)
    assert report.class_counts() == {"train": {"benign": 1, "none": 1}}
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
    before = {lab.source: lab.labels for lab in check_cohort(cohort).studies[0].labels}

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
    report = check_cohort(cohort)
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
        "\n".join([lines[0], lines[1].replace(",benign,", ",maligant,"), "case-0099,none,,,x,train"]) + "\n"
    )
    errors = _problems(cohort)
    codes = {(s, c) for s, c, _ in errors}
    assert codes == {("cohort", "manifest"), (TUMOR_CASE, "manifest"), (FREE_CASE, "manifest")}
    messages = " | ".join(m for _, _, m in errors)
    assert "class 'maligant'" in messages and "'case-0099', which is not a folder" in messages
    assert "not in manifest.csv" in messages
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
