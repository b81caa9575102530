"""The inspect report: studies grouped by StudyInstanceUID, series with shape and spacing, the selection,
refused and skipped files — stable keys, JSON-serialisable, and no patient identity anywhere."""

from __future__ import annotations

import json

import pytest

from cspine.dicom.inspect import format_inspect, inspect_paths
from support import dicom as b

STUDY_KEYS = {"study_instance_uid", "files", "error", "series", "selection", "notices"}
SERIES_KEYS = {
    "series_instance_uid",
    "series_number",
    "dicom_modality",
    "modality",
    "description",
    "instances",
    "shape",
    "spacing_mm",
    "orientation",
    "slice_thickness",
    "notices",
}


def write(folder, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files:
        (folder / name).write_bytes(data)


@pytest.fixture
def two_studies(tmp_path):
    ct = b.ct_series(5, spacing=2.0, series_number=2)
    mr = b.mr_series(4, series_number=3, study_uid=ct.study_uid)
    other = b.ct_series(offsets=[0, 2.5, 5, 12.5], series_number=6, description="OTHER STUDY")
    write(tmp_path / "a" / "ct", ct.files)
    write(tmp_path / "a" / "mr", mr.files)
    write(tmp_path / "b", other.files)
    (tmp_path / "README").write_text("exported by some viewer")
    (tmp_path / "DICOMDIR").write_bytes(b.dicomdir_bytes())
    return tmp_path, ct, mr, other


def test_inspect_reports_each_study_with_its_series_and_selection(two_studies):
    folder, ct, mr, other = two_studies
    report = inspect_paths([folder])
    assert set(report) == {"files", "studies", "refused", "skipped"}
    assert report["files"] == 5 + 4 + 4 + 2
    assert [s["study_instance_uid"] for s in report["studies"]] == sorted([ct.study_uid, other.study_uid])
    study = next(s for s in report["studies"] if s["study_instance_uid"] == ct.study_uid)
    assert set(study) == STUDY_KEYS
    assert study["files"] == 9 and study["error"] is None
    ct_entry, mr_entry = study["series"]
    assert set(ct_entry) == SERIES_KEYS
    assert ct_entry == {
        "series_instance_uid": ct.series_uid,
        "series_number": 2,
        "dicom_modality": "CT",
        "modality": "CT",
        "description": "AX CT BONE",
        "instances": 5,
        "shape": [5, 16, 12],
        "spacing_mm": [2.0, 0.7, 0.8],
        "orientation": "axial",
        "slice_thickness": 2.0,
        "notices": [],
    }
    assert mr_entry["modality"] == "MR" and mr_entry["orientation"] == "sagittal" and mr_entry["shape"] == [4, 14, 18]
    assert study["selection"] == {"ct": ct.series_uid, "mr_t1": None, "mr_t2": mr.series_uid, "xr": None}
    assert [n["code"] for n in study["notices"]] == ["missing_modality", "missing_modality"]


def test_inspect_lists_refused_and_skipped_files(two_studies):
    folder, *_ = two_studies
    report = inspect_paths([folder])
    assert report["refused"] == [
        {
            "file": str(folder / "README"),
            "error_type": "NotDicomError",
            "error": f"instance {folder / 'README'}: not a DICOM Part-10 file (no 'DICM' prefix after the preamble)",
        }
    ]
    assert report["skipped"] == [
        {
            "file": str(folder / "DICOMDIR"),
            "code": "not_an_image",
            "message": f"{folder / 'DICOMDIR'} is a DICOMDIR (a file index); skipped",
        }
    ]


def test_inspect_shows_notices_per_series(two_studies):
    folder, _, _, other = two_studies
    report = inspect_paths([folder / "b"])
    (study,) = report["studies"]
    (series,) = study["series"]
    assert [n["code"] for n in series["notices"]] == ["missing_slices"]
    assert "2 slice(s) missing" in series["notices"][0]["message"]


def test_a_study_that_cannot_be_ingested_reports_the_error(tmp_path):
    built = b.ct_series(3)
    odd = b.ct_series(1, rows=20, study_uid=built.study_uid, series_uid=built.series_uid, offsets=[9.0])
    write(tmp_path, built.files + [("odd.dcm", odd.files[0][1])])
    (study,) = inspect_paths([tmp_path])["studies"]
    assert study["series"] == [] and study["files"] == 4
    assert study["error"].startswith("InconsistentSeriesError: instance ")
    assert "odd.dcm: 20×12 pixels differ" in study["error"]


def test_a_missing_path_is_refused_not_raised(tmp_path):
    report = inspect_paths([tmp_path / "nowhere"])
    assert report["files"] == 0 and report["studies"] == []
    assert report["refused"][0]["error_type"] == "InvalidInputError"


def test_the_report_is_json_and_names_no_patient(two_studies):
    folder, *_ = two_studies
    report = inspect_paths([folder])
    text = json.dumps(report) + format_inspect(report)
    for value in (b.PATIENT_NAME, "Doe", b.PATIENT_ID, b.PATIENT_BIRTH_DATE):
        assert value not in text
    assert json.loads(json.dumps(report)) == report


def test_format_inspect_prints_a_table_per_study(two_studies):
    folder, ct, *_ = two_studies
    text = format_inspect(inspect_paths([folder]))
    lines = text.splitlines()
    assert lines[0] == "15 file(s): 2 study(ies), 1 refused, 1 skipped"
    assert f"Study {ct.study_uid} (9 file(s))" in lines
    row = next(line for line in lines if "AX CT BONE" in line)
    assert row.split()[:7] == ["2", "CT", "CT", "axial", "5×16×12", "2.00×0.70×0.80", "2.00"]
    assert "  selection: ct ← series 2; mr_t1 ← none; mr_t2 ← series 3; xr ← none" in lines
    assert any(line.startswith("    [missing_modality] no usable") for line in lines)
    assert "Refused:" in lines and "Skipped:" in lines
