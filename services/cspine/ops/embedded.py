"""The embedded default as a child process: ``cspine serve`` (local Triton, gateway, SQLite store) on free
ports with its own data directory, waited for until SERVING and stopped with SIGTERM. ``cspine demo``
and ``cspine evaluate study`` use it when no server is given."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cspine.errors import CspineError
from cspine.inference.local_triton import TritonPorts, free_ports

START_TIMEOUT_S = 300.0


class EmbeddedServer:
    """``extra_args`` go to ``cspine serve`` as they are (e.g. ``--max-studies-in-flight 1``, ``--triton-url``);
    once started, ``metrics_port`` and ``triton_ports`` say where its metrics are."""

    def __init__(self, data_dir: Path, log: Path, extra_args: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.log_path = log
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.metrics_port = 0
        self.triton_ports: TritonPorts | None = None

    def __enter__(self) -> EmbeddedServer:
        grpc_port, metrics_port = free_ports(2)
        triton = TritonPorts.free()
        command = [
            sys.executable,
            "-m",
            "cspine",
            "serve",
            "--port",
            str(grpc_port),
            "--metrics-port",
            str(metrics_port),
        ]
        command += ["--data-dir", str(self.data_dir), "--triton-http-port", str(triton.http)]
        command += ["--triton-grpc-port", str(triton.grpc), "--triton-metrics-port", str(triton.metrics)]
        command += self.extra_args
        self.metrics_port, self.triton_ports = metrics_port, triton
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("w")  # the server's lines (JSON logs), for when something goes wrong
        self.process = subprocess.Popen(command, stdout=self._log, stderr=self._log)
        self.address = f"127.0.0.1:{grpc_port}"
        try:
            self._wait_serving()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_serving(self) -> None:
        process = self.process
        assert process is not None  # __enter__ starts the server before it waits for it
        deadline = time.monotonic() + START_TIMEOUT_S
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                if process.poll() is not None:
                    raise CspineError(f"cspine serve exited with code {process.returncode}; see {self.log_path}")
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise CspineError(f"cspine serve did not become SERVING within {START_TIMEOUT_S:.0f} s")
                time.sleep(1.0)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self._log.close()
