"""Logs are free of patient data by construction: a SYNTHETIC study whose every patient and study attribute
holds a marker, malformed for its value representation (tests/support/dicom.py), goes through a real
`cspine serve` with SEG and SR requested; the study is answered with both objects, the malformed values left
out of them, and the marker appears in no log line and nowhere on the server's stderr. Every other command logs
through the same redaction, and the redaction holds whatever the quoting of the value."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings

import grpc
import pydicom
import pytest

from cspine import cli
from cspine.commands import inspect as inspect_command
from cspine.gateway.logs import RedactingFilter, configure, redact
from cspine.gateway.tokens import Role, find_client_token
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from support.dicom import MALFORMED_PATIENT_STUDY, with_malformed_patient_study
from support.dicom import PHI_MARKER as MARKER
from support.server import channel_to, files_of, free_port

# The attributes of the Patient and General Study modules highdicom parses: the notices must name them.
PARSED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate")


def planted(path) -> bytes:
    """The file at ``path`` with every patient and study attribute malformed and marked (raw bytes, so the
    gateway is the first to parse them)."""
    ds = pydicom.dcmread(path)
    with_malformed_patient_study(ds)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


@pytest.fixture(scope="module")
def planted_study(phantom_cases):
    return [planted(p) for p in files_of(phantom_cases["malignant"])]


@pytest.fixture
def log_to():
    """``configure`` the process's logging into a stream, as a cspine command does; restored afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    stream = io.StringIO()

    def install(level: str = "DEBUG", json_lines: bool = True) -> io.StringIO:
        configure(level, stream, json_lines=json_lines)
        return stream

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")  # every warning reaches the log, none is deduplicated away
            yield install
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


# --------------------------------------------------------------------------------------------------------
# The redaction


@pytest.mark.parametrize(
    "message",
    [
        f"Invalid value for VR IS: '{MARKER}'. Please see <https://x> for allowed values",
        f'The value "03.02.1901{MARKER}" is invalid',
        f"(0010,0010) Patient's Name                      PN: 'O{MARKER}^Brien'",  # a quote before the value
        f"Unable to convert 'O'{MARKER}' to 'DA' object",  # a quote inside the value
        f"""Invalid value for VR LO: "it's {MARKER} \\"x\\"".""",  # both quotes inside
        f"Unable to convert 'line one\n{MARKER} line two' to 'TM' object",  # a line break inside
        f"Invalid value for VR OB: b'\\x00{MARKER}'",  # bytes
        f'value of argument "patient_name" is potentially invalid: "{MARKER}"',  # highdicom's wording
    ],
)
def test_redact_removes_a_quoted_value_whatever_its_quoting(message):
    assert MARKER not in redact(message) and "'<redacted>'" in redact(message)


def test_redact_keeps_the_text_before_the_first_quote_and_text_without_quotes():
    assert redact(f"Invalid value for VR IS: '{MARKER}'. See <x>").startswith("Invalid value for VR IS: '<redacted>'")
    assert redact("selected 2 of 3 series: ct, mr") == "selected 2 of 3 series: ct, mr"
    assert redact("DICOM SEG written without the source's PatientName") == (
        "DICOM SEG written without the source's PatientName"
    )


def test_pydicom_complaints_reach_the_log_redacted_and_never_stderr_raw(log_to, capfd):
    stream = log_to("DEBUG")
    for vr, value in (("DA", f"03.02.1901{MARKER}"), ("IS", f"1{MARKER}"), ("DS", MARKER), ("TM", MARKER)):
        pydicom.valuerep.validate_value(vr, value, pydicom.config.WARN)  # how pydicom reads a bad value
    entries = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {"pydicom", "py.warnings"} <= {e["logger"] for e in entries}
    assert any("Invalid value for VR DA: '<redacted>'" in e["message"] for e in entries)
    captured = capfd.readouterr()
    assert MARKER not in stream.getvalue() and MARKER not in captured.err + captured.out


def test_a_logged_traceback_keeps_its_frames_and_redacts_the_values(log_to):
    stream = log_to("INFO")
    try:
        try:
            raise ValueError(f"Unable to convert '03.02.1901{MARKER}' to 'DA' object")
        except ValueError as inner:
            raise RuntimeError(f"while reading {inner!s}") from inner
    except RuntimeError:
        logging.getLogger("cspine.test").exception("AnalyzeStudy failed")
    (entry,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert MARKER not in stream.getvalue()
    assert "test_logs_phi.py" in entry["exception"]  # the frames are kept
    assert "ValueError: Unable to convert '<redacted>'" in entry["exception"]
    assert "RuntimeError: while reading Unable to convert '<redacted>'" in entry["exception"]


def test_a_log_call_whose_arguments_do_not_fit_writes_no_argument_anywhere(log_to, capfd):
    stream = log_to("INFO")
    logging.getLogger("cspine.test").info("%d instances", f"{MARKER}^Name")  # logging would print it on stderr
    (entry,) = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert entry["message"].startswith("%d instances (a log call whose arguments do not fit")
    captured = capfd.readouterr()
    assert MARKER not in stream.getvalue() + captured.err + captured.out


def test_the_redacting_filter_is_installed_on_the_gateway_handler(log_to):
    log_to("INFO")
    (handler,) = logging.getLogger().handlers
    assert any(isinstance(f, RedactingFilter) for f in handler.filters)


# --------------------------------------------------------------------------------------------------------
# Every command


def test_every_command_logs_through_the_redaction_with_warnings_captured(monkeypatch, capfd):
    """``main`` installs the redacting handler and the warnings capture before any command runs."""

    def probe(args, **_) -> int:
        warnings.warn(f"Invalid value for VR DA: '03.02.1901{MARKER}'", UserWarning, stacklevel=1)
        logging.getLogger("pydicom").warning("(0010,0010) Patient's Name PN: 'O'%s^Brien'", MARKER)
        logging.getLogger("cspine.probe").info("the probe ran")
        return 0

    monkeypatch.setattr(inspect_command, "cmd_inspect", probe)  # registered when main() builds the parser
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = []  # as in a fresh `cspine` process: nobody configured logging yet
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            assert cli.main(["--log-level", "INFO", "inspect", "nothing"]) == 0
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    err = capfd.readouterr().err
    assert "cspine.probe: the probe ran" in err  # plain lines on stderr
    assert "py.warnings: " in err and "UserWarning: Invalid value for VR DA: '<redacted>'" in err
    assert "pydicom: (0010,0010) Patient'<redacted>'" in err  # from the first quote to the last
    assert MARKER not in err


def test_cspine_inspect_of_the_malformed_study_writes_no_value_on_stderr(planted_study, tmp_path):
    for number, data in enumerate(planted_study):
        (tmp_path / f"{number:04d}.dcm").write_bytes(data)
    run = subprocess.run(
        [sys.executable, "-m", "cspine", "--log-level", "DEBUG", "inspect", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "cspine.dicom.ingest: ingested a study" in run.stderr  # it logged, at DEBUG
    assert MARKER not in run.stderr


# --------------------------------------------------------------------------------------------------------
# The server


def test_cspine_serve_answers_the_malformed_study_with_seg_and_sr_and_logs_no_value(triton, planted_study, tmp_path):
    port = free_port()
    env = {**os.environ, "CSPINE_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "cspine", "--log-level", "DEBUG", "serve", "--triton-url", triton.grpc_url]
    process = subprocess.Popen(
        [*command, "--port", str(port), "--metrics-port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(plain).result(timeout=120)
        plain.close()
        channel = channel_to(f"127.0.0.1:{port}", find_client_token(tmp_path, Role.ANALYST))
        options = pb.AnalysisOptions(return_dicom_seg=True, return_dicom_sr=True)
        messages = [pb.StudyUpload(options=options)] + [pb.StudyUpload(dicom_instance=d) for d in planted_study]
        result = pb_grpc.SpineAnalysisStub(channel).AnalyzeStudy(iter(messages), timeout=180)
        channel.close()
    finally:
        process.terminate()
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    out, err = out.decode(), err.decode()

    # Answered, with both objects: the malformed values are left out of them, named by keyword in a notice.
    assert [m.modality for m in result.modalities] == [pb.CT, pb.MR, pb.XR]
    codes = [n.code for n in result.notices]
    assert "output_unavailable" not in codes and codes.count("output_value_omitted") == 2
    for output in (result.dicom_seg, result.dicom_sr):
        assert output[128:132] == b"DICM" and MARKER.encode() not in output
    for notice in (n for n in result.notices if n.code == "output_value_omitted"):
        assert all(keyword in notice.message for keyword in PARSED) and MARKER not in notice.message
    seg = pydicom.dcmread(io.BytesIO(result.dicom_seg))
    assert all(keyword not in seg or seg[keyword].is_empty for keyword in MALFORMED_PATIENT_STUDY)

    # The server's stderr is its log: JSON lines, at DEBUG, none holding a value; nothing raw beside them.
    assert MARKER.encode() in planted_study[0]
    lines = [line for line in err.splitlines() if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is a JSON record: nothing went to stderr raw
    assert any(e["message"].startswith("DICOM SEG written without the source's PatientName") for e in entries)
    assert len(entries) > 10
    assert MARKER not in err and MARKER not in out
