"""Received instances, durable before they are acknowledged, grouped by study until the study is complete.

Each instance is written to ``instances/<study>/<instance>.dcm`` (names are SHA-256 prefixes of the UIDs, never
the UIDs or anything else from the header) through a temporary file, fsync and rename, and then recorded in
``spool.db`` (SQLite, WAL, synchronous FULL) in one transaction; only then does C-STORE answer Success or
STOW-RS 200. A crash before the row commits leaves at most an orphan file, never an acknowledged instance
that is gone. A study is *due* once ``quiet_s`` has passed since its last instance (or at once after an explicit
trigger) and it has instances no analysis has covered yet; an instance arriving for a study already analysed
makes it due again, with every instance it has. Instances are deleted ``retain_s`` after the analysis that
covered them. Every method is safe to call from the C-STORE threads and the event loop's worker threads.
"""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from cspine.config import IngestLimits
from cspine.errors import InvalidInputError, NotDicomError, StudyTooLargeError

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    last_received REAL NOT NULL,     -- time.time() of its newest instance
    analysed_upto REAL NOT NULL DEFAULT 0,  -- last_received when the latest analysis started
    analysed_at REAL,
    triggered INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,  -- a transient failure: not again before this time
    peer TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS instances (
    study_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class TEXT NOT NULL,
    path TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    PRIMARY KEY (study_uid, sop_uid)
);
"""


class StudyMismatchError(InvalidInputError):
    """An instance sent to a study's URL belongs to another study."""


@dataclass(frozen=True)
class Received:
    study_uid: str
    sop_uid: str
    sop_class: str
    new_study: bool  # the first instance of the study (since its last purge)


def name_of(uid: str) -> str:
    """A file name for a UID: 16 hex digits of its SHA-256 (a UID never becomes a path itself)."""
    return hashlib.sha256(uid.encode()).hexdigest()[:16]


def _uid(ds: pydicom.Dataset, keyword: str, label: str) -> str:
    value = str(ds.get(keyword, "") or "").strip()
    if not value or len(value) > 64 or any(c not in "0123456789." for c in value):
        raise NotDicomError(label, f"{keyword} is missing or not a UID")
    return value


def identify(data: bytes, label: str) -> tuple[str, str, str]:
    """(StudyInstanceUID, SOPInstanceUID, SOPClassUID) of a Part-10 file, read without its pixel data."""
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
    except (InvalidDicomError, EOFError):
        raise NotDicomError(label, "not a DICOM Part-10 file") from None
    except Exception as error:  # noqa: BLE001 - whatever pydicom raises on damaged bytes
        raise NotDicomError(label, f"unreadable DICOM ({type(error).__name__})") from None
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return _uid(ds, "StudyInstanceUID", label), _uid(ds, "SOPInstanceUID", label), sop_class


class Spool:
    def __init__(self, root: Path, limits: IngestLimits = IngestLimits()) -> None:
        self.root = root
        self.limits = limits
        (root / "instances").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_database(root / "spool.db", SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # Arrivals ---------------------------------------------------------------------------------------------

    def store(self, data: bytes, peer: str, label: str = "received instance", study: str | None = None) -> Received:
        """Keep one Part-10 instance durably. NotDicomError for bytes that are not one; StudyTooLargeError when
        the study would pass the ingest limits (instances, bytes), which the analysis would refuse anyway;
        StudyMismatchError when ``study`` is given and the instance belongs to another."""
        study_uid, sop_uid, sop_class = identify(data, label)
        if study is not None and study != study_uid:
            raise StudyMismatchError(f"{label} belongs to another study than the one addressed")
        folder = self.root / "instances" / name_of(study_uid)
        path = folder / f"{name_of(sop_uid)}.dcm"
        with self._lock:
            count, total = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM instances WHERE study_uid = ? AND sop_uid != ?",
                (study_uid, sop_uid),
            ).fetchone()
            if count + 1 > self.limits.max_instances:
                raise StudyTooLargeError(f"the study has more than the limit of {self.limits.max_instances} instances")
            if total + len(data) > self.limits.max_study_bytes:
                raise StudyTooLargeError(f"the study is larger than the limit of {self.limits.max_study_bytes} bytes")
            folder.mkdir(exist_ok=True)
            write_durably(path, data)
            new_study = self._db.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone() is None
            with self._db:  # one transaction
                self._db.execute("BEGIN")
                self._db.execute(
                    "INSERT INTO studies (study_uid, last_received, peer) VALUES (?, ?, ?) ON CONFLICT (study_uid) "
                    "DO UPDATE SET last_received = excluded.last_received, peer = excluded.peer",
                    (study_uid, time.time(), peer),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?)",
                    (study_uid, sop_uid, sop_class, str(path.relative_to(self.root)), len(data)),
                )
        return Received(study_uid, sop_uid, sop_class, new_study)

    def trigger(self, study_uid: str) -> bool:
        """Make a study due at once (STOW-RS's explicit trigger); False when no instance of it is here."""
        with self._lock:
            cursor = self._db.execute("UPDATE studies SET triggered = 1 WHERE study_uid = ?", (study_uid,))
        return cursor.rowcount > 0

    # Analysis ---------------------------------------------------------------------------------------------

    def due(self, now: float, quiet_s: float) -> list[str]:
        """Studies complete and not analysed since their last instance, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT study_uid FROM studies WHERE last_received > analysed_upto AND not_before <= ? "
                "AND (triggered = 1 OR last_received <= ?) ORDER BY last_received",
                (now, now - quiet_s),
            ).fetchall()
        return [uid for (uid,) in rows]

    def next_due(self, quiet_s: float) -> float | None:
        """When the next study becomes due if nothing else arrives (time.time()), or None."""
        with self._lock:
            (when,) = self._db.execute(
                "SELECT MIN(CASE WHEN triggered = 1 THEN not_before ELSE MAX(last_received + ?, not_before) END) "
                "FROM studies WHERE last_received > analysed_upto",
                (quiet_s,),
            ).fetchone()
        return when

    def begin(self, study_uid: str) -> tuple[float, str, list[tuple[str, bytes]]]:
        """(the arrival time the analysis covers, the last peer, the instances as ``(label, bytes)``)."""
        with self._lock:
            last, peer = self._db.execute(
                "SELECT last_received, peer FROM studies WHERE study_uid = ?", (study_uid,)
            ).fetchone()
            rows = self._db.execute(
                "SELECT path FROM instances WHERE study_uid = ? ORDER BY path", (study_uid,)
            ).fetchall()
        instances = [(f"received instance {n + 1}", (self.root / path).read_bytes()) for n, (path,) in enumerate(rows)]
        return last, peer, instances

    def finish(self, study_uid: str, upto: float) -> None:
        """The analysis that started when the study's newest instance arrived at ``upto`` is done (its results,
        or the SR saying why there are none, are in the outbox)."""
        with self._lock:
            self._db.execute(
                "UPDATE studies SET analysed_upto = ?, analysed_at = ?, triggered = 0, not_before = 0 "
                "WHERE study_uid = ?",
                (upto, time.time(), study_uid),
            )

    def defer(self, study_uid: str, until: float) -> None:
        """A transient failure (Triton down, the service full): try the study again at ``until``."""
        with self._lock:
            self._db.execute("UPDATE studies SET not_before = ? WHERE study_uid = ?", (until, study_uid))

    def purge(self, now: float, retain_s: float) -> int:
        """Delete the instances of studies analysed more than ``retain_s`` ago with nothing newer; their count."""
        with self._lock:
            studies = [
                uid
                for (uid,) in self._db.execute(
                    "SELECT study_uid FROM studies WHERE analysed_upto >= last_received AND analysed_at < ?",
                    (now - retain_s,),
                ).fetchall()
            ]
            removed = 0
            for uid in studies:
                paths = self._db.execute("SELECT path FROM instances WHERE study_uid = ?", (uid,)).fetchall()
                with self._db:
                    self._db.execute("BEGIN")
                    self._db.execute("DELETE FROM instances WHERE study_uid = ?", (uid,))
                    self._db.execute("DELETE FROM studies WHERE study_uid = ?", (uid,))
                for (path,) in paths:
                    (self.root / path).unlink(missing_ok=True)
                    removed += 1
                folder = self.root / "instances" / name_of(uid)
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()
        return removed

    def pending(self) -> int:
        """Studies with instances no analysis has covered yet."""
        with self._lock:
            (count,) = self._db.execute("SELECT COUNT(*) FROM studies WHERE last_received > analysed_upto").fetchone()
        return count


def open_database(path: Path, schema: str) -> sqlite3.Connection:
    """A SQLite file in WAL mode whose commits are on disk when they return (synchronous FULL), shared by threads
    (callers hold their own lock), in autocommit mode: a transaction is an explicit BEGIN inside ``with db``."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(schema)
    return db


def write_durably(path: Path, data: bytes) -> None:
    """``data`` at ``path``, on disk before this returns: a temporary file, fsync, rename, fsync of the folder."""
    temporary = path.with_suffix(".part")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
