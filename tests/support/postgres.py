"""A throwaway PostgreSQL 15 cluster on 127.0.0.1 (trust auth, no fsync) that makes fresh databases and can be
stopped and started again on the same port: the session's ``postgres`` fixture, and the fault scenarios' own."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg

from cspine.inference.local_triton import free_ports

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class PostgresCluster:
    """``with PostgresCluster() as cluster:`` initdb, start; ``cluster.new_database()`` → a SQLAlchemy URL."""

    def __init__(self) -> None:
        assert (PG_BIN / "initdb").exists(), f"PostgreSQL 15 must be installed ({PG_BIN}): make sysdeps"
        self.root = Path(tempfile.mkdtemp(prefix="cspine-pg-"))
        self.port = free_ports(1)[0]
        self._as_user: list[str] = []
        if os.geteuid() == 0:  # initdb refuses root
            shutil.chown(self.root, "postgres", "postgres")
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._databases = itertools.count(1)
        self.running = False

    def _pg(self, tool: str, *args: str) -> None:
        subprocess.run([*self._as_user, str(PG_BIN / tool), *args], check=True, capture_output=True, timeout=60)

    def __enter__(self) -> PostgresCluster:
        self._pg("initdb", "-D", str(self.root / "data"), "--auth=trust", "-U", "postgres", "--no-sync", "-E", "UTF8")
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def start(self) -> None:
        """Start and wait until it accepts connections."""
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-l", str(self.root / "log"), "-o", options, "-w", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m fast``: sessions are ended, their open transactions rolled back."""
        self._pg("pg_ctl", "-D", str(self.root / "data"), "-m", mode, "-w", "stop")
        self.running = False

    def new_database(self, port: int | None = None) -> str:
        """A fresh database; its URL through ``port`` (a proxy in front of the cluster) when given."""
        name = f"test_{next(self._databases)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}")
        return f"postgresql+psycopg://postgres@127.0.0.1:{port or self.port}/{name}"
