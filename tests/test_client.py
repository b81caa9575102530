"""The cspine client against real SYNTHETIC phantom DICOM and a real in-process gRPC server over a socket:
the upload stream, errors as ClientError, the answer as domain objects and a report, and the SEG overlay; the
client package without pydicom or the gateway; TLS channels, with a client certificate too."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import highdicom as hd
import matplotlib.image
import numpy as np
import pytest
from pydicom.filebase import DicomBytesIO

from cspine.analysis.text import format_analysis
from cspine.client import (
    ClientError,
    Tls,
    UnknownCode,
    analyze_paths,
    open_channel,
    parse_address,
    service_info,
    to_domain,
    upload_messages,
)
from cspine.commands import analyze as analyze_command
from cspine.config import Settings
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.outputs import build_seg
from cspine.dicom.selection import select_series
from cspine.domain import (
    Assessment,
    Modality,
    ModalityResult,
    NoticeCode,
    SeriesRole,
    SpineMeasurements,
    StudyAnalysis,
)
from cspine.errors import InvalidInputError
from cspine.gateway.auth import server_credentials
from cspine.inference.specs import SEG_LABELS
from cspine.modeling.data import model_labels
from cspine.overlay import busiest_source_frame, overlay_png
from cspine.phantom.generate import PhantomOptions, generate_case
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from support.server import free_port
from support.tls import make_pki

OPTIONS = pb.AnalysisOptions(return_dicom_seg=True, modalities=[pb.CT, pb.XR])
TOKEN = "s3cret-token"
BIG_SEG = bytes(range(256)) * (5 * 1024 * 1024 // 256)  # 5 MiB: more than gRPC's default 4 MiB message


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small SYNTHETIC CT study with a tumor: ct/*.dcm, truth.json and labels.npz."""
    case_dir = tmp_path_factory.mktemp("client") / "case"
    generate_case(case_dir, "client", 21, 0, PhantomOptions(modalities=("ct",), tumor="benign"))
    (case_dir / "README.txt").write_text("notes that are not DICOM, longer than the 132 bytes of a DICOM prefix " * 3)
    return case_dir


def _dicom_files(case: Path) -> list[Path]:
    """The study's DICOM files as the phantom's truth.json lists them, in iter_files (sorted) order."""
    truth = json.loads((case / "truth.json").read_text())
    return sorted(case / name for name in truth["series"]["ct"]["files"])


def _reassemble(messages) -> tuple[pb.AnalysisOptions | None, list[bytes]]:
    """What a server makes of an upload stream: the options and every instance's bytes in order. Checks the
    chunk protocol as it goes: instance_index 0, 1, 2 …, offsets without gaps, data not empty."""
    options, instances, pending, next_index = None, [], bytearray(), 0
    for position, message in enumerate(messages):
        kind = message.WhichOneof("part")
        if kind == "options":
            assert position == 0, "options must come first"
            options = message.options
        elif kind == "dicom_instance":
            assert not pending, "a whole instance inside a chunked one"
            instances.append(message.dicom_instance)
        else:
            chunk = message.chunk
            assert chunk.instance_index == next_index and chunk.offset == len(pending) and chunk.data
            pending += chunk.data
            if chunk.last:
                instances.append(bytes(pending))
                pending, next_index = bytearray(), next_index + 1
    assert not pending, "the stream ended inside a chunked instance"
    return options, instances


# --------------------------------------------------------------------------------------------------------
# upload_messages


def test_upload_sends_options_first_then_every_dicom_file_exactly_once_and_no_other_file(case: Path):
    messages = list(upload_messages([case], OPTIONS))

    assert messages[0].WhichOneof("part") == "options" and messages[0].options == OPTIONS
    assert {m.WhichOneof("part") for m in messages[1:]} == {"dicom_instance"}  # ~130 kB files: none chunked
    sent = Counter(m.dicom_instance for m in messages[1:])
    expected = Counter(path.read_bytes() for path in _dicom_files(case))
    assert sum(expected.values()) > 20 and sent == expected
    for other in ("truth.json", "labels.npz", "README.txt"):
        assert (case / other).read_bytes() not in sent


def test_upload_without_options_starts_with_an_instance(case: Path):
    first = next(upload_messages([case / "ct"]))
    assert first.WhichOneof("part") == "dicom_instance"


def test_upload_chunks_files_larger_than_chunk_bytes_and_they_reassemble_byte_exactly(case: Path):
    chunk_bytes = 64 * 1024
    messages = list(upload_messages([case], OPTIONS, chunk_bytes=chunk_bytes))
    options, instances = _reassemble(messages)

    files = _dicom_files(case)
    assert options == OPTIONS
    assert instances == [path.read_bytes() for path in files]  # byte-exact, in iter_files order
    chunks = [m.chunk for m in messages if m.WhichOneof("part") == "chunk"]
    assert all(0 < len(c.data) <= chunk_bytes for c in chunks)
    assert [c.instance_index for c in chunks if c.last] == list(range(len(files)))
    size = files[0].stat().st_size
    pieces = -(-size // chunk_bytes)
    assert [c.offset for c in chunks[:pieces]] == [k * chunk_bytes for k in range(pieces)]


def test_upload_sends_a_file_of_exactly_chunk_bytes_whole_and_one_byte_more_in_two_pieces(case: Path):
    path = _dicom_files(case)[0]
    size = path.stat().st_size
    [whole] = upload_messages([path], chunk_bytes=size)
    assert whole.dicom_instance == path.read_bytes()

    first, second = (m.chunk for m in upload_messages([path], chunk_bytes=size - 1))
    assert (first.instance_index, first.offset, first.last, len(first.data)) == (0, 0, False, size - 1)
    assert (second.instance_index, second.offset, second.last, len(second.data)) == (0, size - 1, True, 1)


# --------------------------------------------------------------------------------------------------------
# A real server


class RecordingServicer(pb_grpc.SpineAnalysisServicer):
    """Reassembles each upload, remembers it and its metadata, and answers with ``reply`` (or aborts)."""

    def __init__(self) -> None:
        self.reply = pb.StudyAnalysis()
        self.abort: tuple[grpc.StatusCode, str] | None = None
        self.options: pb.AnalysisOptions | None = None
        self.instances: list[bytes] = []
        self.metadata: dict[str, str] = {}

    def AnalyzeStudy(self, request_iterator, context):
        self.metadata = dict(context.invocation_metadata())
        if self.abort is not None:
            context.abort(*self.abort)
        self.options, self.instances = _reassemble(request_iterator)
        return self.reply

    def GetServiceInfo(self, request, context):
        return pb.ServiceInfo(
            version="0.1.0",
            labels=["benign", "borderline", "malignant"],
            limits=pb.Limits(max_instances=4000, max_message_bytes=4 * 1024 * 1024),
            synthetic_support_set=True,
        )


@pytest.fixture(scope="module")
def server():
    servicer = RecordingServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SpineAnalysisServicer_to_server(servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        grpc_server.stop(grace=None)


@pytest.fixture
def recorder(server):
    address, servicer = server
    servicer.__init__()  # a clean record per test
    return address, servicer


def _reply() -> pb.StudyAnalysis:
    """A StudyAnalysis with every kind of field: optional values present and absent, UNSPECIFIED sources,
    an unclassified lesion, a notice code this client does not know, SEG bytes over 4 MiB."""
    fused = pb.Assessment(
        tumor_detected=True,
        detection_score=0.913,
        probabilities=[
            pb.ClassProbability(label="benign", probability=0.071),
            pb.ClassProbability(label="borderline", probability=0.205),
            pb.ClassProbability(label="malignant", probability=0.724),
        ],
        uncertainty=0.618,
        classified_from=[pb.CT, pb.MR],
    )
    ct = pb.ModalityResult(
        modality=pb.CT,
        series=[pb.SeriesUsed(role="ct", series_instance_uid="1.2.3.1", description="CT C-spine axial", slices=116)],
        lesions=[
            pb.Lesion(
                vertebral_level="C5",
                levels=["C5", "C6"],
                max_diameter_mm=23.4,
                volume_ml=4.57,
                assessment=fused,
                centre_mm=[1.5, -20.25, 110.0],
                bbox_min_mm=[-8.0, -30.0, 100.0],
                bbox_max_mm=[11.0, -10.5, 121.0],
                series_instance_uid="1.2.3.1",
            ),
            pb.Lesion(vertebral_level="C3", levels=["C3"], max_diameter_mm=6.1, volume_ml=0.08),  # not classified
        ],
        assessment=fused,
    )
    xr = pb.ModalityResult(
        modality=pb.XR,
        series=[pb.SeriesUsed(role="xr", series_instance_uid="1.2.3.3", description="", slices=1)],
        lesions=[pb.Lesion(vertebral_level="C5", levels=["C5"], max_diameter_mm=21.0, area_mm2=412.5)],
        assessment=pb.Assessment(tumor_detected=True, detection_score=0.66),
    )
    spine = pb.SpineMeasurements(
        levels=[
            pb.LevelMeasurement(level="C4", canal_area_mm2=187.0, disc_height_mm=5.5, canal_source=pb.CT),
            pb.LevelMeasurement(
                level="C5",
                canal_area_mm2=142.0,
                cord_area_mm2=61.0,
                cord_compression_ratio=0.43,
                disc_height_mm=4.2,
                canal_source=pb.CT,
                cord_source=pb.MR,
                disc_source=pb.MR,
            ),
        ],
        cobb_angle_deg=-7.5,
        cobb_source=pb.XR,
        opll=pb.Opll(present=True, occupying_ratio=0.37, max_thickness_mm=4.1, levels=["C4", "C5"]),
    )
    return pb.StudyAnalysis(
        study_instance_uid="1.2.3",
        modalities=[ct, xr],
        fused=fused,
        spine=spine,
        prototype_set_version="ps-0007",
        models=[pb.ModelVersion(name="seg_ct", version="1-abc123"), pb.ModelVersion(name="lesion_embed", version="2")],
        notices=[
            pb.Notice(code="missing_modality", message="no MR series"),
            pb.Notice(code="series_skipped", message="scout: not axial", series_instance_uid="1.2.3.9"),
            pb.Notice(code="from_the_future", message="a notice a newer server sends"),
        ],
        dicom_seg=BIG_SEG,
        dicom_sr=b"SR bytes",
        stage_seconds={"ingest": 0.25, "infer": 3.5, "total": 4.125},
        request_id="req-42",
    )


# --------------------------------------------------------------------------------------------------------
# analyze_paths, service_info


def test_analyze_paths_sends_every_instance_intact_with_options_and_token_and_returns_the_reply(recorder, case):
    address, servicer = recorder
    servicer.reply = _reply()
    result = analyze_paths(address, [case], OPTIONS, timeout_s=30, token=TOKEN, chunk_bytes=48 * 1024)

    assert result == servicer.reply  # SEG bytes of 5 MiB arrive: the receive limit is raised
    assert servicer.options == OPTIONS
    assert servicer.instances == [path.read_bytes() for path in _dicom_files(case)]
    assert servicer.metadata["authorization"] == f"Bearer {TOKEN}"


def test_analyze_paths_sends_no_authorization_without_a_token(recorder, case):
    address, servicer = recorder
    analyze_paths(address, [case / "ct" / "CT0001.dcm"], None, timeout_s=30)
    assert "authorization" not in servicer.metadata
    assert servicer.options is None and len(servicer.instances) == 1


def test_to_domain_converts_every_field_and_the_report_shows_the_values():
    analysis = to_domain(_reply())

    ct, xr = analysis.modalities
    assert (ct.modality, xr.modality) == (Modality.CT, Modality.XR)
    assert ct.series[0].role is SeriesRole.CT and ct.series[0].slices == 116
    big, small = ct.lesions
    assert (big.max_diameter_mm, big.volume_ml, big.area_mm2) == (23.4, 4.57, None)  # float32 read back as sent
    assert big.centre_mm == (1.5, -20.25, 110.0) and big.bbox_max_mm == (11.0, -10.5, 121.0)
    assert big.assessment.label == "malignant" and big.assessment.probability("benign") == 0.071
    assert small.assessment is None
    assert (xr.lesions[0].volume_ml, xr.lesions[0].area_mm2) == (None, 412.5)
    assert analysis.fused.detection_score == 0.913 and analysis.fused.uncertainty == 0.618
    assert analysis.fused.classified_from == (Modality.CT, Modality.MR)

    c4, c5 = analysis.spine.levels
    assert (c4.cord_area_mm2, c4.cord_compression_ratio, c4.cord_source, c4.disc_source) == (None, None, None, None)
    assert (c5.cord_area_mm2, c5.cord_source, c5.disc_height_mm) == (61.0, Modality.MR, 4.2)
    assert (analysis.spine.cobb_angle_deg, analysis.spine.cobb_source) == (-7.5, Modality.XR)
    assert analysis.spine.opll.levels == ("C4", "C5") and analysis.spine.opll.occupying_ratio == 0.37
    assert [n.code for n in analysis.notices] == [
        NoticeCode.MISSING_MODALITY,
        NoticeCode.SERIES_SKIPPED,
        UnknownCode("from_the_future"),
    ]
    assert analysis.notices[0].series_instance_uid is None and analysis.notices[1].series_instance_uid == "1.2.3.9"
    assert analysis.stage_seconds == {"ingest": 0.25, "infer": 3.5, "total": 4.125}
    assert [(m.name, m.version) for m in analysis.models] == [("seg_ct", "1-abc123"), ("lesion_embed", "2")]
    assert (analysis.dicom_seg, analysis.dicom_sr) == (BIG_SEG, b"SR bytes")

    report = format_analysis(analysis)
    for text in (
        "prototype set ps-0007",
        "ct: CT C-spine axial (116)",
        "lesion 1: C5 (C5, C6), 23.4 mm, 4.57 mL; benign 0.07, borderline 0.20, malignant 0.72 (uncertainty 0.62)",
        "lesion 2: C3 (C3), 6.1 mm, 0.08 mL; not classified",
        "xr: 1.2.3.3 (1)",
        "lesion 1: C5 (C5), 21.0 mm, 412 mm²",
        "FUSED  tumor detected (score 0.91); benign 0.07, borderline 0.20, malignant 0.72 (uncertainty 0.62) "
        "from CT + MR",
        "C2–C7 Cobb -7.5° (from XR)",
        "OPLL present at C4, C5, occupying ratio 0.37",
        "notice missing_modality: no MR series",
        "notice from_the_future: a notice a newer server sends",
    ):
        assert text in report, text
    [c5_row] = [line for line in report.splitlines() if line.strip().startswith("C5 ")]
    assert c5_row.split() == ["C5", "142", "61", "0.43", "4.2"]
    [c4_row] = [line for line in report.splitlines() if line.strip().startswith("C4 ")]
    assert c4_row.split() == ["C4", "187", "—", "—", "5.5"]


def test_to_domain_of_an_empty_reply_gives_none_for_every_absent_value():
    analysis = to_domain(pb.StudyAnalysis(study_instance_uid="1.2"))
    assert analysis.modalities == [] and analysis.notices == []
    assert (analysis.spine.opll, analysis.spine.cobb_angle_deg, analysis.spine.cobb_source) == (None, None, None)
    assert (analysis.dicom_seg, analysis.dicom_sr) == (None, None)
    assert analysis.fused.tumor_detected is False and analysis.fused.label is None
    assert "no tumor detected" in format_analysis(analysis)


def test_a_server_abort_with_invalid_argument_becomes_a_client_error_with_its_code_and_message(recorder, case):
    address, servicer = recorder
    servicer.abort = (grpc.StatusCode.INVALID_ARGUMENT, "instance CT0007.dcm: two studies in one upload")
    with pytest.raises(ClientError) as caught:
        analyze_paths(address, [case], OPTIONS, timeout_s=30)
    assert caught.value.code == "INVALID_ARGUMENT"
    assert caught.value.message == "instance CT0007.dcm: two studies in one upload"
    assert str(caught.value) == "INVALID_ARGUMENT: instance CT0007.dcm: two studies in one upload"


def test_a_missing_path_raises_its_own_error_and_cancels_the_call(recorder, case, caplog):
    address, _ = recorder
    with pytest.raises(InvalidInputError, match="missing: no such file or folder"):
        analyze_paths(address, [case / "ct", case / "missing"], None, timeout_s=30)
    assert "Exception iterating requests" not in caplog.text  # grpc did not see (and log) the error


def test_no_server_at_the_address_gives_unavailable(case):
    with pytest.raises(ClientError, match="^UNAVAILABLE: "):
        analyze_paths(f"127.0.0.1:{free_port()}", [case / "ct" / "CT0001.dcm"], None, timeout_s=10)


def test_service_info_returns_the_servers_limits_and_labels(recorder):
    address, _ = recorder
    info = service_info(address, timeout_s=10)
    assert list(info.labels) == ["benign", "borderline", "malignant"]
    assert info.limits.max_message_bytes == 4 * 1024 * 1024 and info.synthetic_support_set


# --------------------------------------------------------------------------------------------------------
# cspine analyze


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="cspine")
    analyze_command.register(parser.add_subparsers(dest="command", required=True), Settings())
    args = parser.parse_args(["analyze", *argv])
    return args.func(args)


def test_analyze_command_prints_the_report_and_writes_seg_sr_and_overlay(recorder, case, ct_seg, tmp_path, capsys):
    address, servicer = recorder
    servicer.reply = _reply()
    servicer.reply.dicom_seg = ct_seg
    out = tmp_path / "out"
    argv = [str(case), "--server", address, "--seg", f"{out}/seg.dcm", "--sr", f"{out}.sr.dcm"]
    code = _run([*argv, "--overlay", f"{out}/overlay.png", "--modalities", "ct,XR", "--token", TOKEN, "--quiet"])

    assert code == 0
    printed = capsys.readouterr().out
    assert "lesion 1: C5 (C5, C6), 23.4 mm, 4.57 mL" in printed and "request id req-42" in printed
    assert servicer.options == pb.AnalysisOptions(
        return_dicom_seg=True, return_dicom_sr=True, modalities=[pb.CT, pb.XR]
    )
    assert servicer.metadata["authorization"] == f"Bearer {TOKEN}"
    assert (out / "seg.dcm").read_bytes() == ct_seg and Path(f"{out}.sr.dcm").read_bytes() == b"SR bytes"
    assert (out / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_analyze_command_json_leaves_out_the_seg_and_sr_bytes_and_asks_for_neither(recorder, case, capsys):
    address, servicer = recorder
    servicer.reply = _reply()
    assert _run([str(case / "ct"), "--server", address, "--json", "--quiet"]) == 0

    result = json.loads(capsys.readouterr().out)
    assert "dicom_seg" not in result and "dicom_sr" not in result
    assert result["request_id"] == "req-42" and result["modalities"][0]["lesions"][0]["vertebral_level"] == "C5"
    assert result["modalities"][1]["lesions"][0]["area_mm2"] == 412.5
    assert servicer.options == pb.AnalysisOptions()  # no SEG, no SR, every modality


def test_analyze_command_prints_the_status_and_exits_2_when_the_server_refuses(recorder, case, capsys):
    address, servicer = recorder
    servicer.abort = (grpc.StatusCode.RESOURCE_EXHAUSTED, "the study has 5000 instances; the limit is 4000")
    assert _run([str(case), "--server", address, "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cspine: error: RESOURCE_EXHAUSTED: the study has 5000 instances; the limit is 4000"
    )


def test_analyze_command_says_where_it_looked_when_no_server_answers(case, capsys):
    address = f"127.0.0.1:{free_port()}"
    assert _run([str(case / "ct" / "CT0001.dcm"), "--server", address, "--timeout", "10", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cspine: error: UNAVAILABLE: ") and f"listening on {address}?" in err


def test_analyze_command_refuses_an_unknown_modality(capsys):
    with pytest.raises(SystemExit) as caught:
        _run(["study", "--modalities", "ct,pet"])
    assert caught.value.code == 2 and "unknown modality pet" in capsys.readouterr().err


def test_analyze_command_says_in_one_line_why_the_server_wrote_no_seg_and_exits_0(recorder, case, tmp_path, capsys):
    address, servicer = recorder
    servicer.reply = _reply()
    servicer.reply.dicom_seg = b""
    reason = "DICOM SEG not written: the CT series has no FrameOfReferenceUID, which a SEG of CT images needs"
    servicer.reply.notices.append(pb.Notice(code="output_unavailable", message=reason))
    out = tmp_path / "out"
    argv = [str(case), "--server", address, "--seg", f"{out}/seg.dcm", "--sr", f"{out}/sr.dcm", "--quiet"]

    assert _run([*argv, "--overlay", f"{out}/overlay.png"]) == 0
    printed = capsys.readouterr()
    assert "request id req-42" in printed.out and f"wrote {out}/sr.dcm" in printed.out
    assert printed.err.splitlines() == [f"cspine: {reason}: no --seg/--overlay"]
    assert not (out / "seg.dcm").exists() and not (out / "overlay.png").exists()


def test_analyze_command_reports_a_failed_overlay_and_an_unwritable_file_in_one_line_each_and_exits_0(
    recorder, case, tmp_path, capsys
):
    address, servicer = recorder
    servicer.reply = _reply()  # its dicom_seg is 5 MiB of bytes that are no DICOM SEG
    (tmp_path / "a-file").write_text("not a folder")
    sr = tmp_path / "a-file" / "sr.dcm"
    argv = [str(case), "--server", address, "--sr", str(sr), "--overlay", str(tmp_path / "overlay.png"), "--quiet"]

    assert _run(argv) == 0
    printed = capsys.readouterr()
    assert "lesion 1: C5 (C5, C6)" in printed.out and "request id req-42" in printed.out
    unwritable, overlay = printed.err.splitlines()
    assert unwritable.startswith(f"cspine: {sr} not written: ")  # then the OS's words: "File exists" …
    assert overlay == "cspine: overlay not drawn: the DICOM SEG cannot be read (InvalidDicomError)"


# --------------------------------------------------------------------------------------------------------
# The package on its own


def test_the_client_package_uploads_without_pydicom_or_the_gateway_and_imports_neither(case: Path):
    blocked = ("pydicom", "highdicom", "cspine.gateway", "cspine.dicom")
    script = textwrap.dedent(
        f"""
        import sys
        for name in {blocked!r}:
            sys.modules[name] = None  # importing any of them now fails
        import cspine.client
        messages = list(cspine.client.upload_messages([{str(case)!r}]))
        loaded = [m for m, module in sys.modules.items() if m.startswith({blocked!r}) and module is not None]
        print(len(messages), loaded)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(len(_dicom_files(case))), "[]"]


@pytest.mark.parametrize(
    ("address", "target", "tls"),
    [
        ("127.0.0.1:50051", "127.0.0.1:50051", False),
        ("grpc://cspine.example.org:50051", "cspine.example.org:50051", False),
        ("grpcs://cspine.example.org:50051", "cspine.example.org:50051", True),
        ("https://cspine.example.org/", "cspine.example.org:443", True),
        ("GRPCS://[::1]", "[::1]:443", True),
        ("grpcs://[::1]:8443", "[::1]:8443", True),
    ],
)
def test_an_address_asks_for_tls_by_its_scheme_which_grpc_never_sees(address, target, tls):
    assert parse_address(address) == (target, tls)


# --------------------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    """The recording servicer behind TLS that asks for a client certificate the test CA signed."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    servicer = RecordingServicer()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_SpineAnalysisServicer_to_server(servicer, grpc_server)
    credentials = server_credentials(pki["server_cert"], pki["server_key"], client_ca=pki["ca"])
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    try:
        yield f"127.0.0.1:{port}", servicer, pki
    finally:
        grpc_server.stop(grace=None)


def _tls_flags(pki: dict[str, Path], *names: str) -> list[str]:
    return [part for name in names for part in (f"--{name.replace('_', '-')}", str(pki[name]))]


def test_analyze_paths_over_tls_shows_the_client_certificate_and_sends_every_instance(tls_server, case):
    address, servicer, pki = tls_server
    servicer.__init__()
    servicer.reply = _reply()
    tls = Tls(pki["ca"], pki["client_cert"], pki["client_key"])

    result = analyze_paths(address, [case], OPTIONS, timeout_s=30, token=TOKEN, tls=tls)
    assert result == servicer.reply and servicer.options == OPTIONS
    assert servicer.instances == [path.read_bytes() for path in _dicom_files(case)]
    assert servicer.metadata["authorization"] == f"Bearer {TOKEN}"
    assert service_info(f"grpcs://{address}", 10, tls=tls).synthetic_support_set  # the scheme is stripped


def test_a_tls_server_refuses_a_plaintext_client_and_one_without_the_certificate_it_asks_for(tls_server):
    address, _, pki = tls_server
    for tls in (Tls(), Tls(pki["ca"])):
        with pytest.raises(ClientError, match="^UNAVAILABLE: "):
            service_info(address, 10, tls=tls)


def test_the_analyze_command_uses_its_tls_flags_and_without_them_says_what_a_tls_server_needs(tls_server, case, capsys):
    address, servicer, pki = tls_server
    servicer.__init__()
    argv = [str(case / "ct"), "--server", address, "--token", TOKEN, "--quiet"]

    assert _run([*argv, *_tls_flags(pki, "ca", "client_cert", "client_key")]) == 0
    assert "request id" in capsys.readouterr().out and len(servicer.instances) == len(_dicom_files(case))
    assert _run(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("cspine: error: UNAVAILABLE: ") and "one serving TLS needs --ca" in err[1]
    assert _run([*argv, *_tls_flags(pki, "ca")]) == 2
    assert "one started with --tls-client-ca also needs --client-cert and --client-key" in capsys.readouterr().err


def test_tls_files_that_cannot_be_used_are_refused_before_any_call(tmp_path):
    with pytest.raises(ValueError, match="give both"):
        Tls(client_cert=tmp_path / "client.crt")
    with pytest.raises(ValueError, match=r"CA certificate .*absent\.pem does not exist"):
        open_channel("127.0.0.1:1", ca=tmp_path / "absent.pem")
    (tmp_path / "ca.pem").write_text("not PEM")
    with pytest.raises(ValueError, match=r"CA certificate .*ca\.pem is not a PEM file"):
        open_channel("grpcs://127.0.0.1:1", ca=tmp_path / "ca.pem")


# --------------------------------------------------------------------------------------------------------
# overlay_png


@pytest.fixture(scope="module")
def ct_labels(case) -> np.ndarray:
    with np.load(case / "labels.npz") as npz:
        return model_labels(Modality.CT, npz["ct_labels"], npz["ct_levels"])


def _seg(case: Path, labels: np.ndarray) -> tuple[bytes, list[str]]:
    """A DICOM SEG of ``labels`` on the case's CT, built by cspine's own writer; and the slices' SOP UIDs."""
    study = ingest_paths([case / "ct"])
    chosen = select_series(study).chosen
    assessment = Assessment(True, 0.9)
    result = ModalityResult(Modality.CT, (), [], assessment, {SeriesRole.CT: labels})
    analysis = StudyAnalysis(study.study_instance_uid, [result], assessment, SpineMeasurements(), "", [])
    return build_seg(analysis, chosen), [ref.sop_instance_uid for ref in chosen[SeriesRole.CT].instances]


@pytest.fixture(scope="module")
def ct_seg(case, ct_labels) -> bytes:
    return _seg(case, ct_labels)[0]


def test_overlay_is_drawn_on_the_ct_slice_with_the_most_tumor(case, ct_labels):
    data, sop_uids = _seg(case, ct_labels)
    tumor = ct_labels == SEG_LABELS[Modality.CT].index("tumor")
    busiest = int(np.argmax(tumor.sum(axis=(1, 2))))
    assert busiest_source_frame(hd.seg.segread(DicomBytesIO(data))) == (sop_uids[busiest], 1)

    without_tumor = np.where(tumor, 0, ct_labels).astype(np.uint8)  # then: the slice with the most of anything
    data, sop_uids = _seg(case, without_tumor)
    most = int(np.argmax((without_tumor > 0).sum(axis=(1, 2))))
    assert busiest_source_frame(hd.seg.segread(DicomBytesIO(data))) == (sop_uids[most], 1)


def test_overlay_png_is_a_valid_image_with_grey_anatomy_and_the_red_tumor(case, ct_seg, tmp_path):
    out = overlay_png(ct_seg, [case], tmp_path / "figures" / "overlay.png")

    assert out == tmp_path / "figures" / "overlay.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rgb = matplotlib.image.imread(out)[..., :3]
    assert 300 <= rgb.shape[0] <= 2000 and 300 <= rgb.shape[1] <= 2000
    assert rgb.var() > 0.01
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    tumor_red = (red - green > 0.25) & (red - blue > 0.25)  # (230, 30, 30) at 45 % over grey
    grey = (np.abs(red - green) < 0.02) & (np.abs(green - blue) < 0.02) & (red > 0.2) & (red < 0.9)
    assert tumor_red.sum() > 200 and grey.sum() > 10_000


def test_overlay_refuses_when_the_source_images_are_not_given(ct_seg, tmp_path):
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(ValueError, match="is not among the local DICOM files"):
        overlay_png(ct_seg, [tmp_path], tmp_path / "overlay.png")
