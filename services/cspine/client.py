"""The cspine gRPC client: upload a study's DICOM files to ``AnalyzeStudy``, read the answer back as domain
objects, and ``cspine analyze``, the command an integrator tries cspine with on their own DICOM folder."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from cspine import domain
from cspine.dicom.ingest import iter_files
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

__all__ = [
    "ClientError",
    "UnknownCode",
    "add_analyze_command",
    "analyze_paths",
    "is_part10",
    "service_info",
    "to_domain",
    "upload_messages",
]

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 120.0
# gRPC refuses messages over 4 MiB by default; a chunk of 3 MiB leaves room for the envelope.
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024
# A StudyAnalysis carries the DICOM SEG and SR bytes, which can be far larger than 4 MiB.
MAX_RECEIVE_BYTES = 256 * 1024 * 1024

MODALITY_FROM_PB: dict[int, domain.Modality | None] = {
    pb.MODALITY_UNSPECIFIED: None,
    pb.CT: domain.Modality.CT,
    pb.MR: domain.Modality.MR,
    pb.XR: domain.Modality.XR,
}
MODALITY_OPTIONS: dict[str, int] = {"ct": pb.CT, "mr": pb.MR, "xr": pb.XR}


class ClientError(Exception):
    """A call the server (or the channel) failed: the gRPC status code's name and its message."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")

    @classmethod
    def from_rpc(cls, error: grpc.RpcError) -> ClientError:
        return cls(error.code().name, error.details() or "")


# --------------------------------------------------------------------------------------------------------
# Upload


def is_part10(path: Path) -> bool:
    """Whether a file is DICOM Part-10: "DICM" after the 128-byte preamble. Reads 132 bytes."""
    with path.open("rb") as f:
        return f.read(132)[128:] == b"DICM"


def upload_messages(
    paths: Iterable[Path | str],
    options: pb.AnalysisOptions | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    message: type = pb.StudyUpload,
    lead_field: str = "options",
) -> Iterator[pb.StudyUpload]:
    """The AnalyzeStudy request stream: ``options`` first (when given), then every DICOM Part-10 file under
    ``paths``, whole when it fits in ``chunk_bytes``, else in ordered chunks. Files are read as the stream is
    consumed, at most two chunks at a time; other files (truth.json, a README …) are skipped and logged.
    ``message`` and ``lead_field`` make AddCase's stream instead (``support_pb2.CaseUpload``, ``header``)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, got {chunk_bytes}")
    if options is not None:
        yield message(**{lead_field: options})
    sent = chunked = 0
    for path in iter_files(paths):
        if not is_part10(path):
            logger.info("%s: skipped, not a DICOM Part-10 file", path)
            continue
        sent += 1
        logger.debug("instance #%d: %s", sent, path)  # to find the file an error names by its position
        if path.stat().st_size <= chunk_bytes:
            yield message(dicom_instance=path.read_bytes())
            continue
        with path.open("rb") as f:
            offset, data = 0, f.read(chunk_bytes)
            while data:
                following = f.read(chunk_bytes)  # read ahead: the piece before the end must say last
                chunk = pb.DicomChunk(instance_index=chunked, offset=offset, data=data, last=not following)
                yield message(chunk=chunk)
                offset, data = offset + len(data), following
        chunked += 1


class _Upload:
    """The request stream of one call. When reading the files fails (a path that does not exist, a file that
    cannot be read) the call is cancelled and the error kept for the caller: left to grpc, it would become
    UNKNOWN "Exception iterating requests!" with a logged traceback."""

    def __init__(self, messages: Iterator[pb.StudyUpload], progress: Callable[[int], None] | None) -> None:
        self._messages = messages
        self._progress = progress
        self._call: grpc.Future | None = None
        self._started = threading.Event()
        self.error: Exception | None = None

    def start(self, call: grpc.Future | None) -> None:
        self._call = call
        self._started.set()

    def __iter__(self) -> Iterator[pb.StudyUpload]:
        self._started.wait()  # grpc consumes the stream in its own thread, maybe before start() was called
        if self._call is None:
            return
        try:
            for message in self._messages:
                yield message
                if self._progress is not None:
                    self._progress(message.ByteSize())
        except Exception as exc:  # handed to the caller by analyze_paths
            self.error = exc
            self._call.cancel()


def open_channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", MAX_RECEIVE_BYTES)])


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def stream_call(method, messages: Iterator, *, timeout_s: float, token: str | None, progress=None):
    """One client-streaming call fed by ``messages``; see _Upload for what happens when reading fails."""
    upload = _Upload(messages, progress)
    call = None
    try:
        call = method.future(iter(upload), timeout=timeout_s, metadata=bearer_metadata(token))
    finally:
        upload.start(call)
    try:
        return call.result()
    except (grpc.RpcError, grpc.FutureCancelledError) as exc:
        if upload.error is not None:
            raise upload.error from None
        if isinstance(exc, grpc.RpcError):
            raise ClientError.from_rpc(exc) from None
        raise
    except BaseException:  # Ctrl-C: stop the upload and the work on the server too
        call.cancel()
        raise


def analyze_paths(
    address: str,
    paths: Iterable[Path | str],
    options: pb.AnalysisOptions | None = None,
    *,
    timeout_s: float,
    token: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
) -> pb.StudyAnalysis:
    """Analyse the study in ``paths`` with one AnalyzeStudy call to the server at ``address`` (insecure
    channel). ``progress``, when given, is called with the size of each message sent.

    Raises ClientError for a failed call, and the error itself when reading the files failed.
    """
    with open_channel(address) as channel:
        stub = pb_grpc.SpineAnalysisStub(channel)
        messages = upload_messages(paths, options, chunk_bytes)
        return stream_call(stub.AnalyzeStudy, messages, timeout_s=timeout_s, token=token, progress=progress)


def service_info(address: str, timeout_s: float, *, token: str | None = None) -> pb.ServiceInfo:
    """What the server at ``address`` runs: models, prototype set, labels and limits."""
    with open_channel(address) as channel:
        stub = pb_grpc.SpineAnalysisStub(channel)
        try:
            return stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=timeout_s, metadata=bearer_metadata(token))
        except grpc.RpcError as exc:
            raise ClientError.from_rpc(exc) from None


# --------------------------------------------------------------------------------------------------------
# Protobuf → domain


@dataclass(frozen=True)
class UnknownCode:
    """A notice code or series role this client does not know, sent by a newer server.

    It stands in for ``domain.NoticeCode`` / ``domain.SeriesRole`` (same ``value`` attribute), so the notice
    or series is kept, verbatim, and the report still shows it; comparisons with known members are False.
    """

    value: str

    def __str__(self) -> str:
        return self.value


def _f32(value: float) -> float:
    """A float32 from the wire as the shortest decimal that gives it back: 23.4, not 23.399999618530273."""
    return float(str(np.float32(value)))


def _floats(values: Iterable[float]) -> tuple[float, ...]:
    return tuple(_f32(v) for v in values)


def _optional(message, name: str) -> float | None:
    return _f32(getattr(message, name)) if message.HasField(name) else None


def _code(enum: type[domain.NoticeCode] | type[domain.SeriesRole] | type[domain.ReasonCode], value: str):
    try:
        return enum(value)
    except ValueError:
        logger.warning("unknown %s %r from the server: kept as text", enum.__name__, value)
        return UnknownCode(value)


_STATUS_FROM_PB = {
    pb.ASSESSED: domain.AssessmentStatus.ASSESSED,
    pb.NOT_ASSESSABLE: domain.AssessmentStatus.NOT_ASSESSABLE,
}


def _reason(msg: pb.NotAssessableReason) -> domain.Reason:
    return domain.Reason(_code(domain.ReasonCode, msg.code), msg.message)


def _assessment(msg: pb.Assessment) -> domain.Assessment:
    """An older server sends no status: its assessments were all made, so ASSESSED."""
    return domain.Assessment(
        tumor_detected=msg.tumor_detected,
        detection_score=_optional(msg, "detection_score"),
        probabilities=tuple(domain.ClassProbability(p.label, _f32(p.probability)) for p in msg.probabilities),
        uncertainty=_f32(msg.uncertainty),
        status=_STATUS_FROM_PB.get(msg.status, domain.AssessmentStatus.ASSESSED),
        reasons=tuple(_reason(r) for r in msg.reasons),
    )


def _lesion(msg: pb.Lesion) -> domain.Lesion:
    return domain.Lesion(
        vertebral_level=msg.vertebral_level,
        levels=tuple(msg.levels),
        max_diameter_mm=_f32(msg.max_diameter_mm),
        volume_ml=_optional(msg, "volume_ml"),
        area_mm2=_optional(msg, "area_mm2"),
        centre_mm=_floats(msg.centre_mm),
        bbox_min_mm=_floats(msg.bbox_min_mm),
        bbox_max_mm=_floats(msg.bbox_max_mm),
        series_instance_uid=msg.series_instance_uid,
        assessment=_assessment(msg.assessment) if msg.HasField("assessment") else None,
    )


def _modality_result(msg: pb.ModalityResult) -> domain.ModalityResult | None:
    modality = MODALITY_FROM_PB.get(msg.modality)
    if modality is None:
        logger.warning("a result for modality %d, which this client does not know, is left out", msg.modality)
        return None
    return domain.ModalityResult(
        modality=modality,
        series=tuple(
            domain.SeriesUsed(_code(domain.SeriesRole, s.role), s.series_instance_uid, s.description, s.slices)
            for s in msg.series
        ),
        lesions=[_lesion(lesion) for lesion in msg.lesions],
        assessment=_assessment(msg.assessment),
        ood=domain.OodScore(_f32(msg.ood.score), _f32(msg.ood.threshold)) if msg.HasField("ood") else None,
    )


def _level(msg: pb.LevelMeasurement) -> domain.LevelMeasurement:
    return domain.LevelMeasurement(
        level=msg.level,
        canal_area_mm2=_optional(msg, "canal_area_mm2"),
        cord_area_mm2=_optional(msg, "cord_area_mm2"),
        cord_compression_ratio=_optional(msg, "cord_compression_ratio"),
        disc_height_mm=_optional(msg, "disc_height_mm"),
        canal_source=MODALITY_FROM_PB.get(msg.canal_source),
        cord_source=MODALITY_FROM_PB.get(msg.cord_source),
        disc_source=MODALITY_FROM_PB.get(msg.disc_source),
    )


def _spine(msg: pb.SpineMeasurements) -> domain.SpineMeasurements:
    opll = msg.opll
    return domain.SpineMeasurements(
        levels=[_level(m) for m in msg.levels],
        cobb_angle_deg=_optional(msg, "cobb_angle_deg"),
        cobb_source=MODALITY_FROM_PB.get(msg.cobb_source),
        opll=domain.OpllMeasurement(
            opll.present, _f32(opll.occupying_ratio), _f32(opll.max_thickness_mm), tuple(opll.levels)
        )
        if msg.HasField("opll")
        else None,
    )


def to_domain(msg: pb.StudyAnalysis) -> domain.StudyAnalysis:
    """A StudyAnalysis message as the domain object ``analysis.report.format_analysis`` prints.

    Absent optional values become None, MODALITY_UNSPECIFIED becomes None, empty SEG/SR bytes None. What
    this client is too old to know is kept where it can be: an unknown notice code or series role becomes
    an ``UnknownCode`` holding the text; a result for an unknown modality is left out (logged). The
    ``request_id`` has no domain field: read it from the message.
    """
    results = [_modality_result(r) for r in msg.modalities]
    return domain.StudyAnalysis(
        study_instance_uid=msg.study_instance_uid,
        modalities=[r for r in results if r is not None],
        fused=_assessment(msg.fused) if msg.HasField("fused") else domain.Assessment(False, 0.0),
        spine=_spine(msg.spine),
        prototype_set_version=msg.prototype_set_version,
        models=[domain.ModelVersion(m.name, m.version) for m in msg.models],
        notices=[
            domain.Notice(_code(domain.NoticeCode, n.code), n.message, n.series_instance_uid or None)
            for n in msg.notices
        ],
        stage_seconds={name: _f32(seconds) for name, seconds in msg.stage_seconds.items()},
        dicom_seg=msg.dicom_seg or None,
        dicom_sr=msg.dicom_sr or None,
        disclosure=domain.Disclosure(msg.disclosure.trained_on, msg.disclosure.intended_use)
        if msg.HasField("disclosure")
        else None,
    )


# --------------------------------------------------------------------------------------------------------
# cspine analyze


def _modalities(text: str) -> list[int]:
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODALITY_OPTIONS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown modality {', '.join(unknown) or '(none)'}; choose from {','.join(MODALITY_OPTIONS)}"
        )
    return [MODALITY_OPTIONS[n] for n in dict.fromkeys(names)]


def _json(msg: pb.StudyAnalysis) -> str:
    """The message as JSON (proto field names, zeros and empty lists included), without the SEG and SR bytes."""
    shown = pb.StudyAnalysis()
    shown.CopyFrom(msg)
    shown.ClearField("dicom_seg")  # cleared before the conversion, which would base64-encode megabytes
    shown.ClearField("dicom_sr")
    fields = json_format.MessageToDict(
        shown, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    fields.pop("dicom_seg", None)
    fields.pop("dicom_sr", None)
    return json.dumps(fields, indent=2, ensure_ascii=False)


# What to try next, by status code, for the failures an integrator meets first.
HINTS = {
    "UNAVAILABLE": "is a cspine server listening on {args.server}? (--server, env CSPINE_SERVER)",
    "DEADLINE_EXCEEDED": "the call took longer than --timeout {args.timeout:g} s",
    "UNAUTHENTICATED": "the server wants a bearer token (--token, env CSPINE_TOKEN)",
}


DEFAULT_DATA_DIR = "~/.local/share/cspine"


def add_data_dir_argument(p: argparse.ArgumentParser, purpose: str) -> None:
    """``--data-dir`` (env CSPINE_DATA_DIR): where ``cspine serve`` keeps its data and generated tokens."""
    p.add_argument(
        "--data-dir",
        default=os.environ.get("CSPINE_DATA_DIR", DEFAULT_DATA_DIR),
        help=f"{purpose} (env CSPINE_DATA_DIR, default {DEFAULT_DATA_DIR})",
    )


def client_token(args: argparse.Namespace, role_name: str = "analyst", required: bool = True) -> str | None:
    """``--token`` if given, else the token of ``role_name`` (or a stronger one) that ``cspine serve`` generated
    in ``--data-dir``. None when there is none and not ``required`` (the server then says what it wants);
    otherwise ClientError UNAUTHENTICATED naming the file."""
    if args.token:
        return args.token
    from cspine.gateway.auth import TOKENS_FILE, Role, find_client_token

    data_dir = Path(args.data_dir).expanduser()
    token = find_client_token(data_dir, Role(role_name))
    if token is None and required:
        where = data_dir / TOKENS_FILE
        raise ClientError("UNAUTHENTICATED", f"no {role_name} token in {where}: pass --token (env CSPINE_TOKEN)")
    return token


def cmd_analyze(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from cspine.analysis.report import format_analysis

    want_seg = bool(args.seg or args.overlay)
    options = pb.AnalysisOptions(
        return_dicom_seg=want_seg, return_dicom_sr=bool(args.sr), modalities=args.modalities or []
    )
    bar = tqdm(desc="upload", unit="B", unit_scale=True, unit_divisor=1024, disable=True if args.quiet else None)
    try:
        result = analyze_paths(
            args.server,
            args.paths,
            options,
            timeout_s=args.timeout,
            token=client_token(args, required=False),
            progress=bar.update,
        )
    except ClientError as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        if exc.code in HINTS:
            print(f"cspine: {HINTS[exc.code].format(args=args)}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cspine: error: {exc}", file=sys.stderr)
        return 2
    finally:
        bar.close()

    if args.json:
        print(_json(result))
    else:
        print(format_analysis(to_domain(result)))
        print(f"request id {result.request_id}")
    said = sys.stderr if args.json else sys.stdout  # keep stdout pure JSON
    # The analysis is printed: from here on a failure is a one-line note on stderr, never a traceback or exit 2.
    for path, data in ((args.seg, result.dicom_seg), (args.sr, result.dicom_sr)):
        if path and data:
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                Path(path).write_bytes(data)
            except OSError as exc:
                print(f"cspine: {path} not written: {exc.strerror or type(exc).__name__}", file=sys.stderr)
            else:
                print(f"wrote {path} ({len(data) / 1e6:.2f} MB)", file=said)
    if args.sr and not result.dicom_sr:
        print(f"cspine: {_why_missing(result, 'SR')}: --sr not written", file=sys.stderr)
    if want_seg and not result.dicom_seg:
        print(f"cspine: {_why_missing(result, 'SEG')}: no --seg/--overlay", file=sys.stderr)
    elif args.overlay:
        from cspine.overlay import OverlayError, overlay_png

        try:
            print(f"wrote {overlay_png(result.dicom_seg, args.paths, Path(args.overlay))}", file=said)
        except OverlayError as exc:
            print(f"cspine: overlay not drawn: {exc}", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 — a picture must not hide the printed analysis behind a traceback
            print(f"cspine: overlay not drawn: unexpected {type(exc).__name__}", file=sys.stderr)
    return 0


def _why_missing(result: pb.StudyAnalysis, kind: str) -> str:
    """Why the server returned no DICOM ``kind`` (SEG, SR): its output_unavailable notice, on one line."""
    prefix = f"DICOM {kind} "
    notes = [n.message for n in result.notices if n.code == "output_unavailable" and n.message.startswith(prefix)]
    return " ".join(notes[0].split()) if notes else f"the server returned no DICOM {kind}"


def add_analyze_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``cspine analyze`` on the ``cspine`` command's subparsers."""
    p = subparsers.add_parser(
        "analyze",
        help="send a DICOM study to a cspine server and print its analysis",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Upload every DICOM Part-10 file under PATH… (one study: CT, MR and/or a lateral radiograph of the\n"
            "cervical spine) to a cspine server's AnalyzeStudy call and print the analysis: per modality the\n"
            "series used, lesions and class probabilities; the fused tumor assessment; canal, cord and disc per\n"
            "level, Cobb angle, OPLL; and notices (series skipped and why, modalities missing).\n"
            "\n"
            "Files that are not DICOM Part-10 (no 'DICM' at byte 128) are skipped; files over 3 MiB are sent in\n"
            "chunks. Results on cspine's SYNTHETIC phantom data are research output, not a diagnosis.\n"
            "\n"
            "exit status: 0 analysed; 2 not analysed: a PATH is missing or unreadable, or the server refused the\n"
            "study (its gRPC status code and message are printed, e.g. INVALID_ARGUMENT naming the instance and\n"
            "why) or could not be reached (UNAVAILABLE: is a server, e.g. `cspine serve`, listening on --server?)."
        ),
        epilog=(
            "examples:\n"
            "  cspine analyze ~/studies/patient-0042\n"
            "  cspine analyze study/ --modalities ct,xr --seg seg.dcm --sr sr.dcm --overlay tumor.png\n"
            "  CSPINE_SERVER=cspine.example.org:50051 cspine analyze study/ --json > analysis.json"
        ),
    )
    p.add_argument(
        "paths", nargs="+", metavar="PATH", help="DICOM files or folders of one study (searched recursively)"
    )
    p.add_argument(
        "--server",
        default=os.environ.get("CSPINE_SERVER") or DEFAULT_SERVER,
        metavar="ADDR",
        help=f"the cspine server, host:port (env CSPINE_SERVER; default {DEFAULT_SERVER})",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print the StudyAnalysis message as JSON (proto field names, zeros included) instead of the report; "
        "the SEG and SR bytes are left out (use --seg/--sr)",
    )
    p.add_argument("--seg", metavar="OUT.dcm", help="ask for the DICOM Segmentation and write it here")
    p.add_argument(
        "--sr", metavar="OUT.dcm", help="ask for the DICOM SR (TID 1500 measurement report) and write it here"
    )
    p.add_argument(
        "--overlay",
        metavar="OUT.png",
        help="ask for the DICOM Segmentation and draw it on the local source image with the most tumor (PNG)",
    )
    p.add_argument(
        "--modalities",
        type=_modalities,
        default=None,
        metavar="ct,mr,xr",
        help="analyse only these modalities (default: every modality in the study)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help=f"deadline of the whole call, upload included (default {DEFAULT_TIMEOUT_S:g})",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("CSPINE_TOKEN"),
        help="bearer token sent as 'authorization: Bearer TOKEN' (env CSPINE_TOKEN, which keeps it out of ps); "
        "default: the analyst token `cspine serve` generated in --data-dir",
    )
    add_data_dir_argument(p, "where to find the tokens `cspine serve` generated")
    p.add_argument("--quiet", action="store_true", help="no upload progress bar")
    p.set_defaults(func=cmd_analyze)
    return p
