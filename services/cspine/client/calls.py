"""The calls of cspine's API, one channel each: AnalyzeStudy and GetServiceInfo (SpineAnalysis); AddCase,
ListCases, GetPrototypeSet and RemoveCase (SupportSet). Each takes the server's address, a bearer token and
``tls`` (the files of a TLS channel; see channel.open_channel for when a channel is TLS) and raises
ClientError for a failed call."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import grpc

from cspine.client.channel import ClientError, Tls, bearer_metadata
from cspine.client.upload import DEFAULT_CHUNK_BYTES, case_messages, stream_call, upload_messages
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc


def analyze_paths(
    address: str,
    paths: Iterable[Path | str],
    options: pb.AnalysisOptions | None = None,
    *,
    timeout_s: float,
    token: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    progress: Callable[[int], None] | None = None,
    tls: Tls = Tls(),
) -> pb.StudyAnalysis:
    """Analyse the study in ``paths`` with one AnalyzeStudy call to the server at ``address``. ``progress``, when
    given, is called with the size of each message sent.

    Raises ClientError for a failed call, and the error itself when reading the files failed.
    """
    with tls.open(address) as channel:
        stub = pb_grpc.SpineAnalysisStub(channel)
        messages = upload_messages(paths, options, chunk_bytes)
        return stream_call(stub.AnalyzeStudy, messages, timeout_s=timeout_s, token=token, progress=progress)


def service_info(address: str, timeout_s: float, *, token: str | None = None, tls: Tls = Tls()) -> pb.ServiceInfo:
    """What the server at ``address`` runs: models, prototype set, labels and limits."""
    with tls.open(address) as channel:
        stub = pb_grpc.SpineAnalysisStub(channel)
        return _unary(stub.GetServiceInfo, pb.GetServiceInfoRequest(), timeout_s, token)


def add_case_paths(
    address: str,
    paths: Iterable[Path | str],
    header: spb.CaseHeader,
    *,
    timeout_s: float,
    token: str | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    tls: Tls = Tls(),
) -> spb.SupportCase:
    """Add the case in ``paths`` to the support set with one AddCase call (a curator's token)."""
    with tls.open(address) as channel:
        stub = spb_grpc.SupportSetStub(channel)
        return stream_call(stub.AddCase, case_messages(paths, header, chunk_bytes), timeout_s=timeout_s, token=token)


def list_cases(
    address: str, version: int = 0, *, timeout_s: float, token: str | None, tls: Tls = Tls()
) -> spb.ListCasesResponse:
    """The cases of prototype-set ``version`` (0: the current one)."""
    with tls.open(address) as channel:
        stub = spb_grpc.SupportSetStub(channel)
        return _unary(stub.ListCases, spb.ListCasesRequest(version=version), timeout_s, token)


def get_prototype_set(
    address: str, version: int = 0, *, timeout_s: float, token: str | None, tls: Tls = Tls()
) -> spb.PrototypeSetInfo:
    """Prototype-set ``version`` (0: the current one)."""
    with tls.open(address) as channel:
        stub = spb_grpc.SupportSetStub(channel)
        return _unary(stub.GetPrototypeSet, spb.GetPrototypeSetRequest(version=version), timeout_s, token)


def remove_case(
    address: str, case_id: int, *, timeout_s: float, token: str | None, tls: Tls = Tls()
) -> spb.PrototypeSetInfo:
    """Remove case ``case_id`` from the support set (a curator's token); the new version."""
    with tls.open(address) as channel:
        stub = spb_grpc.SupportSetStub(channel)
        return _unary(stub.RemoveCase, spb.RemoveCaseRequest(case_id=case_id), timeout_s, token)


def _unary(method, request, timeout_s: float, token: str | None):
    try:
        return method(request, timeout=timeout_s, metadata=bearer_metadata(token))
    except grpc.RpcError as exc:
        raise ClientError.from_rpc(exc) from None
