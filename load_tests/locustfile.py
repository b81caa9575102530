"""Locust user of cspine: each task is one AnalyzeStudy call (gRPC, client streaming) with a study drawn from a
pre-generated SYNTHETIC pool. Closed loop by default (a user sends its next study when the last one is
answered); open loop with ``--cspine-arrival-rate`` (Poisson or evenly spaced arrivals, one greenlet per study).

Run it through ``cspine loadtest`` (which makes the pool, starts or finds the server and summarises), or by
hand, e.g. distributed (docs/performance.md, "Load tests")::

    locust -f load_tests/locustfile.py --headless -u 4 -r 4 -t 60s -H 127.0.0.1:50051 --cspine-pool POOL_DIR

Every call is recorded as request type "grpc", name "AnalyzeStudy"; a failed call's exception is its gRPC status
code name (RESOURCE_EXHAUSTED, UNAVAILABLE …), so Locust's failure table counts status codes.

A server that serves TLS: ``--cspine-ca`` (env CSPINE_CA), and ``--cspine-client-cert``/``--cspine-client-key`` (env
CSPINE_CLIENT_CERT, CSPINE_CLIENT_KEY) where it asks for a client certificate; or ``-H grpcs://HOST:PORT`` for TLS
with the system's CAs.
"""

# grpcio's own threads must cooperate with gevent: this has to run before any channel exists.
import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import csv  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import grpc  # noqa: E402
from gevent.pool import Pool  # noqa: E402
from locust import LoadTestShape, User, events, task  # noqa: E402
from locust.runners import MasterRunner  # noqa: E402

from cspine.client import bearer_metadata, open_channel  # noqa: E402
from cspine.loadtest.pool import load_studies  # noqa: E402
from cspine.v1 import analysis_pb2_grpc as pb_grpc  # noqa: E402

# A client backs off after these before trying again, as an integrator's retry loop would.
BACK_OFF = {"RESOURCE_EXHAUSTED", "UNAVAILABLE"}
CLIENT_BACKLOG = "CLIENT_BACKLOG"  # open loop: an arrival found --cspine-max-outstanding studies in flight
# After the last user stopped, time for Locust's CSV writer (every second; workers report every 3 s) to catch up.
SETTLE_S = {"local": 1.5, "master": 4.5}
_studies = None  # the pool, read once per process


@events.init_command_line_parser.add_listener
def _arguments(parser):
    parser.add_argument("--cspine-pool", env_var="CSPINE_LOADTEST_POOL", default="", help="study pool folder")
    parser.add_argument(
        "--cspine-token", env_var="CSPINE_TOKEN", default="", is_secret=True, help="analyst bearer token"
    )
    parser.add_argument("--cspine-ca", env_var="CSPINE_CA", default="", help="TLS: the CA of the server's certificate")
    parser.add_argument(
        "--cspine-client-cert", env_var="CSPINE_CLIENT_CERT", default="", help="TLS: a client certificate to show"
    )
    parser.add_argument("--cspine-client-key", env_var="CSPINE_CLIENT_KEY", default="", help="TLS: its private key")
    parser.add_argument("--cspine-timeout", type=float, default=120.0, help="deadline of one call, seconds")
    parser.add_argument(
        "--cspine-backoff", type=float, default=1.0, help="mean pause after RESOURCE_EXHAUSTED/UNAVAILABLE, seconds"
    )
    parser.add_argument(
        "--cspine-arrival-rate",
        type=float,
        default=0.0,
        help="open loop: studies/s PER USER, Poisson arrivals; 0: closed loop",
    )
    parser.add_argument(
        "--cspine-arrivals", default="poisson", choices=["poisson", "uniform"], help="open loop: arrival spacing"
    )
    parser.add_argument(
        "--cspine-max-outstanding", type=int, default=64, help="open loop: studies in flight per user at most"
    )
    parser.add_argument("--cspine-return-dicom", default="", help="'1': ask for DICOM SEG and SR too")
    parser.add_argument(
        "--cspine-requests-log",
        default="",
        include_in_web_ui=False,
        help="folder for a per-request CSV of each load-generating process (requests-PID.csv)",
    )


class RequestLog:
    """One CSV row per call made by this process (``requests-PID.csv``): start time, latency, status. Locust's own
    CSV only holds aggregates; this gives exact percentiles of the successful studies and the refusals' latency."""

    COLUMNS = ("timestamp", "request_type", "name", "response_time_ms", "response_length", "exception")

    def __init__(self, path: Path) -> None:
        self.file = path.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.writer.writerow(self.COLUMNS)

    def on_request(self, request_type, name, response_time, response_length, exception=None, start_time=None, **_):
        began = f"{start_time or time.time():.6f}"
        self.writer.writerow([began, request_type, name, f"{response_time:.2f}", response_length, exception or ""])

    def close(self, **_) -> None:
        self.file.close()


@events.init.add_listener
def _per_request_log(environment, **_):
    folder = environment.parsed_options.cspine_requests_log if environment.parsed_options else ""
    if folder and not isinstance(environment.runner, MasterRunner):  # the master sends no requests
        Path(folder).mkdir(parents=True, exist_ok=True)
        log = RequestLog(Path(folder) / f"requests-{os.getpid()}.csv")
        environment.events.request.add_listener(log.on_request)
        environment.events.quitting.add_listener(log.close)


def _pool(options):
    global _studies
    if _studies is None:
        if not options.cspine_pool:
            raise RuntimeError("no study pool: pass --cspine-pool DIR (make one with `cspine loadtest --make-pool`)")
        _studies = load_studies(Path(options.cspine_pool), return_dicom=options.cspine_return_dicom == "1")
    return _studies


class AnalyzeStudyUser(User):
    """A hospital system sending studies to AnalyzeStudy, on a channel of its own."""

    def on_start(self):
        options = self.environment.parsed_options
        self.studies = _pool(options)
        self.timeout_s = options.cspine_timeout
        self.backoff_s = options.cspine_backoff
        self.rate = options.cspine_arrival_rate
        self.poisson = options.cspine_arrivals == "poisson"
        self.metadata = bearer_metadata(options.cspine_token or None)
        ca, cert, key = (
            Path(name) if name else None
            for name in (options.cspine_ca, options.cspine_client_cert, options.cspine_client_key)
        )
        self.channel = open_channel(self.host, ca=ca, client_cert=cert, client_key=key)
        self.stub = pb_grpc.SpineAnalysisStub(self.channel)
        self.outstanding = Pool(options.cspine_max_outstanding)
        self.pause = 0.0

    def wait_time(self):
        if self.rate > 0:  # open loop: the gap to the next arrival, whatever is in flight
            return random.expovariate(self.rate) if self.poisson else 1.0 / self.rate
        pause, self.pause = self.pause, 0.0  # closed loop: none, or the back-off after a refusal
        return pause

    @task
    def analyze(self):
        if self.rate > 0:
            if self.outstanding.full():
                self._record(time.time(), 0.0, 0, CLIENT_BACKLOG)
            else:
                self.outstanding.spawn(self.analyze_one)
            return
        if self.analyze_one() in BACK_OFF:
            self.pause = random.uniform(0.5, 1.5) * self.backoff_s

    def analyze_one(self) -> str:
        study = random.choice(self.studies)
        began, start = time.time(), time.perf_counter()
        try:
            answer = self.stub.AnalyzeStudy(iter(study.messages), timeout=self.timeout_s, metadata=self.metadata)
            code, length = "OK", answer.ByteSize()
        except grpc.RpcError as error:
            code, length = error.code().name, 0
        self._record(began, (time.perf_counter() - start) * 1000, length, None if code == "OK" else code)
        return code

    def _record(self, began: float, ms: float, length: int, error: str | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name="AnalyzeStudy",
            start_time=began,
            response_time=ms,
            response_length=length,
            exception=error,
            context={},
        )

    def on_stop(self):
        if getattr(self, "outstanding", None) is not None:
            self.outstanding.join(timeout=self.timeout_s)  # open loop: let the studies in flight be answered
        if getattr(self, "channel", None) is not None:
            self.channel.close()


class RunThenDrain(LoadTestShape):
    """-u users (spawned at -r per second) for -t seconds, then every user stops after its call in flight
    (within --stop-timeout) and the run ends once the CSV files hold the last answers. Without it, Locust ends a
    headless run up to a second after its last CSV write, and the CSV misses answers its HTML report counts."""

    use_common_options = True  # -u, -r and -t keep their meaning

    def __init__(self):
        super().__init__()
        self.drained_at = None

    def tick(self):
        options = self.runner.environment.parsed_options
        elapsed = self.get_run_time()
        if not options.run_time or elapsed < options.run_time:
            return options.num_users, options.spawn_rate
        if self.get_current_user_count() > 0:
            return 0, max(options.num_users, 1)
        self.drained_at = self.drained_at or elapsed
        settle = SETTLE_S["master" if isinstance(self.runner, MasterRunner) else "local"]
        return (0, max(options.num_users, 1)) if elapsed - self.drained_at < settle else None
