"""The local Triton of the embedded default: the ``tritonserver`` binary bundled in the ``nvidia-pytriton``
wheel, run on CPU with the Python backend over ``model_repository/``.

``LocalTriton`` finds the binary, prepares a backend directory holding the Python backend stub built for
the running interpreter, gives the stub this environment's site-packages (and cspine itself), starts the
server on the requested loopback ports, forwards its log, waits until every model is READY and stops it cleanly.
When a model does not load it raises ``TritonStartError`` naming the model and Triton's reason. ``dist`` names
another copy of the server's folders (``scripts/gpu/run.sh`` unpacks one where the wheel is not installed).
``cspine triton start`` and ``cspine serve`` both use it.

The server and its Python backend stubs form a process group of their own. One long-lived thread per
``LocalTriton`` spawns the server and waits on it: a server that exits is reaped at once (no zombie), the rest of
its group (the stubs) is SIGKILLed and their shared-memory regions removed; a server one of whose stubs died is
ended the same way (it would stay ready yet fail every request of that model). The server dies with that thread
(``PR_SET_PDEATHSIG``), so never outlives cspine, and each stub ends itself once its server is gone
(``triton_backend``). With ``supervise`` (``cspine serve``) a server that exits while it should run is started
again on the same ports after 1, 2, 4 … 30 s (back to 1 s once a server has run for 60 s); a restart whose
models do not load is retried the same way. Each exit and restart is logged, and ``on_restart`` counts them.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
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
from collections.abc import Callable
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
# A supervised server that exits is started again after 1, 2, 4 … s, at most RESTART_MAX_DELAY_S; once one has
# served for STABLE_AFTER_S, the delay starts again from the first.
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_AFTER_S = 60.0
SHM_DIR = Path("/dev/shm")
# How often a running server and its stubs are checked. A stub that dies (the OOM killer) leaves Triton ready
# but failing every request of its model ("Stub process … is not healthy"): the server is then ended too. A model
# reload (``load_model``) also ends its stubs, after starting new ones: the server is ended only when it has fewer
# stubs than once every model was loaded.
CHECK_INTERVAL_S = 0.25


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


def restart_delay(failures: int) -> float:
    """Seconds to wait before a restart, after ``failures`` restarts since the server last served stably."""
    return min(RESTART_FIRST_DELAY_S * 2 ** min(failures, 16), RESTART_MAX_DELAY_S)


def _exit_status(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


# Runs in front of tritonserver: PR_SET_PDEATHSIG (1) with SIGKILL (9), kept across the exec; exit if the spawner
# died before prctl took effect. Not a preexec_fn: that makes subprocess fork() rather than vfork(), and gRPC's fork
# handlers in this process (the gateway) then run in the child, which can abort it.
_DIE_WITH_SPAWNER = (
    "import ctypes, os, sys; ctypes.CDLL(None).prctl(1, 9); "
    "os.getppid() == int(sys.argv[1]) or os._exit(1); os.execv(sys.argv[2], sys.argv[2:])"
)


def _dying_with_spawner(command: list[str]) -> list[str]:
    """``command`` made to get SIGKILL when the thread that spawns it ends (Linux; elsewhere unchanged)."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_SPAWNER, str(os.getpid()), *command]


def _process_start(pid: int) -> str | None:
    """When ``pid`` started (to tell it from a later process with its pid); None once it has exited."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if stat[0] in ("Z", "X") else stat[19]


def _children(pid: int) -> dict[int, str]:
    """The running children of ``pid`` and when each started (one pass over /proc)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] not in ("Z", "X"):
                found[int(entry.name)] = stat[19]
    return found


def _has_model_file(repository: Path, model: str) -> bool:
    from cspine.inference.model_config import config_path, load_config, served_model_file

    config = load_config(config_path(repository, model))
    if config.platform == "ensemble":
        return True
    if config.version_policy.HasField("all"):  # cspine models use all: every version folder is loaded
        folders = [p for p in (repository / model).iterdir() if p.is_dir() and p.name.isdigit()]
        return bool(folders) and all((p / "model.onnx").is_file() for p in folders)
    return served_model_file(repository, model).is_file()


class LocalTriton:
    """A ``tritonserver`` child process. Use as a context manager, or call ``start()`` and ``stop()``.

    With ``supervise`` a server that exits on its own is started again (see the module docstring);
    ``on_restart`` is called from the supervising thread before each restart, ``restarts`` counts them."""

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
        supervise: bool = False,
        on_restart: Callable[[], object] | None = None,
        dist: TritonDist | None = None,
    ) -> None:
        self.repository = Path(repository).resolve()
        self.dist = dist  # None: the server of the installed nvidia-pytriton wheel (find_triton)
        self.ports = ports
        self.model_config_name = model_config_name
        self.ort_threads = ort_threads
        self.startup_timeout_s = startup_timeout_s
        self.log_verbose = log_verbose
        self.extra_args = extra_args
        self.supervise = supervise
        self.on_restart = on_restart
        self.restarts = 0
        self.process: subprocess.Popen | None = None
        self.log_tail: collections.deque[str] = collections.deque(maxlen=400)
        self._workdir: tempfile.TemporaryDirectory | None = None
        self._backends: Path | None = None
        self._reader: threading.Thread | None = None
        self._stubs: dict[int, str] = {}  # the running server's Python backend stubs, by pid: when each started
        self._stub_count = 0  # how many it had once every model was loaded
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._spawning = threading.Lock()  # no server is spawned once stop() has begun
        # The stubs' shared-memory regions get a prefix of this server's own, so a crash's leftovers can be removed.
        self._shm_prefix = f"cspine_triton_{os.getpid()}_{id(self):x}_"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.ports.grpc}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.http}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports.metrics}/metrics"

    def _dist(self) -> TritonDist:
        return self.dist or find_triton()

    def command(self, backends: Path) -> list[str]:
        dist = self._dist()
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
            # Every model loaded at start, and reloadable (``cspine models use N``): a reload of a loaded model
            # replaces it without losing availability.
            "--model-control-mode=explicit",
            "--load-model=*",
            f"--log-verbose={self.log_verbose}",
            f"--backend-config=python,shm-default-byte-size={PYTHON_SHM_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={PYTHON_SHM_GROWTH_BYTES}",
            f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
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
        # (only for the default configs: another may name another file, and reading configs needs tritonclient)
        missing = [] if self.model_config_name else [m for m in models if not _has_model_file(self.repository, m)]
        if missing:
            raise TritonStartError(f"model {missing[0]}: no 1/model.onnx in {self.repository / missing[0]}")
        self._workdir = tempfile.TemporaryDirectory(prefix="cspine-triton-")
        self._backends = prepare_backends(self._dist(), Path(self._workdir.name) / "backends")
        self._stopping.clear()
        first: concurrent.futures.Future[None] = concurrent.futures.Future()
        # The server's PR_SET_PDEATHSIG fires when the thread that spawned it ends: this thread spawns every server
        # and lives until the last one has exited.
        self._supervisor = threading.Thread(
            target=self._supervise, args=(models, first), name="triton-supervisor", daemon=True
        )
        self._supervisor.start()
        try:
            first.result()
        except BaseException:
            self.stop()
            raise
        return self

    def _supervise(self, models: list[str], first: concurrent.futures.Future) -> None:
        try:
            self._launch(models)
        except BaseException as error:
            first.set_exception(error)
            return
        first.set_result(None)
        failures = 0
        while True:
            served_from = time.monotonic()
            code = self._wait_exit()
            if self._stopping.is_set():
                return
            logger.error("tritonserver exited unexpectedly (%s)", _exit_status(code))
            if not self.supervise:
                return
            if time.monotonic() - served_from >= STABLE_AFTER_S:
                failures = 0
            while True:
                delay = restart_delay(failures)
                failures += 1
                logger.warning("restarting tritonserver in %.0f s (restart %d)", delay, self.restarts + 1)
                if self._stopping.wait(delay):
                    return
                self.restarts += 1
                if self.on_restart is not None:
                    self.on_restart()
                began = time.monotonic()
                try:
                    self._launch(models)
                    break
                except (TritonStartError, OSError) as error:
                    if self._stopping.is_set():
                        return
                    logger.error("tritonserver restart %d failed: %s", self.restarts, error)
            logger.warning(
                "tritonserver restarted (restart %d): every model ready %.1f s after the restart began",
                self.restarts,
                time.monotonic() - began,
            )

    def _launch(self, models: list[str]) -> None:
        """Spawn the server and wait until every model is READY; on failure nothing of it is left."""
        dist = self._dist()
        assert self._backends is not None  # start() prepared them before the supervisor launches
        command = self.command(self._backends)
        self.log_tail.clear()
        with self._spawning:
            if self._stopping.is_set():
                raise TritonStartError("the local Triton was stopped")
            logger.info("starting tritonserver: %s", " ".join(command))
            self.process = subprocess.Popen(
                _dying_with_spawner(command),
                env=stub_environment(dist, self.ort_threads),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C reaches cspine, which stops Triton in order; the stubs join its group
            )
        self._reader = threading.Thread(target=self._forward_log, args=(self.process,), name="triton-log", daemon=True)
        self._reader.start()
        try:
            self._wait_ready(models)
        except BaseException:
            self._end(self.process)
            raise
        self._stubs = _children(self.process.pid)  # every model is loaded: each instance has its stub
        self._stub_count = len(self._stubs)

    def _wait_exit(self) -> int | None:
        """Wait until the server exits, ending it when one of its stubs has died; then end what is left of it
        (``_end``). Its exit code."""
        process = self.process
        assert process is not None  # _launch spawned it
        while True:
            try:
                # Exited but not yet reaped: its pid still names its process group, which cannot be another's now.
                if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None:
                    break
            except ChildProcessError:  # stop() reaped it already
                break
            dead = [pid for pid, started in self._stubs.items() if _process_start(pid) != started]
            if dead:
                current = _children(process.pid)
                if len(current) >= self._stub_count:  # a model reload replaced stubs, each with a new one
                    self._stubs, dead = current, []
            if dead and not self._stopping.is_set():
                logger.error("a Python backend stub of tritonserver died (pid %d); ending the server", dead[0])
                self._stubs = {}
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
            time.sleep(CHECK_INTERVAL_S)
        self._end(process)
        return process.returncode

    def _end(self, process: subprocess.Popen) -> None:
        """SIGKILL the server's process group (the server if it still runs, its Python backend stubs), reap the
        server and remove the stubs' shared-memory regions, which a killed stub leaves behind."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        for region in SHM_DIR.glob(f"{self._shm_prefix}*"):
            region.unlink(missing_ok=True)

    def _forward_log(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip()
            if line:
                self.log_tail.append(line)
                logger.info("%s", line, extra={"triton_log": True})

    def _wait_ready(self, models: list[str]) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        pending = list(models)
        process = self.process
        assert process is not None  # _launch spawned it before waiting
        while pending:
            if self._stopping.is_set():
                raise TritonStartError("the local Triton was stopped while it started")
            if process.poll() is not None:
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
            if self._stopping.is_set() or process.poll() is not None or time.monotonic() > deadline:
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
        """SIGTERM (Triton unloads its models and exits), then SIGKILL to its process group after ``timeout_s``.
        No restart follows."""
        self._stopping.set()
        with self._spawning:
            process = self.process
        if process is not None and process.returncode is None:
            process.send_signal(signal.SIGTERM)
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join(timeout_s)  # it reaps the server and ends the rest of its group
            if supervisor.is_alive() and process is not None:
                logger.warning("tritonserver did not stop within %.0f s; killing it", timeout_s)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)
                supervisor.join(10)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> LocalTriton:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
