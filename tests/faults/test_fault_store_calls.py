"""The support store's own answers to the faults of the scenarios, without a server (seconds, not minutes): a
PostgreSQL statement not answered within the store timeout is given up (a slow call of quick statements is
not), a restarted PostgreSQL is used again at the first call, and a full SQLite disk is StoreFullError with
every committed version intact."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import closing

import numpy as np
import pytest
from injectors import LatencyProxy, Tmpfs

from cspine.domain import Modality
from cspine.errors import StoreFullError, StoreUnavailableError
from cspine.fewshot.store import SupportStore
from support.postgres import PostgresCluster

TIMEOUT_S = 1.0


def add(store: SupportStore, n: int) -> int:
    return store.add_case(
        f"1.2.826.0.1.3680043.10.9999.{n}",
        "benign",
        {Modality.CT: np.full(64, n, dtype=np.float32)},
        pathology_reference="biopsy report",
        curator="dr test",
        create_class=True,
    )


@pytest.fixture(scope="module")
def cluster():
    with PostgresCluster() as pg:
        yield pg


def test_a_stalled_postgresql_call_is_given_up_after_the_timeout_and_the_store_answers_once_it_flows(cluster):
    with LatencyProxy(cluster.port) as proxy, SupportStore(cluster.new_database(proxy.port), timeout_s=TIMEOUT_S) as s:
        s.migrate()
        assert add(s, 1) == 1
        proxy.stall()
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match=f"is unavailable: no answer within {TIMEOUT_S:g} s"):
            s.current_version()  # the pooled connection's ping waits for an answer that does not come
        assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + 1
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="the support store is unavailable") as caught:
            s.list_cases()  # a new connection: its 5 s connect timeout
        assert time.monotonic() - start < 6 and "127.0.0.1" not in str(caught.value)
        proxy.resume()
        assert s.current_version() == 1 and [c.label for c in s.list_cases()] == ["benign"]
        assert add(s, 3) == 2


def test_a_slow_postgresql_call_answers_when_each_statement_is_answered_within_the_timeout(cluster):
    with LatencyProxy(cluster.port) as proxy, SupportStore(cluster.new_database(proxy.port), timeout_s=TIMEOUT_S) as s:
        s.migrate()
        add(s, 1)
        proxy.delay_s = 0.1  # each way: every round trip 0.2 s, the ping, BEGIN, three reads and ROLLBACK 1.2 s
        start = time.monotonic()
        assert [c.label for c in s.list_cases()] == ["benign"]
        assert TIMEOUT_S < time.monotonic() - start < 3 * TIMEOUT_S  # longer than the timeout, never cut


def test_a_restarted_postgresql_is_used_again_at_the_first_call(cluster):
    with SupportStore(cluster.new_database(), timeout_s=TIMEOUT_S) as s:
        s.migrate()
        add(s, 1)
        cluster.stop("fast")  # the pooled connection dies with the server
        cluster.start()
        assert s.current_version() == 1  # the dead connection is pinged, dropped and replaced within the call
        assert add(s, 2) == 2
        cluster.stop("fast")
        try:
            with pytest.raises(StoreUnavailableError, match="the support store is unavailable"):
                s.current_version()
        finally:
            cluster.start()
        assert add(s, 3) == 3


def test_a_full_sqlite_disk_is_store_full_and_every_committed_version_survives(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting the small tmpfs that is filled needs root")
    with Tmpfs(tmp_path / "disk", 2 << 20) as disk:
        path = disk.path / "support.db"
        with SupportStore(f"sqlite:///{path}") as s:
            s.migrate()
            assert add(s, 1) == 1
            disk.fill()
            with pytest.raises(StoreFullError, match="the support store is full: no space left") as caught:
                add(s, 2)
            assert str(disk.path) not in str(caught.value)
            assert s.current_version() == 1 and len(s.list_cases()) == 1  # reads go on
            disk.free()
            assert add(s, 3) == 2
        with closing(sqlite3.connect(path)) as db:
            assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
