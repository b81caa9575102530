"""The settings of the `cspine` commands (cspine/config.py): read from ``CSPINE_*`` variables, refused with the
variable's name when they do not parse, overridden by flags; and docs/configuration.md, whose table must list
every variable the code reads (and nothing else)."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

from cspine import cli
from cspine.commands.serve import serve_config
from cspine.config import (
    AnalysisConfig,
    ClientConfig,
    GatewayConfig,
    IngestLimits,
    ServeConfig,
    Settings,
    TritonClientConfig,
    TritonConfig,
    variables,
)
from cspine.gateway.upload import UploadTimeouts

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "configuration.md"
# Where variables are read: cspine itself, the Locust file it runs, the fault-injection report.
SOURCES = (ROOT / "services", ROOT / "load_tests", ROOT / "tests" / "faults")
NAME = re.compile(r"CSPINE_[A-Z0-9_]+")


def _names_in_strings(path: Path) -> set[str]:
    """``CSPINE_*`` names in the file's string literals (names of variables are always written in strings: the key
    read, the help text); Python identifiers such as ``CSPINE_SCHEME`` are not variables. A name ending in ``_`` is
    a prefix in prose (``CSPINE_MAX_*``) or an f-string's head."""
    strings = (
        token.string
        for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
        if token.type == tokenize.STRING or token.type == getattr(tokenize, "FSTRING_MIDDLE", -1)
    )
    return {name for text in strings for name in NAME.findall(text) if not name.endswith("_")}


def _read_in_code() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for root in SOURCES:
        for path in sorted(root.rglob("*.py")):
            for name in _names_in_strings(path):
                found.setdefault(name, []).append(str(path.relative_to(ROOT)))
    return found


def _table() -> dict[str, list[str]]:
    """``{variable: [flag, default, meaning, command]}`` from docs/configuration.md's table."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        match = re.match(r"\| `(CSPINE_[A-Z0-9_]+)` \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = [cell.strip() for cell in match.group(2).split(" | ")]
    return rows


# --------------------------------------------------------------------------------------------------------
# docs/configuration.md


def test_every_variable_the_code_names_is_in_the_configuration_table():
    missing = {name: files for name, files in _read_in_code().items() if name not in _table()}
    assert not missing, f"add these to docs/configuration.md's table: {missing}"


def test_every_row_of_the_configuration_table_is_a_variable_the_code_names():
    stale = set(_table()) - set(_read_in_code())
    assert not stale, f"docs/configuration.md lists variables nothing reads: {sorted(stale)}"


def test_every_settings_variable_is_in_the_table_with_a_flag_default_meaning_and_command():
    rows = _table()
    for name, field in variables(Settings).items():
        assert name in rows, f"{field} reads {name}, which docs/configuration.md does not list"
        assert len(rows[name]) == 4 and all(rows[name]), f"{name}: flag, default, meaning, command: {rows[name]}"
    assert len(variables(Settings)) >= 30  # the nested settings are walked too


# --------------------------------------------------------------------------------------------------------
# from_env


def test_settings_from_an_empty_environment_are_the_defaults():
    assert Settings.from_env({}) == Settings()
    assert Settings.from_env({name: "" for name in variables(Settings)}) == Settings()  # empty is unset


def test_from_env_reads_each_variable_into_its_field_with_its_type():
    environ = {
        "CSPINE_LOG_LEVEL": "info",
        "CSPINE_HOST": "0.0.0.0",
        "CSPINE_PORT": "6000",
        "CSPINE_GRACE_SECONDS": "12.5",
        "CSPINE_TRITON_ROUND_ROBIN": "true",
        "CSPINE_TRITON_RECONNECT_SECONDS": "7.5",
        "CSPINE_MAX_STUDIES_IN_FLIGHT": "4",
        "CSPINE_TLS_CERT": "/tls/tls.crt",
        "CSPINE_TLS_KEY": "/tls/tls.key",
        "CSPINE_MODEL_REPOSITORY": "/models",
        "CSPINE_TRITON_GRPC_PORT": "18001",
        "CSPINE_ORT_THREADS": "3",
        "CSPINE_MAX_INSTANCES": "10",
        "CSPINE_SERVER": "grpcs://cspine.example.org",
        "CSPINE_DATA_DIR": "/var/lib/cspine",
        "CSPINE_LOCUSTFILE": "/l.py",
    }
    s = Settings.from_env(environ)
    assert s.log_level == "info" and s.locustfile == Path("/l.py")
    assert (s.serve.gateway.host, s.serve.gateway.port, s.serve.gateway.grace_s) == ("0.0.0.0", 6000, 12.5)
    assert s.serve.triton_client == TritonClientConfig(round_robin=True, reconnect_s=7.5)
    tls = (s.serve.tls_cert, s.serve.tls_key, s.serve.tls_client_ca)
    assert tls == (Path("/tls/tls.crt"), Path("/tls/tls.key"), None)
    assert s.serve.triton == TritonConfig(repository=Path("/models"), grpc_port=18001, ort_threads=3)
    assert s.serve.analysis == AnalysisConfig(IngestLimits(max_instances=10), max_studies_in_flight=4)
    assert s.client == ClientConfig(server="grpcs://cspine.example.org", data_dir=Path("/var/lib/cspine"))
    assert s.serve.data_dir == Path("/var/lib/cspine")


def test_zero_switches_optional_numbers_off():
    s = ServeConfig.from_env(
        {"CSPINE_METRICS_PORT": "0", "CSPINE_TRITON_RECONNECT_SECONDS": "0", "CSPINE_ORT_THREADS": "0"}
    )
    assert (s.gateway.metrics_port, s.triton_client.reconnect_s, s.triton.ort_threads) == (None, None, None)
    assert GatewayConfig.from_env({"CSPINE_PORT": "0"}).port == 0  # not optional: 0 is any free port


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"CSPINE_PORT": "abc"}, "CSPINE_PORT must be an integer, got 'abc'"),
        ({"CSPINE_GRACE_SECONDS": "soon"}, "CSPINE_GRACE_SECONDS must be a number, got 'soon'"),
        ({"CSPINE_TRITON_ROUND_ROBIN": "maybe"}, "CSPINE_TRITON_ROUND_ROBIN must be 1, true, yes, on, 0, false"),
        ({"CSPINE_MAX_STUDY_BYTES": "4G"}, "CSPINE_MAX_STUDY_BYTES must be an integer, got '4G'"),
        ({"CSPINE_PORT": "70000"}, "GatewayConfig.port must be 0–65535, got 70000"),
        ({"CSPINE_MAX_STUDIES_IN_FLIGHT": "0"}, "max_studies_in_flight must be at least 1, got 0"),
        ({"CSPINE_IDLE_TIMEOUT_SECONDS": "900"}, "idle_timeout_s must be > 0 and at most upload_deadline_s"),
        ({"CSPINE_TLS_CERT": "/tls/tls.crt"}, "a TLS certificate needs its private key"),
        ({"CSPINE_LOG_LEVEL": "LOUD"}, "CSPINE_LOG_LEVEL must be a logging level"),
        ({"CSPINE_MAX_INSTANCES": "-1"}, "IngestLimits.max_instances must be a positive integer, got -1"),
    ],
)
def test_a_variable_that_does_not_parse_or_validate_is_refused_with_its_name(environ, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        Settings.from_env(environ)


def test_secrets_stay_out_of_the_settings_repr():
    s = Settings.from_env({"CSPINE_TOKEN": "s3cret-token", "CSPINE_STORE_URL": "postgresql+psycopg://u:pw@db/x"})
    assert s.client.token == "s3cret-token"
    assert "s3cret" not in repr(s) and "pw@db" not in repr(s)


def test_gateway_defaults_are_the_upload_timeouts_defaults():
    gateway = GatewayConfig()
    assert (gateway.upload_deadline_s, gateway.idle_timeout_s) == (UploadTimeouts().deadline_s, UploadTimeouts().idle_s)


def test_store_defaults_to_sqlite_in_the_data_dir():
    assert ServeConfig(data_dir=Path("/data")).store == "sqlite:////data/support.db"
    assert ServeConfig(store_url="postgresql+psycopg://db/cspine").store == "postgresql+psycopg://db/cspine"


# --------------------------------------------------------------------------------------------------------
# Flags override variables


def test_variables_are_the_flags_defaults_and_a_flag_given_overrides_its_variable():
    environ = {"CSPINE_PORT": "6000", "CSPINE_MAX_QUEUED_STUDIES": "5", "CSPINE_TRITON_HTTP_PORT": "18000"}
    parser = cli.build_parser(Settings.from_env(environ))
    args = parser.parse_args(["serve", "--max-queued-studies", "0"])
    assert (args.port, args.max_queued_studies, args.triton_http_port) == (6000, 0, 18000)
    config = serve_config(args, IngestLimits(max_instances=7))
    assert (config.gateway.port, config.analysis.max_queued_studies, config.triton.http_port) == (6000, 0, 18000)
    assert config.analysis.limits.max_instances == 7 and config.gateway.metrics_port == 9464
    start = parser.parse_args(["triton", "start", "--http-port", "28000"])
    assert (start.triton_http_port, start.triton_grpc_port) == (28000, 8001)


def test_serve_flags_are_validated_together_before_anything_starts():
    args = cli.build_parser(Settings()).parse_args(["serve", "--idle-timeout", "900"])
    with pytest.raises(ValueError, match="idle_timeout_s must be > 0 and at most upload_deadline_s"):
        serve_config(args, IngestLimits())
    args = cli.build_parser(Settings()).parse_args(["serve", "--idle-timeout", "900", "--upload-deadline", "1200"])
    assert serve_config(args, IngestLimits()).gateway.idle_timeout_s == 900


def test_main_refuses_an_invalid_variable_with_its_name_and_exit_status_2(monkeypatch, capsys):
    monkeypatch.setenv("CSPINE_MAX_STUDIES_IN_FLIGHT", "two")
    assert cli.main(["inspect", "nothing"]) == 2
    assert "cspine: error: CSPINE_MAX_STUDIES_IN_FLIGHT must be an integer, got 'two'" in capsys.readouterr().err
