"""An upload stream (AnalyzeStudy's StudyUpload, AddCase's CaseUpload) → the study's instances, checked as
they arrive: the leading message (options, header) only first, chunks in order and complete, the study's
instance and byte limits enforced before more is read, and the upload's deadline and idle timeout kept, so a
slow or stalled client cannot hold its study's slot for longer than they allow."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from cspine.config import IngestLimits
from cspine.errors import DeadlineExceededError, EmptyStudyError, InvalidInputError, StudyTooLargeError
from cspine.v1 import analysis_pb2 as pb


class UploadError(InvalidInputError):
    """The upload stream is not well formed (the message says where)."""


class UploadTimeoutError(DeadlineExceededError):
    """The upload was too slow: ``limit`` is ``idle`` (a gap between messages) or ``deadline`` (the whole)."""

    def __init__(self, limit: str, message: str) -> None:
        self.limit = limit
        super().__init__(message)


@dataclass(frozen=True)
class UploadTimeouts:
    """How long one upload may take, in seconds: the whole of it, counted from when reading starts (its
    study's slot is taken), and the longest wait for its next message (the first included)."""

    deadline_s: float = 600.0
    idle_s: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.idle_s <= self.deadline_s:
            raise ValueError(
                f"the idle timeout must be > 0 and at most the upload deadline, got idle {self.idle_s} s and "
                f"deadline {self.deadline_s} s"
            )


@dataclass
class Upload:
    instances: list[tuple[str, bytes]] = field(default_factory=list)
    lead: Any = None  # the leading message (AnalysisOptions, CaseHeader) when one was sent
    received_bytes: int = 0


class _Assembler:
    def __init__(self, limits: IngestLimits, lead: str) -> None:
        self.limits = limits
        self.lead = lead  # the oneof field that may only come first
        self.upload = Upload()
        self.messages = 0
        self.chunked = 0  # chunked instances completed so far
        self.partial: bytearray | None = None  # the chunked instance being received

    def _add_bytes(self, count: int) -> None:
        self.upload.received_bytes += count
        if self.upload.received_bytes > self.limits.max_study_bytes:
            raise StudyTooLargeError(f"the study is larger than the limit of {self.limits.max_study_bytes} bytes")

    def _add_instance(self, name: str, data: bytes) -> None:
        if len(self.upload.instances) >= self.limits.max_instances:
            raise StudyTooLargeError(f"the study has more than the limit of {self.limits.max_instances} instances")
        self.upload.instances.append((name, data))

    def take(self, message: Any) -> None:
        self.messages += 1
        part = message.WhichOneof("part")
        if part == self.lead:
            if self.messages != 1:
                kind = type(getattr(message, part)).__name__
                raise UploadError(f"message {self.messages}: {kind} may only be the first message")
            self.upload.lead = getattr(message, part)
        elif part == "dicom_instance":
            if self.partial is not None:
                raise UploadError(
                    f"message {self.messages}: a whole instance arrived before chunked instance "
                    f"{self.chunked} was complete (last = true)"
                )
            self._add_bytes(len(message.dicom_instance))
            self._add_instance(f"#{len(self.upload.instances) + 1}", message.dicom_instance)
        elif part == "chunk":
            self._chunk(message.chunk)
        else:
            raise UploadError(f"message {self.messages} is empty: it holds no {self.lead}, instance or chunk")

    def _chunk(self, chunk: pb.DicomChunk) -> None:
        where = f"message {self.messages} (chunked instance {chunk.instance_index}, offset {chunk.offset})"
        if chunk.instance_index != self.chunked:
            raise UploadError(f"{where}: chunks out of order, expected chunked instance {self.chunked}")
        expected = 0 if self.partial is None else len(self.partial)
        if chunk.offset != expected:
            raise UploadError(f"{where}: chunks out of order, expected offset {expected}")
        if not chunk.data:
            raise UploadError(f"{where}: the chunk holds no data")
        self._add_bytes(len(chunk.data))
        if self.partial is None:
            self.partial = bytearray()
        self.partial += chunk.data
        if chunk.last:
            self._add_instance(f"#{len(self.upload.instances) + 1}", bytes(self.partial))
            self.partial = None
            self.chunked += 1

    def finish(self) -> Upload:
        if self.partial is not None:
            raise UploadError(
                f"chunked instance {self.chunked} is incomplete: the stream ended after {len(self.partial)} bytes "
                "without a chunk marked last"
            )
        if not self.upload.instances:
            raise EmptyStudyError("the upload holds no DICOM instance")
        return self.upload


async def read_upload(
    messages: AsyncIterator[Any],
    limits: IngestLimits,
    lead: str = "options",
    timeouts: UploadTimeouts = UploadTimeouts(),
) -> Upload:
    """Read the whole upload stream into instances named by their position (``#1``, ``#2`` …); ``lead`` is
    the oneof field that may come first (``options`` of a StudyUpload, ``header`` of a CaseUpload). An
    upload that is not complete within ``timeouts.deadline_s``, or sends nothing for ``timeouts.idle_s``,
    raises ``UploadTimeoutError`` (→ DEADLINE_EXCEEDED); the read it was waiting in is cancelled."""
    assembler = _Assembler(limits, lead)
    loop = asyncio.get_running_loop()
    end = loop.time() + timeouts.deadline_s
    iterator = aiter(messages)
    while True:
        left = end - loop.time()
        wait = min(timeouts.idle_s, left)
        try:
            async with asyncio.timeout(max(wait, 0.0)):
                message = await anext(iterator)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise _timeout(timeouts, assembler, idle=timeouts.idle_s <= left) from None
        assembler.take(message)
    return assembler.finish()


def _timeout(timeouts: UploadTimeouts, assembler: _Assembler, idle: bool) -> UploadTimeoutError:
    received = f"{assembler.messages} messages, {assembler.upload.received_bytes} bytes of DICOM received"
    if idle:
        after = f"after message {assembler.messages}" if assembler.messages else "before its first message"
        return UploadTimeoutError(
            "idle", f"the upload sent nothing for {timeouts.idle_s:g} s {after} (the idle timeout; {received})"
        )
    return UploadTimeoutError(
        "deadline", f"the upload was not complete within the upload deadline of {timeouts.deadline_s:g} s ({received})"
    )
