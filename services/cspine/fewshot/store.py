"""The support-case store: support cases (embeddings, label, pathology reference, curator — never pixels or
patient identity) and the immutable prototype-set versions made of them, in SQLite or PostgreSQL (DESIGN.md §7).

Each case records which lesion embedding made its vectors (``fewshot.prototypes.embedding_key``: ``""`` for
version 1's ``lesion_embed``). A store serves one embedding at a time (``SupportStore.embedding``): only its cases
make the prototypes, and a study can be added once per embedding, so a site that serves a version set with a
fine-tuned embedding adds its studies again to embed them with it; the other cases stay, listed as not in use.

Every change is one transaction that writes a new version: the next number, who made it, what changed, and
its full membership. Earlier versions are never touched, so any analysis can be audited against the exact
set it used. Writers are serialised — SQLite: ``BEGIN IMMEDIATE`` (one writer at a time, others wait up to
the busy timeout) in WAL mode, so readers are never blocked; PostgreSQL: ``SELECT … FOR UPDATE`` on the one
``store_head`` row — so two writers never lose a case nor number two versions alike. A writer that dies
before committing leaves the previous version as it was.

Replicas sharing one PostgreSQL database do not notify each other: each polls ``current_version()`` (one
primary-key read) and loads ``prototype_set()`` when the number moves, so a change made through one replica
is in use on all of them at most one poll interval later (plus the load).

Faults are answered, never waited out: a store that does not answer is ``StoreUnavailableError`` — a
PostgreSQL connection that waits longer than ``timeout_s`` for the answer to one statement (a stalled network,
a hung server) has its socket shut down, so the thread blocked on it is freed — and a full disk is
``StoreFullError``; in both the transaction is rolled back and every committed version stays as it was
(tests/faults/).
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    insert,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from cspine.domain import Modality
from cspine.errors import (
    CaseNotFoundError,
    DuplicateCaseError,
    InvalidInputError,
    LimitExceededError,
    StoreFullError,
    StoreUnavailableError,
    UnknownClassError,
)
from cspine.fewshot.prototypes import Adaptation, PrototypeSet, SupportSet
from cspine.inference.specs import EMBEDDING_DIM, MAX_PROTOTYPES, MODALITY_ORDER

logger = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
SYNTHETIC_CURATOR = "cspine (SYNTHETIC default)"
SITE_SEED_CURATOR = "cspine (a version's own cases, from the site's cohort)"
SQLITE_BUSY_TIMEOUT_S = 30.0
POSTGRES_CONNECT_TIMEOUT_S = 5
STORE_TIMEOUT_S = 10.0  # the longest PostgreSQL may take to answer one statement (a healthy store: milliseconds)
_DISK_FULL_SQLSTATE = "53100"  # PostgreSQL's disk_full
_MIGRATION_LOCK_KEY = 0x637370696E65  # pg_advisory_xact_lock key: replicas migrating at once take turns
_MAX_TEXT = 64
_MAX_REFERENCE = 1024  # a pathology report's reference, not the report itself
_MAX_NOTE = 4096  # a curator's note; ListCases returns every note, so it must stay small
_MAX_UID = 64  # DICOM UI value representation; the synthetic seed keys are longer, so never a study's

# The tables as migrations/versions/ create them (test_store checks the two agree).
metadata = MetaData()
store_head = Table(
    "store_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("version", Integer, nullable=False),  # the current version; 0 while the store is empty
)
versions = Table(
    "versions",
    metadata,
    Column("number", Integer, primary_key=True, autoincrement=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("created_by", String(_MAX_TEXT), nullable=False),
    Column("change", Text, nullable=False),
)
cases = Table(
    "cases",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("study_uid_hash", String(64), nullable=False, index=True),
    Column("label", String(_MAX_TEXT), nullable=False),
    Column("pathology_reference", Text, nullable=False),
    Column("note", Text, nullable=False),
    Column("curator", String(_MAX_TEXT), nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("synthetic", Boolean, nullable=False),
    Column("embedding", String(64), nullable=False, server_default=""),  # the embedding that made its vectors
)
case_embeddings = Table(
    "case_embeddings",
    metadata,
    Column("case_id", Integer, ForeignKey("cases.id"), primary_key=True),
    Column("modality", String(8), primary_key=True),
    Column("vector", LargeBinary, nullable=False),  # EMBEDDING_DIM little-endian float32
)
version_cases = Table(
    "version_cases",
    metadata,
    Column("version", Integer, ForeignKey("versions.number"), primary_key=True),
    Column("case_id", Integer, ForeignKey("cases.id"), primary_key=True, index=True),
)


@dataclass(frozen=True)
class Case:
    """One support case as stored: no pixels, no patient identity, only the hash of its study's UID (not shown)."""

    id: int
    label: str
    pathology_reference: str
    note: str
    curator: str
    created_at: datetime
    synthetic: bool
    modalities: tuple[Modality, ...]
    embedding: str = ""  # which lesion embedding made its vectors ("": version 1's)
    in_use: bool = True  # made by the store's embedding: only such cases make the prototypes


@dataclass(frozen=True)
class VersionInfo:
    """Who made one prototype-set version, when, what changed, and what it holds."""

    number: int
    created_at: datetime
    created_by: str
    change: str
    case_count: int
    labels: tuple[str, ...]


def study_uid_hash(study_uid: str) -> str:
    """SHA-256 hex of a StudyInstanceUID: what the store keeps to spot a study added twice."""
    return hashlib.sha256(study_uid.encode()).hexdigest()


class SupportStore:
    """Support cases and prototype-set versions in one database: ``sqlite:///path/support.db`` (embedded
    default) or ``postgresql+psycopg://user@host/db`` (replicas sharing it). Thread-safe; call ``migrate()``
    once before use and ``close()`` at the end. A PostgreSQL statement not answered within ``timeout_s`` is
    given up (``StoreUnavailableError``). ``embedding`` is the served lesion embedding's key: new cases are
    recorded as made by it, and only its cases make the prototypes."""

    def __init__(
        self,
        url: str | URL,
        *,
        timeout_s: float = STORE_TIMEOUT_S,
        adaptation: Adaptation | None = None,
        embedding: str = "",
    ) -> None:
        try:
            parsed = make_url(url)
        except ArgumentError as exc:
            raise ValueError("the support store URL is not a database URL") from exc
        if parsed.drivername == "postgresql":  # bare postgresql:// would mean psycopg2, which cspine lacks
            parsed = parsed.set(drivername="postgresql+psycopg")
        self.name = parsed.render_as_string(hide_password=True)
        backend = parsed.get_backend_name()
        self.timeout_s = timeout_s
        self.adaptation = adaptation  # what prototype_set does to the rule's prototypes (None: plain)
        self.embedding = embedding  # the served lesion embedding (fewshot.prototypes.embedding_key)
        self._watchdog: _Watchdog | None = None
        if backend == "sqlite":
            if parsed.database in (None, "", ":memory:"):
                raise ValueError(f"support store {self.name}: SQLite needs a file (sqlite:///path/support.db)")
            self._sqlite_file: Path | None = Path(parsed.database)
            engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
            event.listen(engine, "connect", _sqlite_connect)
            event.listen(engine, "begin", _sqlite_begin)
        elif backend == "postgresql":
            self._sqlite_file = None
            engine = create_engine(
                parsed, pool_timeout=timeout_s, connect_args={"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
            )
            # In place of pool_pre_ping, whose ping no timer would cover: the watchdog pings under its own.
            self._watchdog = _Watchdog(engine, timeout_s)
        else:
            raise ValueError(f"support store {self.name}: only sqlite and postgresql are supported")
        self._engine = engine
        self._writer = engine.execution_options(cspine_write=True)
        # Tests only: called inside the write transaction just before COMMIT (to kill a writer mid-change).
        self._before_commit: Callable[[], None] | None = None

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> SupportStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- schema -------------------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest migration (Alembic ``upgrade head``), in one transaction; replicas
        migrating at once take turns."""
        from alembic import command
        from alembic.config import Config

        if self._sqlite_file is not None:
            self._sqlite_file.parent.mkdir(parents=True, exist_ok=True)
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self._translate(), self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            config.attributes["connection"] = conn
            command.upgrade(config, "head")

    # -- reads --------------------------------------------------------------------------------------------

    def current_version(self) -> int:
        """The current version's number (0 while the store is empty): cheap, for replicas to poll."""
        with self._translate(), self._engine.connect() as conn:
            return _head(conn)

    def prototype_set(self, version: int | None = None) -> PrototypeSet:
        """The prototypes of one version (the current one by default), named ``v<number>``: its site cases
        and its SYNTHETIC default cases (the ``synthetic`` flag) made by the store's ``embedding``, combined by
        the rule of ``PrototypeSet.from_cases`` (docs/support.md), which also says per class which cases weigh
        how much, then adapted to the site's cases by the store's ``adaptation``."""
        with self._translate(), self._engine.connect() as conn:
            number = self._resolve(conn, version)
            rows = [row for row in _member_rows(conn, number) if row.embedding == self.embedding]
            vectors = _vectors(conn, number, self.embedding)
        if not rows:
            return PrototypeSet(f"v{number}", (), {})
        embeddings = np.full((len(rows), len(MODALITY_ORDER), EMBEDDING_DIM), np.nan, dtype=np.float32)
        slot = {modality: m for m, modality in enumerate(MODALITY_ORDER)}
        index = {row.id: i for i, row in enumerate(rows)}
        for case_id, modality, vector in vectors:
            embeddings[index[case_id], slot[Modality(modality)]] = _decode(vector)
        support = SupportSet(embeddings, tuple(row.label for row in rows))
        flags = [bool(row.synthetic) for row in rows]
        return PrototypeSet.from_cases(support, flags, f"v{number}", adaptation=self.adaptation)

    def list_cases(self, version: int | None = None) -> list[Case]:
        """The cases of one version (the current one by default), oldest first."""
        with self._translate(), self._engine.connect() as conn:
            number = self._resolve(conn, version)
            rows = _member_rows(conn, number)
            present: dict[int, set[Modality]] = {}
            for case_id, modality, _ in _vectors(conn, number):
                present.setdefault(case_id, set()).add(Modality(modality))
        return [
            Case(
                id=row.id,
                label=row.label,
                pathology_reference=row.pathology_reference,
                note=row.note,
                curator=row.curator,
                created_at=_utc(row.created_at),
                synthetic=row.synthetic,
                modalities=tuple(m for m in MODALITY_ORDER if m in present.get(row.id, ())),
                embedding=row.embedding,
                in_use=row.embedding == self.embedding,
            )
            for row in rows
        ]

    def version_info(self, version: int | None = None) -> VersionInfo:
        """Who made one version (the current one by default), when, what changed, and what it holds."""
        with self._translate(), self._engine.connect() as conn:
            number = self._resolve(conn, version)
            row = conn.execute(select(versions).where(versions.c.number == number)).one()
            labels = _labels(conn, number)
            count = conn.execute(
                select(func.count()).select_from(version_cases).where(version_cases.c.version == number)
            ).scalar_one()
        return VersionInfo(number, _utc(row.created_at), row.created_by, row.change, count, labels)

    # -- changes ------------------------------------------------------------------------------------------

    def add_case(
        self,
        study_uid: str,
        label: str,
        embeddings: Mapping[Modality | str, np.ndarray],
        *,
        pathology_reference: str,
        curator: str,
        note: str = "",
        create_class: bool = False,
    ) -> int:
        """Add one pathology-confirmed case, made by the store's ``embedding``, to the current set; returns the
        new version's number. A label that is not yet a class needs ``create_class=True``. A study already in
        the set by another embedding is added again (embedded anew), and its earlier case stays."""
        uid = study_uid.strip().rstrip("\x00")
        if not uid or len(uid) > _MAX_UID or not uid.isprintable():
            raise InvalidInputError(f"study_uid is not a DICOM UID (1 to {_MAX_UID} printable characters)")
        label = _required("label", label)
        curator = _required("curator", curator)
        pathology_reference = _required("pathology_reference", pathology_reference, limit=_MAX_REFERENCE)
        if len(note) > _MAX_NOTE:
            raise InvalidInputError(f"note is longer than {_MAX_NOTE} characters")
        vectors = _validated_embeddings(embeddings)
        digest = study_uid_hash(uid)
        with self._writing() as (conn, head):
            existing = conn.execute(
                select(cases.c.id)
                .join(version_cases, version_cases.c.case_id == cases.c.id)
                .where(
                    version_cases.c.version == head,
                    cases.c.study_uid_hash == digest,
                    cases.c.embedding == self.embedding,
                )
            ).scalar()
            if existing is not None:
                raise DuplicateCaseError(f"this study is already in the current support set as case {existing}")
            labels = _labels(conn, head) if head else ()
            if label not in labels:
                if not create_class:
                    known = ", ".join(labels) or "none yet"
                    raise UnknownClassError(f"unknown class {label!r} (classes: {known}); set create_class to add it")
                if len(labels) >= MAX_PROTOTYPES:
                    raise LimitExceededError(f"the support set already has {len(labels)} classes, the most allowed")
            now = datetime.now(UTC)
            case_id = _insert_case(
                conn, digest, label, pathology_reference, note, curator, now, False, vectors, self.embedding
            )
            new_class = "" if label in labels else "new class "
            change = f"add case {case_id} ({new_class}{label})"
            number = _new_version(conn, head, curator, change, now, add=[case_id])
        logger.info("support store %s: version %d: %s by %s", self.name, number, change, curator)
        return number

    def remove_case(self, case_id: int, curator: str) -> int:
        """Take one case out of the current set; returns the new version's number. Removing the last case of
        a class removes the class."""
        curator = _required("curator", curator)
        with self._writing() as (conn, head):
            label = conn.execute(
                select(cases.c.label)
                .join(version_cases, version_cases.c.case_id == cases.c.id)
                .where(version_cases.c.version == head, cases.c.id == case_id)
            ).scalar()
            if label is None:
                raise CaseNotFoundError(f"the current support set has no case {case_id}")
            change = f"remove case {case_id} ({label})"
            number = _new_version(conn, head, curator, change, datetime.now(UTC), remove=case_id)
        logger.info("support store %s: version %d: %s by %s", self.name, number, change, curator)
        return number

    def seed_defaults(self, support: SupportSet) -> bool:
        """Add ``support`` (the served version set's default support set: ``fewshot.prototypes.default_support``)
        as cases made by the store's ``embedding``, in a new version (version 1 in an empty store), when the store
        has never been seeded with cases of that embedding; True when it did. The shipped SYNTHETIC set goes in as
        default cases; a version's set made from a site's cohort (``support.site``) as site cases. Seeded cases a
        curator removed are not added back. Safe when replicas call it at once: one writes, the others find it
        done."""
        key = hashlib.sha256(np.ascontiguousarray(support.embeddings, dtype=np.float32).tobytes()).hexdigest()
        curator = SITE_SEED_CURATOR if support.site else SYNTHETIC_CURATOR
        reference = "SYNTHETIC" if support.synthetic else "the cohort's manifest"
        with self._writing() as (conn, head):
            seeded = conn.execute(
                select(cases.c.id)
                .where(cases.c.curator.in_((SYNTHETIC_CURATOR, SITE_SEED_CURATOR)), cases.c.embedding == self.embedding)
                .limit(1)
            ).scalar()
            if seeded is not None:
                return False
            now = datetime.now(UTC)
            note = support.source or "SYNTHETIC phantom lesion shipped with cspine"
            members = []
            for row, label in enumerate(support.labels):
                vectors = {
                    modality: support.embeddings[row, m]
                    for m, modality in enumerate(MODALITY_ORDER)
                    if not np.isnan(support.embeddings[row, m]).any()
                }
                # Longer than any UID add_case accepts: never the hash of a real study.
                digest = study_uid_hash(f"cspine:synthetic-default:{key}:{row}")
                case_id = _insert_case(
                    conn, digest, label, reference, note, curator, now, not support.site, vectors, self.embedding
                )
                members.append(case_id)
            synthetic = "SYNTHETIC " if support.synthetic else ""
            kind = "the version's own cases from its cohort" if support.site else "default support set"
            embedding = f" of embedding {self.embedding}" if self.embedding else ""
            change = f"seed {synthetic}{kind}{embedding} ({len(members)} cases)"
            number = _new_version(conn, head, curator, change, now, add=members)
        logger.info("support store %s: version %d: %s", self.name, number, change)
        return True

    # -- plumbing -----------------------------------------------------------------------------------------

    @contextmanager
    def _translate(self) -> Iterator[None]:
        watchdog = self._watchdog
        if watchdog is not None:
            watchdog.expired.discard(threading.get_ident())
        try:
            yield
        except (OperationalError, InterfaceError) as exc:  # the database, not the request: bugs propagate
            if _disk_full(exc.orig):
                logger.warning("support store %s is full", self.name)
                raise StoreFullError(
                    "the support store is full: no space left on its disk to write; free some and retry"
                ) from exc
            if watchdog is not None and threading.get_ident() in watchdog.expired:
                reason = f"no answer within {watchdog.timeout_s:g} s"
            else:  # the driver's words name the host, port and user: for the server's log, not for clients
                said = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else type(exc.orig).__name__
                logger.warning("support store %s is unavailable: %s", self.name, said)
                reason = f"the database driver reports {type(exc.orig).__name__}"
            if self._sqlite_file is not None:  # the file may have been replaced under the pool: reopen it next call
                self._engine.dispose()
            # Clients see "the support store", never its URL (self.name, the password hidden, is for the log).
            raise StoreUnavailableError(f"the support store is unavailable: {reason}") from exc
        except PoolTimeoutError as exc:  # every pooled connection is held by a call the store has not answered
            raise StoreUnavailableError(
                f"the support store is unavailable: no free connection within {self.timeout_s:g} s"
            ) from exc

    @contextmanager
    def _writing(self) -> Iterator[tuple[Connection, int]]:
        """One serialised write transaction, with the current version number read under the writers' lock."""
        with self._translate(), self._writer.begin() as conn:
            # FOR UPDATE makes PostgreSQL writers queue on this one row; on SQLite BEGIN IMMEDIATE already has.
            head = conn.execute(select(store_head.c.version).where(store_head.c.id == 1).with_for_update()).scalar()
            if head is None:
                raise StoreUnavailableError("the support store is not initialised: run migrate() first")
            yield conn, head
            if self._before_commit is not None:
                self._before_commit()

    def _resolve(self, conn: Connection, version: int | None) -> int:
        head = _head(conn)
        if version is None:
            if head == 0:
                raise StoreUnavailableError("the support store holds no prototype-set version yet")
            return head
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= head:
            raise InvalidInputError(f"no prototype-set version {version!r} (versions 1 to {head})")
        return version


class _Watch:
    """One connection out of the pool: when it is given up unless the store answers, and the timer that will
    check."""

    def __init__(self, deadline: float, thread: int) -> None:
        self.deadline = deadline
        self.thread = thread  # the thread whose call holds the connection
        self.timer: threading.Timer | None = None


class _Watchdog:
    """Gives up on a PostgreSQL connection that waits longer than ``timeout_s`` for the store to answer one
    statement: its socket is shut down, so the psycopg call blocked on it fails at once and the pool drops it.
    Without it a store that stalls (packets no longer answered, a hung server) would hold the calling thread
    forever. Armed when a connection leaves the pool, pushed back at each statement and commit (so a long series
    of quick ones, the SYNTHETIC seed, is never cut), disarmed when it returns; the ping that checks a pooled
    connection is still alive (after a restart it is not) runs under the same timer."""

    def __init__(self, engine, timeout_s: float) -> None:
        if timeout_s <= 0:
            raise ValueError(f"the store timeout must be positive, got {timeout_s}")
        self.timeout_s = timeout_s
        self.expired: set[int] = set()  # threads whose call was given up, for _translate to say so
        self._dialect = engine.dialect
        self._lock = threading.Lock()
        event.listen(engine, "connect", self._connected)
        event.listen(engine, "checkout", self._checkout)
        event.listen(engine, "checkin", self._checkin)
        event.listen(engine, "before_cursor_execute", self._answer_awaited)
        event.listen(engine, "commit", self._answer_awaited)

    def _connected(self, dbapi_connection, record) -> None:
        record.info["cspine_fresh"] = True  # just opened: no ping needed

    def _checkout(self, dbapi_connection, record, proxy) -> None:
        watch = _Watch(time.monotonic() + self.timeout_s, threading.get_ident())
        with self._lock:
            record.info["cspine_watch"] = watch
            self._schedule(watch, dbapi_connection, record, self.timeout_s)
        if record.info.pop("cspine_fresh", False):
            return
        try:
            self._dialect.do_ping(dbapi_connection)
        except self._dialect.loaded_dbapi.Error as error:
            if watch.thread in self.expired:
                raise  # the store does not answer: the call fails (the pool drops the connection)
            self._checkin(dbapi_connection, record)
            raise DisconnectionError("the pooled connection is dead") from error  # the pool opens a fresh one

    def _answer_awaited(self, conn, *args) -> None:
        watch = conn.connection.info.get("cspine_watch")
        if watch is not None:
            watch.deadline = time.monotonic() + self.timeout_s

    def _checkin(self, dbapi_connection, record) -> None:
        with self._lock:
            watch = record.info.pop("cspine_watch", None)
        if watch is not None:
            watch.timer.cancel()

    def _schedule(self, watch: _Watch, dbapi_connection, record, delay_s: float) -> None:
        watch.timer = threading.Timer(delay_s, self._expire, (watch, dbapi_connection, record))
        watch.timer.daemon = True
        watch.timer.start()

    def _expire(self, watch: _Watch, dbapi_connection, record) -> None:
        with self._lock:
            if record.info.get("cspine_watch") is not watch:
                return  # returned to the pool meanwhile
            remaining = watch.deadline - time.monotonic()
            if remaining > 0:  # a statement was sent since: wait for its answer
                self._schedule(watch, dbapi_connection, record, remaining)
                return
            self.expired.add(watch.thread)
        logger.warning("support store: no answer within %g s: giving up the connection", self.timeout_s)
        try:
            fd = dbapi_connection.pgconn.socket  # raises once the connection is closed
            with socket.socket(fileno=os.dup(fd)) as sock:
                if dbapi_connection.pgconn.socket == fd:  # the duplicate is this connection's socket
                    sock.shutdown(socket.SHUT_RDWR)
        except (OSError, self._dialect.loaded_dbapi.Error):
            pass  # closed meanwhile: nobody waits on it


def _disk_full(error: BaseException | None) -> bool:
    return getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or (
        getattr(error, "sqlstate", None) == _DISK_FULL_SQLSTATE
    )


def _sqlite_connect(dbapi_connection, connection_record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own would be deferred, and skips DDL).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # Readers never wait for the writer. Switching a new file to WAL needs a moment alone with it, and SQLite
    # answers "locked" at once (no busy wait) when another connection is opening it too: try again briefly.
    for attempt in range(100):
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or attempt == 99:
                raise
            time.sleep(0.05)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(conn: Connection) -> None:
    # A writer takes the write lock up front (waiting up to the busy timeout), so two writers cannot both read
    # version n and both write n + 1.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("cspine_write") else "BEGIN")


def _head(conn: Connection) -> int:
    head = conn.execute(select(store_head.c.version).where(store_head.c.id == 1)).scalar()
    if head is None:
        raise StoreUnavailableError("the support store is not initialised: run migrate() first")
    return head


def _member_rows(conn: Connection, number: int) -> list:
    return list(
        conn.execute(
            select(cases)
            .join(version_cases, version_cases.c.case_id == cases.c.id)
            .where(version_cases.c.version == number)
            .order_by(cases.c.id)
        )
    )


def _vectors(conn: Connection, number: int, embedding: str | None = None) -> list:
    """The vectors of one version's cases (those made by ``embedding``, unless None)."""
    query = (
        select(case_embeddings.c.case_id, case_embeddings.c.modality, case_embeddings.c.vector)
        .join(version_cases, version_cases.c.case_id == case_embeddings.c.case_id)
        .where(version_cases.c.version == number)
    )
    if embedding is not None:
        query = query.join(cases, cases.c.id == case_embeddings.c.case_id).where(cases.c.embedding == embedding)
    return list(conn.execute(query))


def _labels(conn: Connection, number: int) -> tuple[str, ...]:
    """The classes of one version, in the prototype set's order (by each class's oldest case)."""
    rows = conn.execute(
        select(cases.c.label, func.min(cases.c.id).label("first"))
        .join(version_cases, version_cases.c.case_id == cases.c.id)
        .where(version_cases.c.version == number)
        .group_by(cases.c.label)
        .order_by("first")
    )
    return tuple(row.label for row in rows)


def _insert_case(
    conn: Connection,
    digest: str,
    label: str,
    pathology_reference: str,
    note: str,
    curator: str,
    now: datetime,
    synthetic: bool,
    vectors: Mapping[Modality, np.ndarray],
    embedding: str,
) -> int:
    case_id = conn.execute(
        insert(cases)
        .values(
            study_uid_hash=digest,
            label=label,
            pathology_reference=pathology_reference,
            note=note,
            curator=curator,
            created_at=now,
            synthetic=synthetic,
            embedding=embedding,
        )
        .returning(cases.c.id)
    ).scalar_one()
    conn.execute(
        insert(case_embeddings),
        [{"case_id": case_id, "modality": m.value, "vector": _encode(v)} for m, v in vectors.items()],
    )
    return case_id


def _new_version(
    conn: Connection,
    head: int,
    created_by: str,
    change: str,
    now: datetime,
    add: Sequence[int] = (),
    remove: int | None = None,
) -> int:
    """Write version head + 1: the previous membership, plus ``add``, minus ``remove``; move the head."""
    number = head + 1
    conn.execute(insert(versions).values(number=number, created_at=now, created_by=created_by, change=change))
    previous = select(literal(number), version_cases.c.case_id).where(version_cases.c.version == head)
    if remove is not None:
        previous = previous.where(version_cases.c.case_id != remove)
    conn.execute(insert(version_cases).from_select(["version", "case_id"], previous))
    if add:
        conn.execute(insert(version_cases), [{"version": number, "case_id": case_id} for case_id in add])
    conn.execute(update(store_head).where(store_head.c.id == 1).values(version=number))
    return number


def _validated_embeddings(embeddings: Mapping[Modality | str, np.ndarray]) -> dict[Modality, np.ndarray]:
    if not embeddings:
        raise InvalidInputError("a support case needs an embedding for at least one modality")
    vectors = {}
    for key, value in embeddings.items():
        try:
            modality = Modality(key)
        except ValueError:
            raise InvalidInputError(
                f"unknown modality {key!r} (one of {', '.join(m.value for m in Modality)})"
            ) from None
        vector = np.asarray(value)
        if vector.shape != (EMBEDDING_DIM,) or not np.issubdtype(vector.dtype, np.number):
            raise InvalidInputError(f"{modality.value} embedding has shape {vector.shape}, not ({EMBEDDING_DIM},)")
        if not np.isfinite(vector).all():
            raise InvalidInputError(f"{modality.value} embedding holds NaN or infinite values")
        vectors[modality] = vector.astype(np.float32)
    return vectors


def _required(name: str, value: str, limit: int | None = _MAX_TEXT) -> str:
    value = value.strip() if isinstance(value, str) else ""
    if not value:
        raise InvalidInputError(f"{name} is required")
    if limit is not None and len(value) > limit:
        raise InvalidInputError(f"{name} is longer than {limit} characters")
    return value


def _encode(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def _decode(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")


def _utc(moment: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones in the session's time zone.
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
