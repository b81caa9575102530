"""Logs are free of patient data by construction: a SYNTHETIC study whose every patient/study attribute
holds a marker (malformed in each value representation pydicom validates) goes through a real gateway with
SEG and SR requested, and the marker appears in no log record and nowhere on stderr."""

from __future__ import annotations

import io
import json
import logging
import warnings

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import BaseTag

from cspine.gateway.logs import RedactingFilter, configure, redact
from cspine.v1 import analysis_pb2 as pb
from test_gateway import GatewayThread, files_of

MARKER = "QXPHI7"

# keyword -> planted value: well-formed text attributes, then malformed values in IS, DS, DA, TM and AS.
PLANTED = {
    "PatientName": f"{MARKER}^Name",
    "PatientID": f"{MARKER}-ID",
    "OtherPatientIDs": [f"{MARKER}-OTHER"],
    "AccessionNumber": f"{MARKER}ACC",
    "StudyDescription": f"{MARKER} study",
    "SeriesDescription": f"{MARKER} series",
    "InstitutionName": f"{MARKER} hospital",
    "InstitutionAddress": f"{MARKER} street",
    "ReferringPhysicianName": f"{MARKER}^Ref",
    "PerformingPhysicianName": f"{MARKER}^Perf",
    "OperatorsName": f"{MARKER}^Op",
    "StudyID": f"{MARKER[:6]}",
    "PatientComments": f"{MARKER} comment",
    "PatientBirthDate": f"03.02.1901{MARKER}",  # DA, malformed (the value with the marker)
    "StudyDate": f"{MARKER}",  # DA, malformed
    "StudyTime": f"{MARKER}",  # TM, malformed
    "PatientAge": f"{MARKER}",  # AS, malformed
    "PatientWeight": f"{MARKER}",  # DS, malformed
    "PatientSize": f"1.7{MARKER}",  # DS, malformed
    "AcquisitionNumber": f"{MARKER}",  # IS, malformed
    "StageNumber": f"1{MARKER}",  # IS, malformed
}


def planted(path) -> bytes:
    """The file at ``path`` with every attribute of PLANTED set as raw bytes, so pydicom neither checks nor
    converts them here: the gateway is the first to parse them."""
    ds = pydicom.dcmread(path)
    for keyword, value in PLANTED.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        raw = "\\".join(value if isinstance(value, list) else [value]).encode()
        raw += b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(BaseTag(tag), pydicom.datadict.dictionary_VR(tag), len(raw), raw, 0, False, True)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def test_redact_removes_quoted_values_and_keeps_the_rest():
    message = "Invalid value for VR IS: 'QXPHI7'. Please see <https://x> for allowed values"
    assert "QXPHI7" not in redact(message) and redact(message).startswith("Invalid value for VR IS: ")
    assert "QXPHI7" not in redact('The value "03.02.1901QXPHI7" is invalid')
    assert redact("selected 2 of 3 series: ct, mr") == "selected 2 of 3 series: ct, mr"


@pytest.fixture(scope="module")
def planted_study(phantom_cases):
    return [planted(p) for p in files_of(phantom_cases["malignant"])]


def test_no_log_record_or_stderr_line_holds_a_planted_value(triton, planted_study, capfd):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    gateway = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # every warning reaches stderr or the log, none is deduplicated away
            configure("DEBUG", stream)  # what `cspine serve` does: JSON lines, warnings captured, all redacted
            gateway = GatewayThread(triton.grpc_url)
            options = pb.AnalysisOptions(return_dicom_seg=True, return_dicom_sr=True)
            messages = [pb.StudyUpload(options=options)] + [pb.StudyUpload(dicom_instance=d) for d in planted_study]
            result = gateway.stub.AnalyzeStudy(iter(messages), timeout=180)
            gateway.close()
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    logs = stream.getvalue()
    captured = capfd.readouterr()
    assert all(json.loads(line)["message"] for line in logs.splitlines())  # every line is JSON: nothing raw
    # The study is answered; a SEG or SR highdicom refuses to build from malformed headers is a notice.
    assert [m.modality for m in result.modalities] == [pb.CT, pb.MR, pb.XR]
    for output in (result.dicom_seg, result.dicom_sr):
        assert output[128:132] == b"DICM" or "output_unavailable" in [n.code for n in result.notices]
    assert logs.count("\n") > 5  # the gateway did log, at DEBUG, while the study went through
    assert MARKER.encode() in planted_study[0]
    assert MARKER not in logs
    assert MARKER not in captured.err and MARKER not in captured.out


def test_the_redacting_filter_is_installed_on_the_gateway_handler():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        handler = configure("INFO", io.StringIO())
        assert any(isinstance(f, RedactingFilter) for f in handler.filters)
    finally:
        logging.captureWarnings(False)
        root.handlers[:], level = saved
        root.setLevel(level)


def test_pydicom_complaints_reach_the_log_redacted_and_never_stderr_raw(capfd):
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            configure("DEBUG", stream)
            for vr, value in (("DA", f"03.02.1901{MARKER}"), ("IS", f"1{MARKER}"), ("DS", MARKER), ("TM", MARKER)):
                pydicom.valuerep.validate_value(vr, value, pydicom.config.WARN)  # how pydicom reads a bad value
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {"pydicom", "py.warnings"} <= {e["logger"] for e in entries}
    assert any("Invalid value for VR DA: '<redacted>'" in e["message"] for e in entries)
    captured = capfd.readouterr()
    assert MARKER not in stream.getvalue() and MARKER not in captured.err + captured.out


def test_a_logged_traceback_keeps_its_frames_and_redacts_the_values():
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure("INFO", stream)
        try:
            try:
                raise ValueError(f"Unable to convert '03.02.1901{MARKER}' to 'DA' object")
            except ValueError as inner:
                raise RuntimeError(f"while reading {inner!s}") from inner
        except RuntimeError:
            logging.getLogger("cspine.test").exception("AnalyzeStudy failed")
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (entry,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert MARKER not in stream.getvalue()
    assert (
        "test_logs_phi.py" in entry["exception"] and "ValueError: Unable to convert '<redacted>'" in entry["exception"]
    )
    assert "RuntimeError: while reading Unable to convert '<redacted>'" in entry["exception"]
