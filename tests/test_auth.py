"""Access control over a real socket: a grpc.aio server with the auth interceptor (behind the gateway's own
interceptor, as create_server orders them) and stand-in cspine methods of every streaming kind; tokens
files, the embedded default's generated tokens, TLS with and without client certificates, and where the
embedded default may listen."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from cspine.client import bearer_metadata, channel_credentials
from cspine.gateway.auth import (
    AuthInterceptor,
    allows,
    caller_identity,
    check_bind_address,
    minimum_role,
    server_credentials,
)
from cspine.gateway.interceptors import GatewayInterceptor, RequestIdFilter
from cspine.gateway.metrics import Metrics
from cspine.gateway.tokens import TOKENS_FILE, Role, TokenStore, ensure_default_tokens, find_client_token
from support.server import wait_for
from support.tls import make_pki

ANALYST_TOKEN = secrets.token_urlsafe(32)
CURATOR_TOKEN = secrets.token_urlsafe(32)

GET_SERVICE_INFO = "/cspine.v1.SpineAnalysis/GetServiceInfo"
ANALYZE_STUDY = "/cspine.v1.SpineAnalysis/AnalyzeStudy"
LIST_CASES = "/cspine.v1.SupportSet/ListCases"
ADD_CASE = "/cspine.v1.SupportSet/AddCase"
REMOVE_CASE = "/cspine.v1.SupportSet/RemoveCase"
MIRROR = "/cspine.v1.SupportSet/Mirror"  # in no table: curators only
LEGACY = "/other.v1.Legacy/Touch"  # synchronous, outside cspine (the gateway's interceptor lets it be)
LEGACY_WALK = "/other.v1.Legacy/Walk"  # a synchronous generator


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class AuthServer:
    """A real grpc.aio server on its own event loop thread, port 0: health, and stand-in cspine methods
    (raw bytes, no protos) of each kind that record who called them."""

    def __init__(self, store: TokenStore, credentials: grpc.ServerCredentials | None = None) -> None:
        self.calls: list[tuple[str, str]] = []  # (method, caller identity)
        self.metrics = Metrics()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = self.call(self._start(store, credentials))
        self.address = f"127.0.0.1:{self.port}"

    def call(self, coroutine, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def record(self, method: str) -> None:
        self.calls.append((method, caller_identity()))

    async def _start(self, store: TokenStore, credentials: grpc.ServerCredentials | None) -> int:
        async def get_service_info(request: bytes, context) -> bytes:
            self.record(GET_SERVICE_INFO)
            return b"info"

        async def analyze_study(requests, context) -> bytes:
            parts = [part async for part in requests]
            self.record(ANALYZE_STUDY)
            return b"analysis of %d parts" % len(parts)

        async def list_cases(request: bytes, context):
            for case in (b"case-1", b"case-2"):
                self.record(LIST_CASES)
                yield case

        async def add_case(request: bytes, context) -> bytes:
            self.record(ADD_CASE)
            return b"added " + request

        async def remove_case(request: bytes, context) -> bytes:
            self.record(REMOVE_CASE)
            return b"removed " + request

        def touch(request: bytes, context) -> bytes:  # synchronous: grpc.aio runs it in its thread pool
            self.record(LEGACY)
            return b"touched " + request

        def walk(request: bytes, context):
            for step in (b"1", b"2"):
                self.record(LEGACY_WALK)
                yield step

        async def mirror(requests, context):
            async for part in requests:
                self.record(MIRROR)
                yield part

        handlers = {
            "cspine.v1.SpineAnalysis": {
                "GetServiceInfo": grpc.unary_unary_rpc_method_handler(get_service_info),
                "AnalyzeStudy": grpc.stream_unary_rpc_method_handler(analyze_study),
            },
            "cspine.v1.SupportSet": {
                "ListCases": grpc.unary_stream_rpc_method_handler(list_cases),
                "AddCase": grpc.unary_unary_rpc_method_handler(add_case),
                "RemoveCase": grpc.unary_unary_rpc_method_handler(remove_case),
                "Mirror": grpc.stream_stream_rpc_method_handler(mirror),
            },
            "other.v1.Legacy": {
                "Touch": grpc.unary_unary_rpc_method_handler(touch),
                "Walk": grpc.unary_stream_rpc_method_handler(walk),
            },
        }
        self.server = grpc.aio.server(
            interceptors=[GatewayInterceptor(self.metrics), AuthInterceptor(store)],
            migration_thread_pool=ThreadPoolExecutor(2),
        )
        self.server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(name, methods) for name, methods in handlers.items()]
        )
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        address = "127.0.0.1:0"
        if credentials is None:
            port = self.server.add_insecure_port(address)
        else:
            port = self.server.add_secure_port(address, credentials)
        await self.server.start()
        return port

    def close(self) -> None:
        self.call(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def invoke(channel: grpc.Channel, method: str, token: str | None = None, *, metadata=()):
    """Call ``method`` with a fitting request for its kind; the response(s) as bytes."""
    metadata = (*metadata, *bearer_metadata(token))
    kwargs = {"metadata": metadata, "timeout": 10}
    if method == ANALYZE_STUDY:
        return channel.stream_unary(method)(iter([b"a", b"b", b"c"]), **kwargs)
    if method in (LIST_CASES, LEGACY_WALK):
        return list(channel.unary_stream(method)(b"", **kwargs))
    if method == MIRROR:
        return list(channel.stream_stream(method)(iter([b"x", b"y"]), **kwargs))
    return channel.unary_unary(method)(b"c1", **kwargs)


def refusal(channel: grpc.Channel, method: str, token: str | None = None, *, metadata=()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        invoke(channel, method, token, metadata=metadata)
    return caught.value


def says(error: grpc.RpcError, reason: str) -> bool:
    """Whether a refusal's message is ``reason`` ending with the call's request id, as every gateway error
    ends, the id being the one of the call's x-request-id initial metadata."""
    request_id = dict(error.initial_metadata() or ()).get("x-request-id")
    return bool(request_id) and error.details() == f"{reason} (request {request_id})"


@pytest.fixture(scope="module")
def server():
    running = AuthServer(TokenStore.from_pairs([(Role.ANALYST, ANALYST_TOKEN), (Role.CURATOR, CURATOR_TOKEN)]))
    yield running
    running.close()


@pytest.fixture
def channel(server):
    server.calls.clear()
    with grpc.insecure_channel(server.address) as open_channel:
        yield open_channel


# ------------------------------------------------------------------------------------------------------
# Who may call what, over the wire


def test_health_answers_without_a_token(channel):
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("method", [GET_SERVICE_INFO, ANALYZE_STUDY, LIST_CASES, ADD_CASE, MIRROR, LEGACY])
def test_call_without_token_is_unauthenticated_and_never_reaches_the_servicer(server, channel, method):
    error = refusal(channel, method)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says(error, "a bearer token is required"), error.details()
    assert server.calls == []


@pytest.mark.parametrize("method", [GET_SERVICE_INFO, ANALYZE_STUDY, LIST_CASES, REMOVE_CASE])
def test_call_with_unknown_token_is_unauthenticated(server, channel, method):
    error = refusal(channel, method, secrets.token_urlsafe(32))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says(error, "the token is not valid"), error.details()
    assert server.calls == []


@pytest.mark.parametrize(
    "header",
    [f"Basic {ANALYST_TOKEN}", "Bearer", "Bearer ", f"Bearer {ANALYST_TOKEN} extra", ANALYST_TOKEN],
)
def test_malformed_authorization_header_is_unauthenticated(server, channel, header):
    error = refusal(channel, GET_SERVICE_INFO, metadata=(("authorization", header),))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert says(error, "a bearer token is required"), error.details()
    assert server.calls == []


def test_bearer_scheme_is_case_insensitive(channel):
    assert invoke(channel, GET_SERVICE_INFO, metadata=(("authorization", f"bearer {ANALYST_TOKEN}"),)) == b"info"


def test_analyst_may_analyse_and_read_the_support_set(server, channel):
    assert invoke(channel, GET_SERVICE_INFO, ANALYST_TOKEN) == b"info"
    assert invoke(channel, ANALYZE_STUDY, ANALYST_TOKEN) == b"analysis of 3 parts"
    assert invoke(channel, LIST_CASES, ANALYST_TOKEN) == [b"case-1", b"case-2"]
    analyst = f"analyst:{fingerprint(ANALYST_TOKEN)}"
    assert server.calls == [
        (GET_SERVICE_INFO, analyst),
        (ANALYZE_STUDY, analyst),
        (LIST_CASES, analyst),
        (LIST_CASES, analyst),
    ]


@pytest.mark.parametrize("method", [ADD_CASE, REMOVE_CASE, MIRROR, LEGACY])
def test_analyst_may_not_change_the_support_set_nor_call_unlisted_methods(server, channel, method):
    error = refusal(channel, method, ANALYST_TOKEN)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert says(error, f"role analyst may not call {method}"), error.details()
    assert server.calls == []


def test_curator_may_change_the_support_set_and_is_recorded_by_role_and_fingerprint(server, channel):
    assert invoke(channel, ADD_CASE, CURATOR_TOKEN) == b"added c1"
    assert invoke(channel, REMOVE_CASE, CURATOR_TOKEN) == b"removed c1"
    assert invoke(channel, MIRROR, CURATOR_TOKEN) == [b"x", b"y"]
    assert invoke(channel, LEGACY, CURATOR_TOKEN) == b"touched c1"
    assert invoke(channel, LEGACY_WALK, CURATOR_TOKEN) == [b"1", b"2"]
    assert invoke(channel, GET_SERVICE_INFO, CURATOR_TOKEN) == b"info"
    curator = f"curator:{fingerprint(CURATOR_TOKEN)}"
    assert server.calls == [
        (ADD_CASE, curator),
        (REMOVE_CASE, curator),
        (MIRROR, curator),
        (MIRROR, curator),
        (LEGACY, curator),
        (LEGACY_WALK, curator),
        (LEGACY_WALK, curator),
        (GET_SERVICE_INFO, curator),
    ]
    assert all(CURATOR_TOKEN not in identity for _, identity in server.calls)


def test_refused_calls_carry_a_request_id_and_are_counted_by_code(server, channel):
    # The gateway's interceptor is outside the auth interceptor: refusals get a request id and a metric.
    def count(code: str) -> float:
        return (
            server.metrics.registry.get_sample_value("cspine_requests_total", {"rpc": "AddCase", "code": code}) or 0.0
        )

    before = {code: count(code) for code in ("UNAUTHENTICATED", "PERMISSION_DENIED", "OK")}
    unauthenticated = refusal(channel, ADD_CASE, metadata=(("x-request-id", "req-auth-1"),))
    denied = refusal(channel, ADD_CASE, ANALYST_TOKEN)
    invoke(channel, ADD_CASE, CURATOR_TOKEN)
    assert dict(unauthenticated.initial_metadata())["x-request-id"] == "req-auth-1"
    assert unauthenticated.details() == "a bearer token is required (request req-auth-1)"
    assert says(denied, f"role analyst may not call {ADD_CASE}")
    # counted once the handler has returned (abort sends the status first)
    assert wait_for(
        lambda: (
            {code: count(code) - before[code] for code in before}
            == {
                "UNAUTHENTICATED": 1.0,
                "PERMISSION_DENIED": 1.0,
                "OK": 1.0,
            }
        ),
        timeout=5,
    )


@pytest.mark.parametrize("method", [LIST_CASES, MIRROR, LEGACY_WALK])
def test_refusals_of_streaming_calls_carry_the_callers_request_id_and_cspine_ones_are_counted(server, channel, method):
    rpc = method.rsplit("/", 1)[-1]

    def count() -> float:
        labels = {"rpc": rpc, "code": "UNAUTHENTICATED"}
        return server.metrics.registry.get_sample_value("cspine_requests_total", labels) or 0.0

    before = count()
    error = refusal(channel, method, metadata=(("x-request-id", "req-stream-7"),))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert dict(error.initial_metadata())["x-request-id"] == "req-stream-7"
    assert error.details() == "a bearer token is required (request req-stream-7)"
    # The gateway's interceptor wraps every kind of cspine call (not the legacy service's): counted by code, once
    # the handler has returned (abort sends the status first).
    if method == LEGACY_WALK:
        assert count() == before == 0.0
    else:
        assert wait_for(lambda: count() - before == 1.0, timeout=5)


def test_the_gateway_counts_admitted_streaming_calls_and_answers_them_whole(server, channel):
    def count(rpc: str) -> float:
        return server.metrics.registry.get_sample_value("cspine_requests_total", {"rpc": rpc, "code": "OK"}) or 0.0

    before = (count("ListCases"), count("Mirror"))
    assert invoke(channel, LIST_CASES, ANALYST_TOKEN) == [b"case-1", b"case-2"]
    assert invoke(channel, MIRROR, CURATOR_TOKEN) == [b"x", b"y"]
    assert wait_for(lambda: (count("ListCases") - before[0], count("Mirror") - before[1]) == (1.0, 1.0), timeout=5)


@pytest.mark.parametrize("method", [ADD_CASE, MIRROR])
def test_a_refusal_is_logged_under_its_request_id(channel, caplog, method):
    caplog.handler.addFilter(RequestIdFilter())  # what the gateway's log handler does
    with caplog.at_level(logging.INFO, logger="cspine.gateway.auth"):
        refusal(channel, method, ANALYST_TOKEN, metadata=(("x-request-id", "req-auth-log"),))
    [record] = [r for r in caplog.records if r.getMessage().startswith(f"refused {method}")]
    assert record.getMessage() == f"refused {method} to analyst:{fingerprint(ANALYST_TOKEN)}: role analyst"
    assert record.request_id == "req-auth-log"


def test_tokens_never_reach_the_log(server, channel, caplog):
    unknown = secrets.token_urlsafe(32)
    with caplog.at_level(logging.DEBUG):
        refusal(channel, ADD_CASE, unknown)
        refusal(channel, ADD_CASE, ANALYST_TOKEN)
        invoke(channel, ADD_CASE, CURATOR_TOKEN)
    assert "refused /cspine.v1.SupportSet/AddCase: the token is not valid" in caplog.text
    assert f"to analyst:{fingerprint(ANALYST_TOKEN)}" in caplog.text
    for token in (unknown, ANALYST_TOKEN, CURATOR_TOKEN):
        assert token not in caplog.text


def test_caller_identity_outside_a_call_is_anonymous():
    assert caller_identity() == "anonymous"


# ------------------------------------------------------------------------------------------------------
# The role table


@pytest.mark.parametrize(
    ("method", "analyst", "curator"),
    [
        ("/cspine.v1.SpineAnalysis/AnalyzeStudy", True, True),
        ("/cspine.v1.SpineAnalysis/GetServiceInfo", True, True),
        ("/cspine.v1.SpineAnalysis/SomethingNew", True, True),
        ("/cspine.v1.SupportSet/ListCases", True, True),
        ("/cspine.v1.SupportSet/GetPrototypeSet", True, True),
        ("/cspine.v1.SupportSet/AddCase", False, True),
        ("/cspine.v1.SupportSet/RemoveCase", False, True),
        ("/cspine.v1.SupportSet/SomethingNew", False, True),
        ("/cspine.v2.Unknown/Anything", False, True),
        ("/grpc.health.v1.Health/Check", True, True),
    ],
)
def test_role_allows_follows_the_table(method, analyst, curator):
    assert allows(Role.ANALYST, method) is analyst
    assert allows(Role.CURATOR, method) is curator


def test_health_and_reflection_need_no_token_and_unknown_services_need_a_curator():
    assert minimum_role("/grpc.health.v1.Health/Watch") is None
    assert minimum_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None
    assert minimum_role("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo") is None
    assert minimum_role("/cspine.v1.SupportSet/AddCase") is Role.CURATOR
    assert minimum_role("/other.Service/Method") is Role.CURATOR


# ------------------------------------------------------------------------------------------------------
# Tokens


def test_token_store_keeps_hashes_only_and_knows_each_role():
    other = secrets.token_urlsafe(32)
    store = TokenStore.from_pairs([("analyst", ANALYST_TOKEN), (Role.CURATOR, CURATOR_TOKEN), ("analyst", other)])
    assert (store.role_of(ANALYST_TOKEN), store.role_of(CURATOR_TOKEN), store.role_of(other)) == (
        Role.ANALYST,
        Role.CURATOR,
        Role.ANALYST,
    )
    assert store.role_of(ANALYST_TOKEN[:-1]) is None
    assert store.role_of("") is None
    held = repr(vars(store))
    assert ANALYST_TOKEN not in held and CURATOR_TOKEN not in held
    assert store.caller_of(CURATOR_TOKEN).identity == f"curator:{fingerprint(CURATOR_TOKEN)}"


def test_token_store_from_pairs_rejects_short_and_duplicate_tokens():
    with pytest.raises(ValueError, match="pair 2: the token is shorter than 16") as caught:
        TokenStore.from_pairs([("analyst", ANALYST_TOKEN), ("curator", "short-secret")])
    assert "short-secret" not in str(caught.value)
    with pytest.raises(ValueError, match="pair 2: the same token as pair 1"):
        TokenStore.from_pairs([("analyst", ANALYST_TOKEN), ("curator", ANALYST_TOKEN)])
    with pytest.raises(ValueError, match="no tokens"):
        TokenStore.from_pairs([])


def test_tokens_file_allows_comments_blank_lines_and_hashes(tmp_path):
    hashed = secrets.token_urlsafe(32)
    path = tmp_path / "tokens"
    path.write_text(
        "# cspine tokens\n"
        "\n"
        f"  analyst   {ANALYST_TOKEN}  \n"
        "   # indented comment\n"
        f"CURATOR {CURATOR_TOKEN}\n"
        f"curator sha256:{hashlib.sha256(hashed.encode()).hexdigest()}\n"
    )
    path.chmod(0o600)
    store = TokenStore.from_file(path)
    assert len(store) == 3
    assert store.role_of(ANALYST_TOKEN) is Role.ANALYST
    assert store.role_of(CURATOR_TOKEN) is Role.CURATOR
    assert store.role_of(hashed) is Role.CURATOR


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (f"analyst {ANALYST_TOKEN} extra", "line 3: expected 'ROLE TOKEN', found 3 fields"),
        (f"{ANALYST_TOKEN}", "line 3: expected 'ROLE TOKEN', found 1 fields"),
        (f"{ANALYST_TOKEN} analyst", "line 3: unknown role"),
        (f"admin {ANALYST_TOKEN}", "line 3: unknown role"),
        ("analyst tooShort-123", "line 3: the token is shorter than 16 characters"),
        ("curator sha256:abcd", "line 3: sha256: must be followed by 64 hex digits"),
        (f"curator {CURATOR_TOKEN}", "line 3: the same token as line 2"),
    ],
)
def test_malformed_tokens_file_line_names_the_line_but_not_the_token(tmp_path, line, message):
    path = tmp_path / "tokens"
    path.write_text(f"# tokens\ncurator {CURATOR_TOKEN}\n{line}\n")
    with pytest.raises(ValueError, match=message) as caught:
        TokenStore.from_file(path)
    for secret in (ANALYST_TOKEN, CURATOR_TOKEN, "tooShort-123"):
        assert secret not in str(caught.value)


def test_tokens_file_that_is_missing_or_empty_is_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        TokenStore.from_file(tmp_path / "absent")
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no tokens"):
        TokenStore.from_file(tmp_path / "empty")


def test_default_tokens_are_made_once_in_a_private_file_and_shown_only_then(tmp_path):
    data_dir = tmp_path / "data"
    previous = os.umask(0)  # the file must be private whatever the umask
    try:
        store, shown = ensure_default_tokens(data_dir)
    finally:
        os.umask(previous)
    path = data_dir / TOKENS_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert set(shown) == {Role.ANALYST, Role.CURATOR}
    assert all(len(token) >= 40 for token in shown.values())
    assert store.role_of(shown[Role.ANALYST]) is Role.ANALYST
    assert store.role_of(shown[Role.CURATOR]) is Role.CURATOR
    assert [p.name for p in data_dir.iterdir()] == [TOKENS_FILE]  # no temporary file left behind
    content = path.read_text()

    again, shown_again = ensure_default_tokens(data_dir)
    assert shown_again is None
    assert path.read_text() == content
    assert again.role_of(shown[Role.CURATOR]) is Role.CURATOR


def test_find_client_token_reads_the_default_tokens_least_privileged_first(tmp_path):
    assert find_client_token(tmp_path) is None
    _, shown = ensure_default_tokens(tmp_path)
    assert find_client_token(tmp_path) == shown[Role.ANALYST]
    assert find_client_token(tmp_path, Role.ANALYST) == shown[Role.ANALYST]
    assert find_client_token(tmp_path, Role.CURATOR) == shown[Role.CURATOR]
    (tmp_path / TOKENS_FILE).write_text(f"curator {CURATOR_TOKEN}\n")
    assert find_client_token(tmp_path, Role.ANALYST) == CURATOR_TOKEN  # a curator may analyse too


def test_default_tokens_work_over_the_wire(tmp_path):
    store, shown = ensure_default_tokens(tmp_path)
    running = AuthServer(store)
    try:
        with grpc.insecure_channel(running.address) as channel:
            assert invoke(channel, ADD_CASE, find_client_token(tmp_path, Role.CURATOR)) == b"added c1"
            assert refusal(channel, ADD_CASE, shown[Role.ANALYST]).code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        running.close()


# ------------------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server(pki):
    running = []

    def start(client_ca: Path | None = None) -> AuthServer:
        credentials = server_credentials(pki["server_cert"], pki["server_key"], client_ca)
        running.append(AuthServer(TokenStore.from_pairs([(Role.ANALYST, ANALYST_TOKEN)]), credentials))
        return running[-1]

    yield start
    for server in running:
        server.close()


def test_tls_server_answers_a_secure_channel_and_refuses_a_plain_one(pki, tls_server):
    server = tls_server()
    with grpc.secure_channel(server.address, channel_credentials(pki["ca"])) as channel:
        assert invoke(channel, GET_SERVICE_INFO, ANALYST_TOKEN) == b"info"
        assert refusal(channel, GET_SERVICE_INFO).code() == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.address) as channel:
        assert refusal(channel, GET_SERVICE_INFO, ANALYST_TOKEN).code() == grpc.StatusCode.UNAVAILABLE
    assert server.calls == [(GET_SERVICE_INFO, f"analyst:{fingerprint(ANALYST_TOKEN)}")]


def test_tls_server_with_client_ca_refuses_a_client_without_certificate(pki, tls_server):
    server = tls_server(client_ca=pki["ca"])
    with_certificate = channel_credentials(pki["ca"], pki["client_cert"], pki["client_key"])
    with grpc.secure_channel(server.address, with_certificate) as channel:
        assert invoke(channel, GET_SERVICE_INFO, ANALYST_TOKEN) == b"info"
    with grpc.secure_channel(server.address, channel_credentials(pki["ca"])) as channel:
        assert refusal(channel, GET_SERVICE_INFO, ANALYST_TOKEN).code() == grpc.StatusCode.UNAVAILABLE
    assert len(server.calls) == 1


def test_tls_credentials_name_the_missing_or_unusable_file(pki, tmp_path):
    with pytest.raises(ValueError, match=r"TLS certificate .*absent\.crt does not exist"):
        server_credentials(tmp_path / "absent.crt", pki["server_key"])
    with pytest.raises(ValueError, match=r"client CA certificate .*absent-ca\.crt does not exist"):
        server_credentials(pki["server_cert"], pki["server_key"], tmp_path / "absent-ca.crt")
    (tmp_path / "garbage.key").write_text("not a key")
    with pytest.raises(ValueError, match=r"TLS private key .*garbage\.key is not a PEM file"):
        server_credentials(pki["server_cert"], tmp_path / "garbage.key")
    with pytest.raises(ValueError, match="give both"):
        channel_credentials(pki["ca"], client_cert=pki["client_cert"])
    with pytest.raises(ValueError, match=r"CA certificate .*absent\.pem does not exist"):
        channel_credentials(tmp_path / "absent.pem")


# ------------------------------------------------------------------------------------------------------
# Where the embedded default may listen


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]", "localhost", "LOCALHOST", "127.0.0.2"])
def test_embedded_default_may_listen_on_loopback(host):
    check_bind_address(host, tokens_configured=False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "[::]", "", "10.1.2.3", "gateway.example.org"])
def test_embedded_default_may_not_listen_beyond_loopback_without_tokens_file(host):
    with pytest.raises(ValueError, match="pass --tokens"):
        check_bind_address(host, tokens_configured=False)
    check_bind_address(host, tokens_configured=True, tls=True)


def test_listening_beyond_loopback_without_tls_is_said_in_the_log(caplog):
    with caplog.at_level(logging.WARNING, logger="cspine.gateway.auth"):
        check_bind_address("127.0.0.1", tokens_configured=True)
        check_bind_address("0.0.0.0", tokens_configured=True, tls=True)
        assert not caplog.records
        check_bind_address("0.0.0.0", tokens_configured=True)
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "without TLS: bearer tokens and DICOM travel in plaintext" in caplog.records[0].getMessage()
