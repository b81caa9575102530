"""The request streams of the uploading calls, AnalyzeStudy (StudyUpload) and AddCase (CaseUpload): the lead
message, then every DICOM Part-10 file whole or in ordered chunks, read as the stream is consumed; and one
client-streaming call fed by such a stream, whose failures to read a file are the caller's, not grpc's."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc

from cspine.client.channel import ClientError, bearer_metadata
from cspine.client.files import is_part10, iter_files
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb

logger = logging.getLogger(__name__)

# gRPC refuses messages over 4 MiB by default; a chunk of 3 MiB leaves room for the envelope.
DEFAULT_CHUNK_BYTES = 3 * 1024 * 1024


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
    ``message`` and ``lead_field`` make AddCase's stream instead (case_messages)."""
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


def case_messages(
    paths: Iterable[Path | str], header: spb.CaseHeader, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[spb.CaseUpload]:
    """The AddCase request stream: ``header`` first, then the case's DICOM files as upload_messages sends them."""
    return upload_messages(paths, header, chunk_bytes, message=spb.CaseUpload, lead_field="header")


class _Upload:
    """The request stream of one call. When reading the files fails (a path that does not exist, a file that
    cannot be read) the call is cancelled and the error kept for the caller: left to grpc, it would become
    UNKNOWN "Exception iterating requests!" with a logged traceback."""

    def __init__(self, messages: Iterator, progress: Callable[[int], None] | None) -> None:
        self._messages = messages
        self._progress = progress
        self._call: grpc.Future | None = None
        self._started = threading.Event()
        self.error: Exception | None = None

    def start(self, call: grpc.Future | None) -> None:
        self._call = call
        self._started.set()

    def __iter__(self) -> Iterator:
        self._started.wait()  # grpc consumes the stream in its own thread, maybe before start() was called
        if self._call is None:
            return
        try:
            for message in self._messages:
                yield message
                if self._progress is not None:
                    self._progress(message.ByteSize())
        except Exception as exc:  # handed to the caller by stream_call
            self.error = exc
            self._call.cancel()


def stream_call(method, messages: Iterator, *, timeout_s: float, token: str | None, progress=None):
    """One client-streaming call fed by ``messages``; its answer. ClientError for a failed call; the error itself
    when reading the files failed (see _Upload)."""
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
