"""Access control of the gateway: the least role each RPC needs, the caller of the current call, and the
interceptor that admits a call by its bearer token (tokens.py) and role; then TLS for the server and the rule
for where it may listen."""

from __future__ import annotations

import contextvars
import ipaddress
import logging
from collections.abc import Iterable
from pathlib import Path

import grpc

from cspine.client.channel import read_pem
from cspine.errors import PermissionDeniedError, UnauthenticatedError
from cspine.gateway.handlers import behaviour_of, bind, kind_of, with_behaviour
from cspine.gateway.interceptors import NO_REQUEST_ID, REQUEST_ID, request_id_of
from cspine.gateway.tokens import Caller, Role, TokenStore

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost"})

# The least role each RPC needs, by full method name or by service ("/package.Service/"); None: no token.
# Anything not listed needs a curator, so an RPC added to a service without an entry here is safe.
MINIMUM_ROLE: dict[str, Role | None] = {
    "/grpc.health.v1.Health/": None,
    "/grpc.reflection.v1alpha.ServerReflection/": None,
    "/grpc.reflection.v1.ServerReflection/": None,
    "/cspine.v1.SpineAnalysis/": Role.ANALYST,
    "/cspine.v1.SupportSet/ListCases": Role.ANALYST,
    "/cspine.v1.SupportSet/GetPrototypeSet": Role.ANALYST,
    "/cspine.v1.SupportSet/AddCase": Role.CURATOR,
    "/cspine.v1.SupportSet/RemoveCase": Role.CURATOR,
}
DEFAULT_MINIMUM_ROLE = Role.CURATOR


def minimum_role(method: str) -> Role | None:
    """The least role that may call ``method``; None where no token is needed (health, reflection)."""
    service = method[: method.rfind("/") + 1]
    for key in (method, service):
        if key in MINIMUM_ROLE:
            return MINIMUM_ROLE[key]
    return DEFAULT_MINIMUM_ROLE


def allows(role: Role, method: str) -> bool:
    """Whether ``role`` may call ``method`` (``/package.Service/Method``)."""
    needed = minimum_role(method)
    return needed is None or role.rank >= needed.rank


# ------------------------------------------------------------------------------------------------------
# The caller of the current call

CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller() -> Caller | None:
    return CALLER.get()


def caller_identity() -> str:
    """``role:fingerprint`` of the current call's caller (``"anonymous"`` outside an authenticated call)."""
    caller = CALLER.get()
    return "anonymous" if caller is None else caller.identity


def require_role(role: Role, action: str) -> Caller:
    """The current caller, where its role ranks at least ``role``; for checks inside a servicer or store."""
    caller = CALLER.get()
    if caller is None:
        raise UnauthenticatedError(f"{action} needs an authenticated caller")
    if caller.role.rank < role.rank:
        raise PermissionDeniedError(f"role {caller.role.value} may not {action}")
    return caller


# ------------------------------------------------------------------------------------------------------
# The interceptor

MISSING_TOKEN = "a bearer token is required"
INVALID_TOKEN = "the token is not valid"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the one ``authorization: Bearer TOKEN`` entry of ``metadata``; None where there is
    none, more than one, or it is malformed."""
    values = [value for key, value in metadata or () if key.lower() == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None
    return token


def _refusal(code: grpc.StatusCode, details: str, metadata, *log: object):
    """A behaviour that refuses the call with ``details`` and its request id, as every error of the gateway
    ends, and logs ``log`` (a message and its arguments) under that id."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        request_id, token = REQUEST_ID.get(), None
        if request_id == NO_REQUEST_ID:  # outside cspine's services the gateway's interceptor gave it none
            request_id = request_id_of(dict(metadata or ()))
            token = REQUEST_ID.set(request_id)
            await context.send_initial_metadata((("x-request-id", request_id),))
        try:
            logger.info(*log)
            await context.abort(code, f"{details} (request {request_id})")
        finally:
            if token is not None:
                REQUEST_ID.reset(token)

    return refuse


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Admits a call when its bearer token is known and its role allows the method (health and reflection
    need none); refuses it otherwise, before the servicer sees it. Admitted calls run with ``CALLER`` set."""

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        needed = minimum_role(method)
        if handler is None or needed is None:
            return handler  # an unknown method (UNIMPLEMENTED), or one open to all
        metadata = handler_call_details.invocation_metadata
        token = bearer_token(metadata)
        caller = None if token is None else self.tokens.caller_of(token)
        if caller is None:
            reason = MISSING_TOKEN if token is None else INVALID_TOKEN
            # The refusal reads no request: a raw-bytes handler, so nothing from an unknown caller is parsed.
            refuse = _refusal(grpc.StatusCode.UNAUTHENTICATED, reason, metadata, "refused %s: %s", method, reason)
            return kind_of(handler).factory(refuse)
        if caller.role.rank < needed.rank:
            details = f"role {caller.role.value} may not call {method}"
            log = ("refused %s to %s: role %s", method, caller.identity, caller.role.value)
            return kind_of(handler).factory(_refusal(grpc.StatusCode.PERMISSION_DENIED, details, metadata, *log))
        return with_behaviour(handler, bind(behaviour_of(handler), CALLER, caller))


# ------------------------------------------------------------------------------------------------------
# TLS and where to listen


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for the server; with ``client_ca``, clients must also show a certificate that CA signed. (A client's
    TLS is cspine.client's.)"""
    pair = (read_pem(key, "TLS private key"), read_pem(cert, "TLS certificate"))
    ca = None if client_ca is None else read_pem(client_ca, "client CA certificate")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]")
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind_address(host: str, tokens_configured: bool, tls: bool = False) -> None:
    """The embedded default (generated tokens, no tokens file given) listens on loopback only; beyond loopback
    without TLS, tokens and DICOM travel in plaintext: allowed (a TLS-terminating proxy may stand in front), and
    said in the log."""
    if not tokens_configured and not is_loopback(host):
        raise ValueError(
            f"without --tokens the gateway listens on loopback only (127.0.0.1, ::1, localhost), not {host!r}: "
            "pass --tokens FILE (and a TLS certificate) to serve other machines"
        )
    if not tls and not is_loopback(host):
        logger.warning(
            "the gateway listens on %s without TLS: bearer tokens and DICOM travel in plaintext; pass --tls-cert "
            "and --tls-key unless a TLS-terminating proxy stands in front",
            host,
        )
