"""The bearer tokens the tests' in-process gateways accept, the client interceptor that sends one on every
call, and the metadata for a ``cspine serve`` that wrote its own tokens into its data directory."""

from __future__ import annotations

from pathlib import Path

import grpc

from cspine.client import bearer_metadata
from cspine.gateway.tokens import Role, TokenStore, find_client_token

ANALYST_TOKEN = "analyst-token-for-tests-0001"
CURATOR_TOKEN = "curator-token-for-tests-0001"
TOKENS = TokenStore.from_pairs([("analyst", ANALYST_TOKEN), ("curator", CURATOR_TOKEN)])


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Sends ``authorization: Bearer TOKEN`` on every call of a channel."""

    def __init__(self, token: str) -> None:
        self.metadata = bearer_metadata(token)

    def _details(self, details):
        metadata = tuple(details.metadata or ()) + self.metadata
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method, self.timeout, self.credentials = details.method, details.timeout, details.credentials
        self.wait_for_ready, self.compression = details.wait_for_ready, details.compression
        self.metadata = metadata


def served_token(data_dir: Path, role: Role = Role.ANALYST) -> str:
    """The ``role`` token a ``cspine serve`` on ``data_dir`` generated at its first start."""
    token = find_client_token(data_dir, role)
    assert token, f"no {role.value} token in {data_dir}"
    return token


def served_metadata(data_dir: Path, role: Role = Role.ANALYST) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying :func:`served_token`."""
    return bearer_metadata(served_token(data_dir, role))
