"""Settings of the ``cspine`` commands as frozen, validated dataclasses, each read by ``from_env(environ)``.

``main()`` builds ``Settings`` once from the environment; its values are the defaults of the command-line flags,
and a flag given overrides its variable. Precedence, highest first: flag, ``CSPINE_*`` variable, the field's
default. An unset or empty variable keeps the default; one that does not parse is a ValueError naming it. For
optional numbers (ports, threads, seconds) 0 means "off/unset" (None). Nothing here reads the environment at
import time. docs/configuration.md lists every variable with its flag, default and command.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

MiB = 1024 * 1024
DEFAULT_DATA_DIR = "~/.local/share/cspine"
DEFAULT_SERVER = "127.0.0.1:50051"

T = TypeVar("T")


def setting(default: Any = None, env: str | None = None, *, secret: bool = False) -> Any:
    """A field read from the environment variable ``env`` (none: set only by code or a flag); ``secret`` keeps
    its value out of ``repr`` (and so out of logs)."""
    return field(default=default, repr=not secret, metadata={"env": env} if env else {})


def _parse_bool(text: str) -> bool:
    value = text.lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


# Field type (as annotated) → parser and what the error says a value must be.
def _parse_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


_PARSERS: dict[str, tuple[Callable[[str], Any], str]] = {
    "str": (str, "text"),
    "tuple[str, ...]": (_parse_list, "a comma-separated list"),
    "int": (int, "an integer"),
    "float": (float, "a number"),
    "bool": (_parse_bool, "1, true, yes, on, 0, false, no or off"),
    "Path": (Path, "a path"),
}


def _from_env(cls: type[T], environ: Mapping[str, str], **given: Any) -> T:
    """``cls`` with every field that names a variable read from ``environ``; ``given`` (nested settings) as is."""
    values = dict(given)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # T is always a settings dataclass
        name = f.metadata.get("env")
        raw = environ.get(name, "").strip() if name else ""
        if not raw:
            continue
        kind = f.type.removesuffix(" | None")
        parse, what = _PARSERS[kind]
        try:
            value = parse(raw)
        except ValueError:
            raise ValueError(f"{name} must be {what}, got {raw!r}") from None
        optional = f.type.endswith(" | None")
        values[f.name] = None if optional and kind in ("int", "float") and value == 0 else value
    return cls(**values)


def variables(cls: type) -> dict[str, str]:
    """``{variable: field}`` of ``cls`` and of the settings nested in it (docs/configuration.md is checked against
    these by tests/test_config.py)."""
    found = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("env"):
            found[f.metadata["env"]] = f"{cls.__name__}.{f.name}"
        nested = _NESTED.get(str(f.type))
        if nested is not None:
            found.update(variables(nested))
    return found


def _check_port(owner: str, name: str, port: int | None) -> None:
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"{owner}.{name} must be 0–65535, got {port}")


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on one uploaded study, enforced by ingest before any pixel data is decoded."""

    max_instances: int = setting(5000, "CSPINE_MAX_INSTANCES")
    max_study_bytes: int = setting(4096 * MiB, "CSPINE_MAX_STUDY_BYTES")
    # Decoded bytes of one frame (rows × columns × samples × bits/8). 64 MiB holds a 4096² 32-bit frame.
    max_frame_bytes: int = setting(64 * MiB, "CSPINE_MAX_FRAME_BYTES")
    # Voxels of all volumes of a study together; each voxel is held as float32 (4 bytes). A frame counts as at
    # least 64 × 64 voxels, which also bounds what ingest holds per frame (~0.7 KiB) whatever its size.
    max_study_voxels: int = setting(400_000_000, "CSPINE_MAX_STUDY_VOXELS")
    # Bytes the analysis allocates for the chosen series, planned on the model grids before any of it is
    # allocated (cspine/budget.py): a 600-slice 512² CT of 2 mm slices plans 1.9 GB, of 0.5 mm slices 1.0 GB.
    max_study_model_bytes: int = setting(3072 * MiB, "CSPINE_MAX_STUDY_MODEL_BYTES")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"IngestLimits.{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> IngestLimits:
        return _from_env(cls, environ)


@dataclass(frozen=True)
class GatewayConfig:
    """The gRPC server of ``cspine serve``: where it listens, message size, shutdown grace, health checks and
    how long an upload may take."""

    host: str = setting("127.0.0.1", "CSPINE_HOST")
    port: int = setting(50051, "CSPINE_PORT")  # 0: any free port
    metrics_port: int | None = setting(9464, "CSPINE_METRICS_PORT")  # None (variable 0): no metrics endpoint
    max_message_bytes: int = 16 * MiB  # one upload message; larger instances come in chunks
    grace_s: float = setting(30.0, "CSPINE_GRACE_SECONDS")  # on SIGTERM, in-flight studies get this long to finish
    health_interval_s: float = 2.0  # how often Triton's readiness is checked
    # A study's slot is held from before its upload is read, so a slow or stalled client must not keep it: the
    # whole upload must arrive within upload_deadline_s of the slot being taken, with no gap between two
    # messages (or before the first) longer than idle_timeout_s. Either → DEADLINE_EXCEEDED, slot freed.
    # 600 s passes the largest study allowed (max_study_bytes, 4 GiB by default) at ≥ 57 Mbit/s; 30 s passes
    # one largest message (16 MiB) at ≥ 4.5 Mbit/s. docs/serving.md has the arithmetic. The defaults are
    # gateway/upload.py's UploadTimeouts' (tests/test_config.py checks they agree).
    upload_deadline_s: float = setting(600.0, "CSPINE_UPLOAD_DEADLINE_SECONDS")
    idle_timeout_s: float = setting(30.0, "CSPINE_IDLE_TIMEOUT_SECONDS")

    def __post_init__(self) -> None:
        _check_port("GatewayConfig", "port", self.port)
        _check_port("GatewayConfig", "metrics_port", self.metrics_port)
        if self.max_message_bytes < MiB:
            raise ValueError(f"max_message_bytes must be at least 1 MiB, got {self.max_message_bytes}")
        if self.grace_s < 0 or self.health_interval_s <= 0:
            raise ValueError("grace_s must be >= 0 and health_interval_s > 0")
        if not 0 < self.idle_timeout_s <= self.upload_deadline_s:
            raise ValueError(
                f"idle_timeout_s must be > 0 and at most upload_deadline_s, got idle_timeout_s {self.idle_timeout_s} "
                f"and upload_deadline_s {self.upload_deadline_s}"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> GatewayConfig:
        return _from_env(cls, environ)


@dataclass(frozen=True)
class TritonConfig:
    """The local tritonserver ``cspine serve`` and ``cspine triton start`` launch (inference/local_triton.py)."""

    repository: Path | None = setting(None, "CSPINE_MODEL_REPOSITORY")  # None: default_repository()
    http_port: int = setting(8000, "CSPINE_TRITON_HTTP_PORT")
    grpc_port: int = setting(8001, "CSPINE_TRITON_GRPC_PORT")
    metrics_port: int = setting(8002, "CSPINE_TRITON_METRICS_PORT")
    model_config_name: str | None = None  # configs/<NAME>.pbtxt instead of config.pbtxt
    # ONNX Runtime threads per model; None: each config.pbtxt's ort_threads. Passed to the Python backend in
    # the stub's environment, where inference/triton_backend.py reads it back.
    ort_threads: int | None = setting(None, "CSPINE_ORT_THREADS")
    log_verbose: int = 0  # tritonserver --log-verbose

    def __post_init__(self) -> None:
        for name in ("http_port", "grpc_port", "metrics_port"):
            _check_port("TritonConfig", name, getattr(self, name))
        if self.ort_threads is not None and self.ort_threads < 1:
            raise ValueError(f"TritonConfig.ort_threads must be at least 1 (or unset), got {self.ort_threads}")
        if self.log_verbose < 0:
            raise ValueError(f"TritonConfig.log_verbose must be >= 0, got {self.log_verbose}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TritonConfig:
        return _from_env(cls, environ)


@dataclass(frozen=True)
class AnalysisConfig:
    """What the analysis service (service.py) admits: the ingest limits of one study, the studies analysed at once
    and the queue before them."""

    limits: IngestLimits = field(default_factory=IngestLimits)
    max_studies_in_flight: int = setting(2, "CSPINE_MAX_STUDIES_IN_FLIGHT")
    max_queued_studies: int = setting(2, "CSPINE_MAX_QUEUED_STUDIES")  # 0: refuse once every slot is taken

    def __post_init__(self) -> None:
        if self.max_studies_in_flight < 1:
            raise ValueError(f"max_studies_in_flight must be at least 1, got {self.max_studies_in_flight}")
        if self.max_queued_studies < 0:
            raise ValueError(f"max_queued_studies must be >= 0, got {self.max_queued_studies}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AnalysisConfig:
        return _from_env(cls, environ, limits=IngestLimits.from_env(environ))


@dataclass(frozen=True)
class TritonClientConfig:
    """How the analysis calls Triton (inference/client.py): the deadline of one inference call; behind a
    Kubernetes headless Service, round-robin over every address its name has and a fresh channel this often; and
    whether every call names the version set the service serves (for a Triton that loads every set, the Helm
    chart's: each gateway then gets its own set's models, whichever sets its neighbours serve)."""

    timeout_s: float = 120.0
    round_robin: bool = setting(False, "CSPINE_TRITON_ROUND_ROBIN")
    reconnect_s: float | None = setting(None, "CSPINE_TRITON_RECONNECT_SECONDS")  # None: one channel for good
    pin_versions: bool = setting(False, "CSPINE_TRITON_PIN_VERSIONS")

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError(f"TritonClientConfig.timeout_s must be positive, got {self.timeout_s}")
        if self.reconnect_s is not None and self.reconnect_s <= 0:
            raise ValueError(f"triton reconnect_s must be positive, got {self.reconnect_s}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> TritonClientConfig:
        return _from_env(cls, environ)


@dataclass(frozen=True)
class Destination:
    """Where the DICOM node sends results: ``NAME=dimse://AE_TITLE@HOST:PORT`` (C-STORE) or ``NAME=http[s]://
    HOST[:PORT]/PATH`` (a DICOMweb service root, STOW-RS to ``PATH/studies``; ``user:password@`` in it is HTTP
    basic authentication)."""

    name: str
    url: str

    @property
    def kind(self) -> str:
        return "dimse" if self.url.startswith("dimse://") else "stow"

    @property
    def dimse(self) -> tuple[str, str, int]:
        """(AE title, host, port) of a C-STORE destination."""
        ae_title, _, address = self.url.removeprefix("dimse://").partition("@")
        host, _, port = address.rpartition(":")
        return ae_title, host.strip("[]"), int(port)

    @property
    def shown(self) -> str:
        """The URL without a password, for logs and audit lines."""
        scheme, _, rest = self.url.partition("://")
        credentials, at, address = rest.rpartition("@")
        return f"{scheme}://{credentials.partition(':')[0]}{at}{address}" if self.kind == "stow" else self.url

    @classmethod
    def parse(cls, text: str) -> Destination:
        name, equals, url = text.partition("=")
        if not equals or not name.strip().isidentifier():
            raise ValueError("a destination is NAME=URL with NAME a word (letters, digits, _)")
        destination = cls(name.strip(), url.strip())
        if url.startswith("dimse://"):
            ae_title, at, address = url.removeprefix("dimse://").partition("@")
            host, colon, port = address.rpartition(":")
            if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536 and 0 < len(ae_title) <= 16):
                raise ValueError(f"destination {name}: a DIMSE destination is dimse://AE_TITLE@HOST:PORT, got {url!r}")
        elif not url.startswith(("http://", "https://")):
            raise ValueError(f"destination {name}: the URL must start with dimse://, http:// or https://")
        return destination


@dataclass(frozen=True)
class DicomNodeConfig:
    """The DICOM node of ``cspine serve`` (dicomnet/): C-ECHO and C-STORE on ``port``, DICOMweb STOW-RS on
    ``dicomweb_port`` (each off while None), studies analysed ``quiet_s`` after their last instance, results sent
    to ``destinations``. It listens on the gateway's host."""

    port: int | None = setting(None, "CSPINE_DICOM_PORT")  # DIMSE; None (variable 0): off
    dicomweb_port: int | None = setting(None, "CSPINE_DICOMWEB_PORT")  # STOW-RS; None (variable 0): off
    ae_title: str = setting("CSPINE", "CSPINE_AE_TITLE")
    # Calling AE titles allowed to associate; none: any, which only a node on loopback may allow.
    allowed_aes: tuple[str, ...] = setting((), "CSPINE_DICOM_ALLOWED_AES")
    allowed_peers: tuple[str, ...] = setting((), "CSPINE_DICOM_ALLOWED_PEERS")  # addresses or networks; none: any
    destinations: tuple[str, ...] = setting((), "CSPINE_DICOM_DESTINATIONS", secret=True)  # NAME=URL each
    quiet_s: float = setting(10.0, "CSPINE_DICOM_QUIET_SECONDS")  # a study is complete this long after its last
    retain_s: float = setting(3600.0, "CSPINE_DICOM_RETAIN_SECONDS")  # received instances kept after analysis
    tls: bool = setting(False, "CSPINE_DICOM_TLS")  # DICOM TLS and HTTPS with serve's --tls-cert/--tls-key

    def __post_init__(self) -> None:
        _check_port("DicomNodeConfig", "port", self.port)
        _check_port("DicomNodeConfig", "dicomweb_port", self.dicomweb_port)
        if not 0 < len(self.ae_title) <= 16 or not self.ae_title.isascii() or "\\" in self.ae_title:
            raise ValueError(f"the AE title must be 1–16 ASCII characters, got {self.ae_title!r}")
        if self.quiet_s <= 0 or self.retain_s < 0:
            raise ValueError(f"quiet_s must be > 0 and retain_s >= 0, got {self.quiet_s} and {self.retain_s}")
        names = [d.name for d in self.parsed_destinations]
        if len(set(names)) != len(names):
            raise ValueError(f"destination names must differ, got {sorted(names)}")
        self.networks  # noqa: B018 - validates the addresses

    @property
    def enabled(self) -> bool:
        return self.port is not None or self.dicomweb_port is not None

    @property
    def parsed_destinations(self) -> tuple[Destination, ...]:
        return tuple(Destination.parse(text) for text in self.destinations)

    @property
    def networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(peer, strict=False) for peer in self.allowed_peers)
        except ValueError as error:
            raise ValueError(f"allowed peers are addresses or networks (10.0.0.0/8): {error}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> DicomNodeConfig:
        return _from_env(cls, environ)


@dataclass(frozen=True)
class ServeConfig:
    """Everything ``cspine serve`` runs with: the gateway, the local Triton (unless ``triton_url``), the analysis
    (ingest limits, admission), the Triton client, the support store, tokens and TLS."""

    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    triton_client: TritonClientConfig = field(default_factory=TritonClientConfig)
    dicom: DicomNodeConfig = field(default_factory=DicomNodeConfig)
    data_dir: Path = setting(Path(DEFAULT_DATA_DIR), "CSPINE_DATA_DIR")  # support store, generated tokens
    triton_url: str | None = setting(None, "CSPINE_TRITON_URL")  # an external Triton; None: start the local one
    store_url: str | None = setting(None, "CSPINE_STORE_URL", secret=True)  # None: sqlite:///DATA_DIR/support.db
    store_poll_s: float = setting(5.0, "CSPINE_STORE_POLL_SECONDS")
    prototype_adaptation: str = setting("fitted", "CSPINE_PROTOTYPE_ADAPTATION")  # plain | fitted (docs/support.md)
    tokens: Path | None = setting(None, "CSPINE_TOKENS")  # None: generated ones in DATA_DIR, loopback only
    tls_cert: Path | None = setting(None, "CSPINE_TLS_CERT")
    tls_key: Path | None = setting(None, "CSPINE_TLS_KEY")
    tls_client_ca: Path | None = setting(None, "CSPINE_TLS_CLIENT_CA")  # require client certificates it signed

    def __post_init__(self) -> None:
        if self.store_poll_s <= 0:
            raise ValueError(f"store_poll_s must be > 0, got {self.store_poll_s}")
        if self.prototype_adaptation not in ("plain", "fitted"):
            raise ValueError(f"prototype_adaptation must be plain or fitted, got {self.prototype_adaptation!r}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a TLS certificate needs its private key and the other way round (--tls-cert, --tls-key)")
        if self.dicom.tls and self.tls_cert is None:
            raise ValueError("DICOM TLS (--dicom-tls) uses the gateway's certificate: pass --tls-cert and --tls-key")

    @property
    def store(self) -> str:
        """The support store's URL: ``store_url``, else SQLite in the data directory."""
        return self.store_url or f"sqlite:///{self.data_dir.expanduser() / 'support.db'}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ServeConfig:
        nested = {
            "gateway": GatewayConfig.from_env(environ),
            "triton": TritonConfig.from_env(environ),
            "analysis": AnalysisConfig.from_env(environ),
            "triton_client": TritonClientConfig.from_env(environ),
            "dicom": DicomNodeConfig.from_env(environ),
        }
        return _from_env(cls, environ, **nested)


@dataclass(frozen=True)
class ClientConfig:
    """How the client commands (analyze, support, evaluate study, loadtest) reach a server."""

    server: str = setting(DEFAULT_SERVER, "CSPINE_SERVER")  # host:port, or grpcs://host[:port]
    token: str | None = setting(None, "CSPINE_TOKEN", secret=True)  # None: the one `cspine serve` generated
    data_dir: Path = setting(Path(DEFAULT_DATA_DIR), "CSPINE_DATA_DIR")  # where serve keeps generated tokens
    ca: Path | None = setting(None, "CSPINE_CA")  # TLS: trust the server's certificate if this CA signed it
    client_cert: Path | None = setting(None, "CSPINE_CLIENT_CERT")
    client_key: Path | None = setting(None, "CSPINE_CLIENT_KEY")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ClientConfig:
        return _from_env(cls, environ)


@dataclass(frozen=True)
class Settings:
    """What every ``cspine`` command reads from the environment, built once in ``main()``."""

    log_level: str = setting("WARNING", "CSPINE_LOG_LEVEL")
    serve: ServeConfig = field(default_factory=ServeConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    locustfile: Path | None = setting(None, "CSPINE_LOCUSTFILE")  # None: load_tests/locustfile.py, found

    def __post_init__(self) -> None:
        if self.log_level.upper() not in logging.getLevelNamesMapping():
            raise ValueError(f"CSPINE_LOG_LEVEL must be a logging level (e.g. INFO, WARNING), got {self.log_level!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        nested = {"serve": ServeConfig.from_env(environ), "client": ClientConfig.from_env(environ)}
        return _from_env(cls, environ, **nested)


_NESTED: dict[str, type] = {
    "GatewayConfig": GatewayConfig,
    "TritonConfig": TritonConfig,
    "IngestLimits": IngestLimits,
    "AnalysisConfig": AnalysisConfig,
    "TritonClientConfig": TritonClientConfig,
    "DicomNodeConfig": DicomNodeConfig,
    "ServeConfig": ServeConfig,
    "ClientConfig": ClientConfig,
}
