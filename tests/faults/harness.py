"""The fault-injection harness: a load driver (clients calling one RPC in a loop on their own threads, every
outcome recorded), recovery timing, and the report row each scenario appends to the JSON report that
``report.py`` renders as the table of docs/reliability.md.

An outcome is one of three. **ok**: the call answered. **refused**: cspine answered with a status code — its
message ends with the call's request id, or the code is one no transport failure produces. **lost**: no
answer within the client's deadline, a connection dropped without cspine's status, or an AddCase answered
ok whose case is missing from ListCases afterwards (``Load.check_cases``). Every scenario requires lost == 0.
"""

from __future__ import annotations

import io
import json
import os
import platform
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path

import grpc
import pydicom
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from report import DEFAULT_REPORT, REPORT_ENV

from cspine.client import bearer_metadata
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 << 20)]
# Codes a broken connection or an expired client deadline also produce: without cspine's request id in the
# message they are not an answer from cspine.
TRANSPORT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)

# One call of a client: (channel, sequence number, metadata, deadline in seconds) -> the response.
Call = Callable[[grpc.Channel, int, Sequence[tuple[str, str]], float], object]


@dataclass(frozen=True)
class Outcome:
    rpc: str
    client: int
    started: float  # time.monotonic()
    ended: float
    result: str  # "ok", "refused" or "lost"
    code: str  # the status code's name; "OK" when ok
    detail: str = ""  # the refusal's message, or why the call counts as lost
    case_id: int | None = None  # what an AddCase answered


def classify(error: grpc.RpcError, request_id: str) -> tuple[str, str, str]:
    """(result, code, detail) of a failed call."""
    code, details = error.code(), error.details() or ""
    if details.endswith(f"(request {request_id})") or code not in TRANSPORT_CODES:
        return "refused", code.name, details
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "lost", code.name, "no answer within the deadline"
    return "lost", code.name, f"dropped without a status from cspine: {details}"


@dataclass
class _Clients:
    rpc: str
    call: Call
    count: int
    deadline_s: float
    pause_s: float
    after: str | None = None  # the mark at which these clients start; None: with the load


@dataclass
class Load:
    """Clients calling cspine at ``address`` in a loop until ``stop()`` (or the end of the ``with`` block):
    ``add()`` them, start, ``mark()`` when a fault is injected and removed, then read ``summary()`` and
    ``recovery_s()``. Each client has its own channel; after an answer it pauses ``pause_s``, after a refusal
    or a loss ``retry_s``."""

    address: str
    token: str
    retry_s: float = 0.25
    outcomes: list[Outcome] = field(default_factory=list)
    marks: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._groups: list[_Clients] = []
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._errors: list[BaseException] = []
        self._missing: list[Outcome] = []

    def add(
        self,
        rpc: str,
        call: Call,
        clients: int = 1,
        *,
        deadline_s: float = 60.0,
        pause_s: float = 0.0,
        after: str | None = None,
    ) -> None:
        """``after``: the clients start when ``mark(after)`` is called (e.g. once a fault holds), not with the load."""
        self._groups.append(_Clients(rpc, call, clients, deadline_s, pause_s, after))

    def describe(self) -> str:
        """The load in words, for the report: '2 × AddCase, 1 × AnalyzeStudy'."""
        return ", ".join(f"{g.count} × {g.rpc}" for g in self._groups)

    def __enter__(self) -> Load:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self.marks["start"] = time.monotonic()
        for group in self._groups:
            for index in range(group.count):
                thread = threading.Thread(target=self._run, args=(group, index), daemon=True)
                thread.start()
                self._threads.append(thread)

    def stop(self) -> None:
        """Let every call in flight end (within its deadline) and stop the clients."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=max(g.deadline_s for g in self._groups) + 10)
        self.marks.setdefault("stop", time.monotonic())
        if self._errors:
            raise self._errors[0]

    def mark(self, event: str) -> float:
        """Note when something happened (``fault``, ``removed`` …), for recovery_s and the outcomes' phases."""
        self.marks[event] = now = time.monotonic()
        return now

    def _run(self, group: _Clients, index: int) -> None:
        channel = grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        try:
            while group.after is not None and group.after not in self.marks:
                if self._stopping.wait(0.02):
                    return
            sequence = 0
            while not self._stopping.is_set():
                sequence += 1
                request_id = f"fault-{group.rpc}-{index}-{sequence}"
                metadata = (*bearer_metadata(self.token), ("x-request-id", request_id))
                started = time.monotonic()
                try:
                    response = group.call(channel, sequence, metadata, group.deadline_s)
                except grpc.RpcError as error:
                    result, code, detail = classify(error, request_id)
                    outcome = Outcome(group.rpc, index, started, time.monotonic(), result, code, detail)
                else:
                    case_id = response.case_id if isinstance(response, spb.SupportCase) else None
                    outcome = Outcome(group.rpc, index, started, time.monotonic(), "ok", "OK", case_id=case_id)
                with self._lock:
                    self.outcomes.append(outcome)
                self._stopping.wait(group.pause_s if outcome.result == "ok" else self.retry_s)
        except BaseException as error:  # a bug in a call function: stop() raises it
            self._errors.append(error)
        finally:
            channel.close()

    # -- after the run --------------------------------------------------------------------------------

    def acknowledged(self) -> list[int]:
        """The case ids AddCase answered ok."""
        return [o.case_id for o in self.outcomes if o.result == "ok" and o.case_id is not None]

    def check_cases(self, listed: Iterable[int]) -> list[int]:
        """Counts every acknowledged case missing from ``listed`` (ListCases' ids) as lost; returns them."""
        present = set(listed)
        missing = [o for o in self.outcomes if o.result == "ok" and o.case_id is not None and o.case_id not in present]
        self._missing = [
            Outcome(o.rpc, o.client, o.started, o.ended, "lost", "OK", "missing from ListCases", o.case_id)
            for o in missing
        ]
        return [o.case_id for o in missing]

    def between(self, rpc: str, first: str, last: str) -> list[Outcome]:
        """The outcomes of ``rpc`` calls that started and ended between two marks."""
        low, high = self.marks[first], self.marks[last]
        return [o for o in self.outcomes if o.rpc == rpc and low <= o.started and o.ended <= high]

    def during(self, rpc: str, first: str, last: str) -> list[Outcome]:
        """The outcomes of ``rpc`` calls that were under way at some moment between two marks."""
        low, high = self.marks[first], self.marks[last]
        return [o for o in self.outcomes if o.rpc == rpc and o.started <= high and o.ended >= low]

    def recovery_s(self, rpc: str, since: str) -> float | None:
        """Seconds from the mark ``since`` (the fault removed) to the first ok answer of an ``rpc`` call that
        started after it; None when there is none."""
        start = self.marks[since]
        ended = [o.ended for o in self.outcomes if o.rpc == rpc and o.result == "ok" and o.started >= start]
        return min(ended) - start if ended else None

    def wait_ok(self, rpc: str, since: str, timeout_s: float) -> float | None:
        """Waits up to ``timeout_s`` for recovery_s(rpc, since); returns it."""
        deadline = time.monotonic() + timeout_s
        while (recovered := self.recovery_s(rpc, since)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return recovered

    def summary(self) -> Summary:
        outcomes = self.outcomes + self._missing
        answered = Counter(sorted(o.rpc for o in self.outcomes if o.result == "ok"))
        refused: dict[str, Counter] = {}
        lost: dict[str, Counter] = {}
        for o in outcomes:
            if o.result == "refused":
                refused.setdefault(o.rpc, Counter())[o.code] += 1
            elif o.result == "lost":
                lost.setdefault(o.rpc, Counter())[o.detail.split(":")[0]] += 1
        seconds: dict[str, dict[str, float]] = {}
        for o in sorted(self.outcomes, key=lambda o: o.ended - o.started):
            if o.result != "lost":
                taken = seconds.setdefault(o.rpc, {})
                taken[f"{o.result}_max"] = round(o.ended - o.started, 2)
        duration = self.marks.get("stop", time.monotonic()) - self.marks["start"]
        return Summary(
            calls=len(self.outcomes),
            duration_s=round(duration, 1),
            answered=dict(answered),
            refused={rpc: dict(codes) for rpc, codes in refused.items()},
            lost={rpc: dict(reasons) for rpc, reasons in lost.items()},
            seconds=seconds,
        )


@dataclass(frozen=True)
class Summary:
    calls: int
    duration_s: float
    answered: dict[str, int]  # rpc -> calls answered ok
    refused: dict[str, dict[str, int]]  # rpc -> status code -> calls
    lost: dict[str, dict[str, int]]  # rpc -> reason -> calls
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)  # rpc -> "ok_max"/"refused_max" -> s

    @property
    def lost_total(self) -> int:
        return sum(n for reasons in self.lost.values() for n in reasons.values())

    def refused_codes(self, rpc: str) -> set[str]:
        return set(self.refused.get(rpc, {}))


# -- calls ------------------------------------------------------------------------------------------------


def analyze_call(paths: Sequence[Path]) -> Call:
    """AnalyzeStudy of one study (the files of ``paths``), the same each time."""
    messages = [pb.StudyUpload(dicom_instance=Path(p).read_bytes()) for p in paths]

    def call(channel, sequence, metadata, deadline_s):
        return pb_grpc.SpineAnalysisStub(channel).AnalyzeStudy(iter(messages), metadata=metadata, timeout=deadline_s)

    return call


def add_case_call(paths: Sequence[Path], label: str) -> Call:
    """AddCase of the study of ``paths`` under a new StudyInstanceUID each time (cspine refuses a study that is
    already a case), so every call adds one case."""
    originals = [Path(p).read_bytes() for p in paths]

    def call(channel, sequence, metadata, deadline_s):
        study_uid = f"2.25.{uuid.uuid4().int}"
        header = spb.CaseHeader(label=label, pathology_reference="SYNTHETIC fault-injection case")
        messages = [spb.CaseUpload(header=header)]
        messages += [spb.CaseUpload(dicom_instance=with_study_uid(raw, study_uid)) for raw in originals]
        return spb_grpc.SupportSetStub(channel).AddCase(iter(messages), metadata=metadata, timeout=deadline_s)

    return call


def list_cases_call() -> Call:
    def call(channel, sequence, metadata, deadline_s):
        return spb_grpc.SupportSetStub(channel).ListCases(spb.ListCasesRequest(), metadata=metadata, timeout=deadline_s)

    return call


def with_study_uid(raw: bytes, study_uid: str) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(raw))
    dataset.StudyInstanceUID = study_uid
    out = io.BytesIO()
    dataset.save_as(out)
    return out.getvalue()


def listed_case_ids(address: str, token: str, timeout_s: float = 30.0) -> list[int]:
    """The case ids of the current support set, by ListCases."""
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        answer = list_cases_call()(channel, 0, bearer_metadata(token), timeout_s)
    return [case.case_id for case in answer.cases]


def health_status(address: str, service: str = "") -> int | None:
    """The gRPC health status of ``service`` ('' for the server), None when there is no answer."""
    with grpc.insecure_channel(address) as channel:
        try:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=2).status
        except grpc.RpcError:
            return None


def time_until(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> float | None:
    """Seconds until ``predicate()`` holds (polled), None when it does not within ``timeout_s``: a recovery
    timer for what no load client measures (health SERVING again, a probe call)."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout_s:
            return None
        time.sleep(interval_s)


# -- the report -------------------------------------------------------------------------------------------


def report_path() -> Path:
    return Path(os.environ.get(REPORT_ENV) or DEFAULT_REPORT)


@dataclass(frozen=True)
class Row:
    """One scenario's line of the reliability table."""

    scenario: str
    fault: str
    load: str
    summary: Summary
    recovery_s: float | None
    recovery: str  # what was timed: "restart → first ok AddCase"
    measured: str = field(
        default_factory=lambda: f"{date.today().isoformat()} on {os.cpu_count()} CPU cores ({platform.machine()})"
    )


def write_row(row: Row, path: Path | None = None) -> Path:
    """Puts ``row`` in the JSON report (a list of rows), in place of an earlier row of the same scenario."""
    path = path or report_path()
    rows = json.loads(path.read_text()) if path.is_file() else []
    entry = asdict(row)
    entry["summary"]["lost_total"] = row.summary.lost_total
    places = [i for i, r in enumerate(rows) if r["scenario"] == row.scenario]
    if places:
        rows[places[0]] = entry
    else:
        rows.append(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")
    return path


def study_files(case, *modalities: str) -> list:
    """A phantom case's DICOM files of the given modality folders (ct, mr, xr; all three by default)."""
    return sorted(p for folder in modalities or ("ct", "mr", "xr") for p in (case.path / folder).glob("*.dcm"))


def metric(port: int, name: str, **labels: str) -> float | None:
    """One sample of the gateway's Prometheus metrics, None when it is not there."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None
