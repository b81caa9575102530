"""Access control of the gateway: bearer tokens mapped to roles (only their SHA-256 hashes are kept), a
table of the least role each RPC needs, the interceptor that enforces both, the embedded default's
generated tokens file, and TLS credentials for server and clients."""

from __future__ import annotations

import contextvars
import enum
import hashlib
import hmac
import inspect
import ipaddress
import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from cspine.errors import PermissionDeniedError, UnauthenticatedError
from cspine.gateway.interceptors import NO_REQUEST_ID, REQUEST_ID, request_id_of

logger = logging.getLogger(__name__)

TOKENS_FILE = "tokens"  # in the data directory: the embedded default's generated tokens
MIN_TOKEN_LENGTH = 16
DIGEST_PREFIX = "sha256:"  # a tokens file may hold a token's hash instead of the token itself
LOOPBACK_NAMES = frozenset({"localhost"})


class Role(enum.Enum):
    """What a token may do. Each role may do everything the roles ranked below it may."""

    ANALYST = "analyst"  # analyses studies, reads the support set
    CURATOR = "curator"  # also adds cases to and removes them from the support set

    @property
    def rank(self) -> int:
        return RANK[self]

    def allows(self, method: str) -> bool:
        """Whether this role may call ``method`` (``/package.Service/Method``)."""
        needed = minimum_role(method)
        return needed is None or self.rank >= needed.rank


RANK = {Role.ANALYST: 1, Role.CURATOR: 2}

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


# ------------------------------------------------------------------------------------------------------
# Tokens


def digest_of(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Caller:
    """Who makes the current call: a role and a short fingerprint of the token's hash (never the token)."""

    role: Role
    fingerprint: str  # the first 8 hex digits of the token's SHA-256

    @property
    def identity(self) -> str:
        return f"{self.role.value}:{self.fingerprint}"


def check_token(token: str) -> str | None:
    """Why ``token`` cannot be a bearer token, or None. The reason never contains the token."""
    if len(token) < MIN_TOKEN_LENGTH:
        return f"the token is shorter than {MIN_TOKEN_LENGTH} characters"
    if not (token.isascii() and token.isprintable()) or any(c.isspace() for c in token):
        return "the token must be printable ASCII without spaces"
    return None


@dataclass(frozen=True)
class _Line:
    """One entry of a tokens file: its line number, role, hash, and the token where the file holds it."""

    number: int
    role: Role
    digest: bytes
    token: str | None


def _parse_tokens_file(path: Path) -> Iterator[_Line]:
    """The entries of a ``ROLE TOKEN`` file (``ROLE sha256:HEX`` for a hash); ValueError names the line,
    never its token."""
    roles = ", ".join(role.value for role in Role)
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{path}, line {number}: expected 'ROLE TOKEN', found {len(fields)} fields")
        role_name, token = fields
        try:
            role = Role(role_name.lower())
        except ValueError:  # not named: a line written the wrong way round would show its token here
            raise ValueError(f"{path}, line {number}: unknown role (expected one of {roles})") from None
        if token.startswith(DIGEST_PREFIX):
            try:
                digest = bytes.fromhex(token[len(DIGEST_PREFIX) :])
            except ValueError:
                digest = b""
            if len(digest) != hashlib.sha256().digest_size:
                raise ValueError(f"{path}, line {number}: {DIGEST_PREFIX} must be followed by 64 hex digits")
            yield _Line(number, role, digest, None)
            continue
        problem = check_token(token)
        if problem is not None:
            raise ValueError(f"{path}, line {number}: {problem}")
        yield _Line(number, role, digest_of(token), token)


class TokenStore:
    """Bearer tokens and their roles, held only as SHA-256 hashes."""

    def __init__(self, entries: Iterable[tuple[bytes, Role]]) -> None:
        self._entries = tuple(entries)
        if not self._entries:
            raise ValueError("no tokens: every call but health would be refused")

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[Role | str, str]]) -> TokenStore:
        """From (role, token) pairs; a role may be given by name (``"analyst"``)."""
        entries = []
        seen: dict[bytes, int] = {}
        for number, (role, token) in enumerate(pairs, start=1):
            problem = check_token(token)
            if problem is not None:
                raise ValueError(f"pair {number}: {problem}")
            digest = digest_of(token)
            if digest in seen:
                raise ValueError(f"pair {number}: the same token as pair {seen[digest]}")
            seen[digest] = number
            entries.append((digest, Role(role)))
        return cls(entries)

    @classmethod
    def from_file(cls, path: Path | str) -> TokenStore:
        """From a file of ``ROLE TOKEN`` lines (``ROLE sha256:HEX`` keeps only the hash on the server);
        blank lines and ``#`` comments are allowed."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"tokens file {path} does not exist")
        if path.stat().st_mode & 0o077:
            logger.warning("tokens file %s can be read by other users: chmod 600 it", path)
        seen: dict[bytes, int] = {}
        entries = []
        for line in _parse_tokens_file(path):
            if line.digest in seen:
                raise ValueError(f"{path}, line {line.number}: the same token as line {seen[line.digest]}")
            seen[line.digest] = line.number
            entries.append((line.digest, line.role))
        if not entries:
            raise ValueError(f"tokens file {path} holds no tokens")
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def caller_of(self, token: str) -> Caller | None:
        """The caller that ``token`` identifies, or None. Every entry is compared, in constant time, so the
        time taken does not tell which one (if any) matched."""
        digest = digest_of(token)
        found = None
        for entry, role in self._entries:
            if hmac.compare_digest(entry, digest):
                found = role
        return None if found is None else Caller(found, digest.hex()[:8])

    def role_of(self, token: str) -> Role | None:
        caller = self.caller_of(token)
        return None if caller is None else caller.role


# ------------------------------------------------------------------------------------------------------
# The embedded default's tokens


def ensure_default_tokens(data_dir: Path) -> tuple[TokenStore, dict[Role, str] | None]:
    """The tokens of ``data_dir/tokens``; made on first use, one per role, and then (only then) returned in
    plain text as well, for the caller to show once."""
    path = Path(data_dir) / TOKENS_FILE
    if path.exists():
        return TokenStore.from_file(path), None
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = {role: secrets.token_urlsafe(32) for role in Role}
    text = "".join(
        [
            "# cspine access tokens, one 'ROLE TOKEN' per line. Keep this file private (mode 0600).\n",
            *(f"{role.value} {token}\n" for role, token in tokens.items()),
        ]
    )
    if not _create_private_file(path, text):  # another process made it first: its tokens count
        return TokenStore.from_file(path), None
    logger.info("generated access tokens in %s", path)
    return TokenStore.from_pairs(tokens.items()), tokens


def _create_private_file(path: Path, text: str) -> bool:
    """Write ``path`` readable by its owner only, whole or not at all; False where it already exists."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        with os.fdopen(os.open(temporary, flags, 0o600), "w", encoding="utf-8") as file:
            os.fchmod(file.fileno(), 0o600)  # the umask only removes bits; set exactly 0600 before writing
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.link(temporary, path)  # unlike a rename, never replaces a file made meanwhile
    except FileExistsError:
        return False
    finally:
        temporary.unlink(missing_ok=True)
    return True


def find_client_token(data_dir: Path, role: Role = Role.ANALYST) -> str | None:
    """A token of ``data_dir/tokens`` that may do what ``role`` may, the least privileged first; None when
    there is no such file or token. For the CLI clients run beside the embedded default."""
    path = Path(data_dir) / TOKENS_FILE
    if not path.is_file():
        return None
    usable = [line for line in _parse_tokens_file(path) if line.token is not None and line.role.rank >= role.rank]
    return min(usable, key=lambda line: line.role.rank).token if usable else None


def bearer_metadata(token: str) -> tuple[tuple[str, str]]:
    """The call metadata that carries ``token``."""
    return (("authorization", f"Bearer {token}"),)


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


def _bind_async(behaviour, caller: Caller):
    async def bound(request, context):
        token = CALLER.set(caller)
        try:
            return await behaviour(request, context)
        finally:
            CALLER.reset(token)

    return bound


def _bind_async_generator(behaviour, caller: Caller):
    # Set for each step only: a generator may be finished in another context (by the loop's finaliser).
    async def bound(request, context):
        responses = behaviour(request, context)
        try:
            while True:
                token = CALLER.set(caller)
                try:
                    response = await anext(responses)
                except StopAsyncIteration:
                    return
                finally:
                    CALLER.reset(token)
                yield response
        finally:
            await responses.aclose()

    return bound


def _bind_sync(behaviour, caller: Caller):
    # grpc.aio runs synchronous behaviours in its thread pool, where the call's context does not follow.
    def bound(request, context):
        token = CALLER.set(caller)
        try:
            return behaviour(request, context)
        finally:
            CALLER.reset(token)

    return bound


def _bind_sync_generator(behaviour, caller: Caller):
    def bound(request, context):
        responses = behaviour(request, context)
        try:
            while True:
                token = CALLER.set(caller)
                try:
                    response = next(responses)
                except StopIteration:
                    return
                finally:
                    CALLER.reset(token)
                yield response
        finally:
            responses.close()

    return bound


BINDERS: tuple[tuple[Callable[[object], bool], Callable], ...] = (
    (inspect.isasyncgenfunction, _bind_async_generator),
    (inspect.iscoroutinefunction, _bind_async),
    (inspect.isgeneratorfunction, _bind_sync_generator),
    (callable, _bind_sync),
)


def bind_caller(behaviour, caller: Caller):
    """``behaviour`` run with ``CALLER`` set to ``caller``."""
    return next(bind(behaviour, caller) for test, bind in BINDERS if test(behaviour))


# ------------------------------------------------------------------------------------------------------
# The interceptor


@dataclass(frozen=True)
class _Kind:
    factory: Callable[..., grpc.RpcMethodHandler]
    attribute: str  # the handler's behaviour of this kind


# (request streaming, response streaming) → how to build a handler of that kind
KINDS: dict[tuple[bool, bool], _Kind] = {
    (False, False): _Kind(grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (True, False): _Kind(grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (False, True): _Kind(grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, True): _Kind(grpc.stream_stream_rpc_method_handler, "stream_stream"),
}

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
    """A handler that refuses the call with ``details`` and its request id, as every error of the gateway
    ends, and logs ``log`` (a message and its arguments) under that id."""

    async def refuse(request, context: grpc.aio.ServicerContext):
        request_id, token = REQUEST_ID.get(), None
        if request_id == NO_REQUEST_ID:  # a kind of call the gateway's interceptor does not wrap: one of its own
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
        kind = KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]
        metadata = handler_call_details.invocation_metadata
        token = bearer_token(metadata)
        caller = None if token is None else self.tokens.caller_of(token)
        if caller is None:
            reason = MISSING_TOKEN if token is None else INVALID_TOKEN
            # The refusal reads no request: a raw-bytes handler, so nothing from an unknown caller is parsed.
            refuse = _refusal(grpc.StatusCode.UNAUTHENTICATED, reason, metadata, "refused %s: %s", method, reason)
            return kind.factory(refuse)
        if caller.role.rank < needed.rank:
            details = f"role {caller.role.value} may not call {method}"
            log = ("refused %s to %s: role %s", method, caller.identity, caller.role.value)
            return kind.factory(_refusal(grpc.StatusCode.PERMISSION_DENIED, details, metadata, *log))
        return kind.factory(
            bind_caller(getattr(handler, kind.attribute), caller),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


# ------------------------------------------------------------------------------------------------------
# TLS and where to listen


def _read_pem(path: Path | str, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{what} {path} does not exist or is not a file")
    data = path.read_bytes()
    if b"-----BEGIN " not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


def server_credentials(cert: Path, key: Path, client_ca: Path | None = None) -> grpc.ServerCredentials:
    """TLS for the server; with ``client_ca``, clients must also show a certificate that CA signed."""
    pair = (_read_pem(key, "TLS private key"), _read_pem(cert, "TLS certificate"))
    ca = None if client_ca is None else _read_pem(client_ca, "client CA certificate")
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(
    ca: Path | None = None, client_cert: Path | None = None, client_key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS for a client: trust ``ca`` (the system's roots when None), and show ``client_cert`` where the
    server asks for one."""
    if (client_cert is None) != (client_key is None):
        raise ValueError("a client certificate needs its private key and the other way round: give both")
    return grpc.ssl_channel_credentials(
        root_certificates=None if ca is None else _read_pem(ca, "CA certificate"),
        private_key=None if client_key is None else _read_pem(client_key, "client private key"),
        certificate_chain=None if client_cert is None else _read_pem(client_cert, "client certificate"),
    )


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
