"""Results waiting for their destinations: durable, retried with backoff until delivered, across restarts.

An object (a SEG or an SR, as Part-10 bytes) is written once to ``outbox/<id>.dcm`` with fsync and recorded
in ``outbox.db`` with one row per destination before the study counts as analysed; a newer analysis of the
same study replaces what an older one still has waiting. A row is deleted when its
destination has taken the object (C-STORE Success or Warning; STOW-RS 200 or 202), and the file with the last
row. A failed try waits ``RETRY_FIRST_S`` × 2^(tries − 1), at most ``RETRY_MAX_S``, before the next. Rows
for a destination no longer configured stay (and count in the depth) until it is configured again.

Senders: C-STORE SCU with pynetdicom (one association per object), STOW-RS with dicomweb-client.
"""

from __future__ import annotations

import io
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from cspine.config import Destination
from cspine.dicomnet.spool import open_database, write_durably

RETRY_FIRST_S = 2.0
RETRY_MAX_S = 300.0
TIMEOUT_S = 60.0  # one association or HTTP request

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    kind TEXT NOT NULL,           -- SEG or SR
    sop_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    destination TEXT NOT NULL,    -- a Destination's name
    tries INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    last_error TEXT
);
"""


class DeliveryError(Exception):
    """A destination did not take an object; the message says why (no patient data: a status, an HTTP code)."""


@dataclass(frozen=True)
class Pending:
    id: int
    study_uid: str
    kind: str
    sop_uid: str
    path: Path
    destination: str
    tries: int
    created: float


def retry_delay(tries: int) -> float:
    """Seconds before try ``tries + 1`` after ``tries`` failed ones."""
    return min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** max(0, tries - 1))


class Outbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "outbox").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = open_database(root / "outbox.db", SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, study_uid: str, objects: list[tuple[str, str, bytes]], destinations: list[str]) -> int:
        """Queue ``(kind, SOP instance UID, bytes)`` objects for every destination, in place of what an earlier
        analysis of the study still has waiting (superseded: a PACS should get the latest results only); the
        rows added."""
        if not destinations:
            return 0
        with self._lock, self._db:
            self._db.execute("BEGIN")
            superseded = self._db.execute("SELECT DISTINCT path FROM outbox WHERE study_uid = ?", (study_uid,))
            stale = [self.root / path for (path,) in superseded.fetchall()]
            self._db.execute("DELETE FROM outbox WHERE study_uid = ?", (study_uid,))
            added = 0
            for kind, sop_uid, data in objects:
                path = Path("outbox") / f"{uuid.uuid4().hex}-{kind.lower()}.dcm"
                write_durably(self.root / path, data)
                for destination in destinations:
                    self._db.execute(
                        "INSERT INTO outbox (study_uid, kind, sop_uid, path, destination, created) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (study_uid, kind, sop_uid, str(path), destination, time.time()),
                    )
                    added += 1
        for path in stale:
            path.unlink(missing_ok=True)
        return added

    def due(self, now: float, destinations: list[str]) -> list[Pending]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, study_uid, kind, sop_uid, path, destination, tries, created FROM outbox "
                f"WHERE not_before <= ? AND destination IN ({','.join('?' * len(destinations))}) ORDER BY id",
                (now, *destinations),
            ).fetchall()
        return [Pending(r[0], r[1], r[2], r[3], self.root / r[4], r[5], r[6], r[7]) for r in rows]

    def delivered(self, item: Pending) -> None:
        with self._lock:
            self._db.execute("DELETE FROM outbox WHERE id = ?", (item.id,))
            (left,) = self._db.execute(
                "SELECT COUNT(*) FROM outbox WHERE path = ?", (str(item.path.relative_to(self.root)),)
            ).fetchone()
        if not left:
            item.path.unlink(missing_ok=True)

    def failed(self, item: Pending, error: str, now: float) -> float:
        """Count a failed try; when the next one is due."""
        when = now + retry_delay(item.tries + 1)
        with self._lock:
            self._db.execute(
                "UPDATE outbox SET tries = tries + 1, not_before = ?, last_error = ? WHERE id = ?",
                (when, error[:500], item.id),
            )
        return when

    def depth(self) -> dict[str, int]:
        """Objects waiting, by destination."""
        with self._lock:
            rows = self._db.execute("SELECT destination, COUNT(*) FROM outbox GROUP BY destination").fetchall()
        return dict(rows)

    def next_due(self, destinations: list[str]) -> float | None:
        """When the next try for one of ``destinations`` is due, or None."""
        with self._lock:
            (when,) = self._db.execute(
                f"SELECT MIN(not_before) FROM outbox WHERE destination IN ({','.join('?' * len(destinations))})",
                destinations,
            ).fetchone()
        return when


# Senders ------------------------------------------------------------------------------------------------------


def send(destination: Destination, data: bytes, calling_ae: str, tls: ssl.SSLContext | None = None) -> None:
    """Deliver one Part-10 object; DeliveryError when the destination does not take it."""
    if destination.kind == "dimse":
        send_c_store(destination, data, calling_ae, tls)
    else:
        send_stow(destination, data)


def send_c_store(destination: Destination, data: bytes, calling_ae: str, tls: ssl.SSLContext | None = None) -> None:
    ds = pydicom.dcmread(io.BytesIO(data))
    ae_title, host, port = destination.dimse
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = TIMEOUT_S
    ae.add_requested_context(ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    tls_args = (tls, host) if tls is not None else None
    assoc = ae.associate(host, port, ae_title=ae_title, tls_args=tls_args)
    if not assoc.is_established:
        reason = "rejected the association" if assoc.is_rejected else "did not answer"
        raise DeliveryError(f"{destination.name} ({ae_title} at {host}:{port}) {reason}")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"{destination.name}: no C-STORE response (timed out or aborted)")
    if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:  # Success, or a Warning: stored
        raise DeliveryError(f"{destination.name}: C-STORE status 0x{code:04X}")


def send_stow(destination: Destination, data: bytes) -> None:
    from dicomweb_client.api import DICOMwebClient

    parts = urlsplit(destination.url)
    session = requests.Session()
    if parts.username:
        session.auth = (parts.username, parts.password or "")
    address = parts.netloc.rpartition("@")[2]  # without the credentials, which the session sends
    url = urlunsplit((parts.scheme, address, parts.path, parts.query, parts.fragment))
    client = DICOMwebClient(url, session=session, timeout=TIMEOUT_S)
    try:
        client.store_instances([pydicom.dcmread(io.BytesIO(data))])
    except requests.HTTPError as error:
        code = error.response.status_code if error.response is not None else "no response"
        raise DeliveryError(f"{destination.name}: STOW-RS answered HTTP {code}") from None
    except requests.RequestException as error:
        raise DeliveryError(f"{destination.name}: STOW-RS failed ({type(error).__name__})") from None
    finally:
        session.close()
