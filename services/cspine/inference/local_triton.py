"""The local Triton of the embedded default: the ``tritonserver`` binary bundled in the ``nvidia-pytriton``
wheel, run on CPU with the Python backend over ``model_repository/``.

``LocalTriton`` finds the binary, prepares a backend directory holding the Python backend stub built for
the running interpreter, gives the stub this environment's site-packages (and cspine itself), starts the
server on the requested loopback ports, forwards its log, waits until every model is READY and stops it cleanly.
When a model does not load it raises ``TritonStartError`` naming the model and Triton's reason.
``cspine triton start`` and ``cspine serve`` both use it.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import cspine
from cspine.errors import TritonUnavailableError

logger = logging.getLogger("cspine.triton")

# Triton's endpoints (model control, shared memory, log settings) carry no authentication: only this host
# may reach them; clients come through the gateway.
LOOPBACK = "127.0.0.1"
# Room for a batch of 64 CT slices (20 MB) in one go; the Python backend grows the region when needed.
PYTHON_SHM_BYTES = 64 * 1024 * 1024
PYTHON_SHM_GROWTH_BYTES = 16 * 1024 * 1024
_FAILED_LOAD = re.compile(r"failed to load '(?P<model>[^']+)'(?: version \d+)?: (?P<reason>.*?)\"?$")
_UNAVAILABLE_ROW = re.compile(r"^\|\s*(?P<model>\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE: (?P<reason>.*?)\s*\|$")


class TritonStartError(TritonUnavailableError):
    """The local Triton did not start, or a model did not load. The message names the model and Triton's reason."""


@dataclass(frozen=True)
class TritonPorts:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002

    @staticmethod
    def free() -> TritonPorts:
        """Three ports the OS says are free now (for a Triton that only this process talks to)."""
        return TritonPorts(*free_ports(3))


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports that are free now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass(frozen=True)
class TritonDist:
    """Where the ``nvidia-pytriton`` wheel keeps the server: binary, backends, per-Python stubs, libraries."""

    root: Path
    libs: Path

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def python_backend(self) -> Path:
        return self.root / "backends" / "python"

    def stub(self, version: str) -> Path:
        return self.root / "python_backend_stubs" / version / "triton_python_backend_stub"


def find_triton() -> TritonDist:
    try:
        import pytriton
    except ImportError as error:
        raise TritonStartError("the nvidia-pytriton package (which carries tritonserver) is not installed") from error
    package = Path(pytriton.__file__).resolve().parent
    dist = TritonDist(root=package / "tritonserver", libs=package.parent / "nvidia_pytriton.libs")
    if not dist.binary.is_file():
        raise TritonStartError(f"no tritonserver binary at {dist.binary}")
    return dist


def prepare_backends(dist: TritonDist, directory: Path) -> Path:
    """A backend directory whose Python backend uses the stub built for this interpreter's Python version."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = dist.stub(version)
    if not stub.is_file():
        raise TritonStartError(f"the bundled Triton has no Python backend stub for Python {version}")
    python = directory / "python"
    python.mkdir(parents=True, exist_ok=True)
    for item in dist.python_backend.iterdir():
        if item.is_file() and not (python / item.name).exists():
            (python / item.name).symlink_to(item)
    target = python / "triton_python_backend_stub"
    if not target.exists():
        shutil.copy2(stub, target)
    return directory


def stub_environment(dist: TritonDist, ort_threads: int | None = None) -> dict[str, str]:
    """The server's environment: the bundled libraries and this interpreter's libpython on the loader path,
    and this interpreter's folder first on PATH. The stub is an embedded interpreter that ignores
    PYTHONPATH; it takes ``python3`` from PATH as its executable, and Python's ``site`` then finds the
    virtual environment's ``pyvenv.cfg`` beside it and adds its site-packages (with cspine) to ``sys.path``."""
    env = os.environ.copy()
    libs = [sysconfig.get_config_var("LIBDIR") or "", str(dist.libs)]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in [*libs, env.get("LD_LIBRARY_PATH", "")] if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONNOUSERSITE"] = "1"
    if ort_threads:
        env["CSPINE_ORT_THREADS"] = str(ort_threads)
    return env


def default_repository() -> Path:
    """``model_repository/`` in the current folder if there is one, else the one of this source checkout."""
    here = Path("model_repository")
    return here if here.is_dir() else Path(cspine.__file__).resolve().parents[2] / "model_repository"


def repository_models(repository: Path, config_name: str | None = None) -> list[str]:
    """The models a repository serves: folders with a ``config.pbtxt`` (or ``configs/<name>.pbtxt``)."""
    names = []
    for folder in sorted(p for p in repository.iterdir() if p.is_dir()):
        config = folder / "configs" / f"{config_name}.pbtxt" if config_name else folder / "config.pbtxt"
        if config.is_file() or (folder / "config.pbtxt").is_file():
            names.append(folder.name)
    return names


def _has_model_file(repository: Path, model: str) -> bool:
    from cspine.inference.model_config import config_path, load_config

    if load_config(config_path(repository, model)).platform == "ensemble":
        return True
    return (repository / model / "1" / "model.onnx").is_file()


class LocalTriton:
    """A ``tritonserver`` child process. Use as a context manager, or call ``start()`` and ``stop()``."""

    def __init__(
        self,
        repository: Path,
        ports: TritonPorts = TritonPorts(),
        *,
        model_config_name: str | None = None,
        ort_threads: int | None = None,
        startup_timeout_s: float = 180.0,
        log_verbose: int = 0,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repository = Path(repository).resolve()
        self.ports = ports
        self.model_config_name = model_config_name
        self.ort_threads = ort_threads
        self.startup_timeout_s = startup_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = extra_args
        self.process: subprocess.Popen | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=400)
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._reader: threading.Thread | None = None

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def command(self, backends: Path) -> list[str]:
        dist = find_triton()
        args = [
            str(dist.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backends}",
            f"--http-address={LOOPBACK}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={LOOPBACK}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={LOOPBACK}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            "--disable-auto-complete-config",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_GROWTH_BYTES}",
        ]
        if self.model_config_name:
            args.append(f"--model-config-name={self.model_config_name}")
        return [*args, *self.extra_args]

    def start(self) -> LocalTriton:
        if not self.repository.is_dir():
            raise TritonStartError(f"model repository {self.repository} does not exist")
        models = repository_models(self.repository, self.model_config_name)
        if not models:
            raise TritonStartError(f"model repository {self.repository} holds no model")
        missing = [m for m in models if not _has_model_file(self.repository, m)]
        if missing and not self.model_config_name:
            raise TritonStartError(f"model {missing[0]}: no 1/model.onnx in {self.repository / missing[0]}")
        dist = find_triton()
        self._workdir = tempfile.TemporaryDirectory(prefix="cspine-triton-")
        backends = prepare_backends(dist, Path(self._workdir.name) / "backends")
        command = self.command(backends)
        logger.info("starting tritonserver: %s", " ".join(command))
        self.process = subprocess.Popen(
            command,
            env=stub_environment(dist, self.ort_threads),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches cspine, which stops Triton in order
        )
        self._reader = threading.Thread(target=self._forward_log, name="triton-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(models)
        except BaseException:
            self.stop()
            raise
        return self

    def _forward_log(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self.log_tail.append(line)
                logger.info("%s", line)

    def _wait_ready(self, models: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(models)
        while pending:
            if self.process.poll() is not None:
                if self._reader is not None:
                    self._reader.join(timeout=5)
                raise TritonStartError(self.failure_reason())
            if time.monotonic() > deadline:
                raise TritonStartError(
                    f"Triton did not make model {pending[0]} ready within {self.startup_timeout_s:.0f} s"
                )
            pending = [m for m in pending if not self._http_ok(f"/v2/models/{m}/ready")]
            if pending:
                time.sleep(0.25)
        while not self._http_ok("/v2/health/ready"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise TritonStartError(self.failure_reason())
            time.sleep(0.25)
        logger.info("Triton ready: %d models, gRPC %s, HTTP %s", len(models), self.grpc_url, self.http_url)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def failure_reason(self) -> str:
        """Why Triton stopped: the first model that failed to load and Triton's reason, else its last error."""
        for line in self.log_tail:
            for pattern in (_FAILED_LOAD, _UNAVAILABLE_ROW):
                match = pattern.search(line.strip())
                if match:
                    reason = match["reason"].split("\\n")[0].strip()  # Triton escapes the traceback's newlines
                    return f"model {match['model']} did not load: {reason}"
        errors = [line for line in self.log_tail if line.startswith("E")]
        code = self.process.returncode if self.process else None
        detail = errors[-1] if errors else (self.log_tail[-1] if self.log_tail else "no output")
        return f"tritonserver exited (code {code}) before its models were ready: {detail}"

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (Triton unloads its models and exits), then SIGKILL after ``timeout_s``."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                logger.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
