"""The DICOM node: receivers (C-STORE, STOW-RS) into the spool, complete studies through the same
``AnalysisService`` as gRPC uploads (its slots and queue, its limits, its metrics), results into the outbox, the
outbox to the destinations.

A study that cannot be analysed (ingest refuses it, nothing in it is assessable, the analysis fails) gets an SR
that says why, sent like any result: the PACS shows a reason, never silence. A study the service cannot take now
(every slot and queue place taken, Triton down, a deadline passed) is tried again after a backoff; nothing is
dropped. Each study received, analysed, delivered or failed is one audit line (logger ``cspine.audit``) with the
study UID, the peer and the calling AE title, never a patient name or ID.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import ssl
import time
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from cspine.config import DicomNodeConfig
from cspine.dicom.outputs import build_failure_sr
from cspine.dicomnet.outbox import DeliveryError, Outbox, Pending, send
from cspine.dicomnet.scp import StoreScp
from cspine.dicomnet.spool import Received, Spool
from cspine.dicomnet.stow import StowReceiver
from cspine.errors import CspineError, DeadlineExceededError, OutputUnavailableError, ServiceFullError, UnavailableError
from cspine.gateway.metrics import Metrics
from cspine.gateway.tokens import TokenStore
from cspine.pipeline import AnalysisOptions
from cspine.service import AnalysisService

logger = logging.getLogger(__name__)
audit_log = logging.getLogger("cspine.audit")

RESULTS = AnalysisOptions(return_dicom_seg=True, return_dicom_sr=True)
RETRY_ANALYSIS_S = 5.0  # the service full or Triton down: the study is tried again this much later
IDLE_WAKE_S = 1.0  # the loops look at the spool and the outbox at least this often


def audit(event: str, **fields: object) -> None:
    """One structured line: the event and UIDs, peers, AE titles, counts and outcomes (never patient data)."""
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    audit_log.info("dicom %s: %s", event, text, extra={"audit": {"event": event, **fields}})


class DicomNode:
    def __init__(
        self,
        service: AnalysisService,
        config: DicomNodeConfig,
        host: str,
        data_dir: Path,
        metrics: Metrics,
        tokens: TokenStore,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self.host = host
        self.root = data_dir / "dicomnet"
        self.metrics = metrics
        self.tokens = tokens
        self.tls = tls
        self.destinations = {d.name: d for d in config.parsed_destinations}
        self.spool = Spool(self.root, service.limits)
        self.outbox = Outbox(self.root)
        metrics.dicom_outbox_depth.set_function(lambda: sum(self.outbox.depth().values()))
        metrics.dicom_pending.set_function(self.spool.pending)
        self.scp: StoreScp | None = None
        self.stow: StowReceiver | None = None
        self.dimse_port: int | None = None
        self.dicomweb_port: int | None = None
        self._tasks: list[asyncio.Task] = []
        self._analyses = asyncio.Event()  # set: look at the spool now
        self._deliveries = asyncio.Event()  # set: look at the outbox now
        self._loop: asyncio.AbstractEventLoop | None = None

    def describe(self) -> str:
        parts = []
        if self.dimse_port is not None:
            tls = " (DICOM TLS)" if self.tls else ""
            parts.append(f"AE {self.config.ae_title} C-ECHO/C-STORE on {self.host}:{self.dimse_port}{tls}")
        if self.dicomweb_port is not None:
            scheme = "https" if self.tls else "http"
            parts.append(f"STOW-RS {scheme}://{self.host}:{self.dicomweb_port}/studies")
        shown = ", ".join(f"{d.name} {d.shown}" for d in self.destinations.values()) or "none"
        return f"cspine serve: DICOM node {'; '.join(parts)}; results to {shown}; data in {self.root}"

    async def start(self) -> DicomNode:
        self._loop = asyncio.get_running_loop()
        if self.config.port is not None:
            self.scp = StoreScp(self.spool, self.config, self.host, self._received, self._association, self.tls)
            self.dimse_port = await asyncio.to_thread(self.scp.start)
        if self.config.dicomweb_port is not None:
            self.stow = StowReceiver(self.spool, self.tokens, self.service.limits, self._received, self._triggered)
            self.dicomweb_port = await self.stow.start(self.host, self.config.dicomweb_port, self.tls)
        unknown = sorted(set(self.outbox.depth()) - set(self.destinations))
        if unknown:
            logger.warning("the outbox holds results for destinations no longer configured: %s", ", ".join(unknown))
        self._tasks = [asyncio.create_task(self._assemble()), asyncio.create_task(self._deliver())]
        return self

    async def stop(self) -> None:
        """Stop receiving, then the loops; what is received and not analysed, or not delivered, stays on disk."""
        if self.scp is not None:
            await asyncio.to_thread(self.scp.stop)
        if self.stow is not None:
            await self.stow.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.metrics.dicom_outbox_depth.set_function(lambda: 0)  # what the closed files held is on disk
        self.metrics.dicom_pending.set_function(lambda: 0)
        self.spool.close()
        self.outbox.close()

    async def __aenter__(self) -> DicomNode:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # Receivers' callbacks (any thread) --------------------------------------------------------------------

    def _received(self, received: Received, peer: str, calling_ae: str, via: str) -> None:
        self.metrics.dicom_instances.labels(via).inc()
        if received.new_study:
            audit("received", study=received.study_uid, peer=peer, ae=calling_ae, via=via)

    def _triggered(self, study_uid: str) -> None:
        audit("completed", study=study_uid, via="stow")
        self._poke(self._analyses)

    def _association(self, outcome: str, peer: str, calling_ae: str) -> None:
        self.metrics.dicom_associations.labels(outcome).inc()
        if outcome != "accepted":
            audit(f"association {outcome}", peer=peer, ae=calling_ae)

    def _poke(self, event: asyncio.Event) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(event.set)

    async def _sleep(self, event: asyncio.Event, until: float | None) -> None:
        timeout = IDLE_WAKE_S if until is None else min(IDLE_WAKE_S, max(0.0, until - time.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        event.clear()

    # Studies ----------------------------------------------------------------------------------------------

    async def _assemble(self) -> None:
        last_purge = 0.0
        while True:
            for study_uid in await asyncio.to_thread(self.spool.due, time.time(), self.config.quiet_s):
                try:
                    await self.analyse(study_uid)
                except Exception:  # the spool or the outbox failed (disk full …): logged, the study tried later
                    logger.exception("the DICOM node could not process a study; it is tried again")
                    await asyncio.to_thread(self.spool.defer, study_uid, time.time() + RETRY_ANALYSIS_S)
            if time.time() - last_purge > 60:
                await asyncio.to_thread(self.spool.purge, time.time(), self.config.retain_s)
                last_purge = time.time()
            await self._sleep(self._analyses, await asyncio.to_thread(self.spool.next_due, self.config.quiet_s))

    async def analyse(self, study_uid: str) -> None:
        """Analyse one complete study and queue its SEG and SR (or an SR saying why there is no result)."""
        upto, peer, instances = await asyncio.to_thread(self.spool.begin, study_uid)
        start = time.perf_counter()
        try:
            async with self.service.slot():
                with self.metrics.in_flight.track_inprogress():
                    analysis = await self.service.analyze(instances, RESULTS)
        except (ServiceFullError, UnavailableError, DeadlineExceededError) as error:  # may pass on a later try
            await asyncio.to_thread(self.spool.defer, study_uid, time.time() + RETRY_ANALYSIS_S)
            audit("deferred", study=study_uid, reason=type(error).__name__)
            return
        except CspineError as error:
            objects, outcome, reason = _failure(instances, str(error)), "not_analysed", type(error).__name__
        except Exception:  # a bug: logged with its trace, and the PACS told the study was not analysed
            logger.exception("the DICOM node's analysis failed")
            message = "the analysis failed inside cspine; the service log has the details"
            objects, outcome, reason = _failure(instances, message), "not_analysed", "internal"
        else:
            self.metrics.observe_stages(analysis.stage_seconds)
            objects = [(kind, data) for kind, data in (("SEG", analysis.dicom_seg), ("SR", analysis.dicom_sr)) if data]
            outcome, reason = "analysed", ",".join(sorted({m.assessment.status.value for m in analysis.modalities}))
        items = [(kind, _sop_uid(data), data) for kind, data in objects]
        await asyncio.to_thread(self.outbox.put, study_uid, items, list(self.destinations))
        await asyncio.to_thread(self.spool.finish, study_uid, upto)
        self.metrics.dicom_studies.labels(outcome).inc()
        audit(
            outcome,
            study=study_uid,
            peer=peer,
            instances=len(instances),
            objects="+".join(kind for kind, _, _ in items),
            reason=reason,
            seconds=round(time.perf_counter() - start, 2),
        )
        self._poke(self._deliveries)

    # Deliveries -------------------------------------------------------------------------------------------

    async def _deliver(self) -> None:
        names = list(self.destinations)
        while True:
            if names:
                for item in await asyncio.to_thread(self.outbox.due, time.time(), names):
                    try:
                        await self.deliver(item)
                    except Exception:  # an unexpected sender error: logged, counted as a failed try
                        logger.exception("a delivery failed unexpectedly; it is tried again")
                        await asyncio.to_thread(self.outbox.failed, item, "unexpected error", time.time())
            await self._sleep(self._deliveries, await asyncio.to_thread(self.outbox.next_due, names))

    async def deliver(self, item: Pending) -> bool:
        destination = self.destinations[item.destination]
        try:
            data = await asyncio.to_thread(item.path.read_bytes)
            await asyncio.to_thread(send, destination, data, self.config.ae_title)
        except (DeliveryError, OSError) as error:
            retry_at = await asyncio.to_thread(self.outbox.failed, item, str(error), time.time())
            self.metrics.dicom_deliveries.labels(item.destination, "failed").inc()
            audit(
                "delivery failed",
                study=item.study_uid,
                object=item.kind,
                destination=item.destination,
                tries=item.tries + 1,
                retry_in_s=round(retry_at - time.time(), 1),
                reason=str(error) if isinstance(error, DeliveryError) else type(error).__name__,
            )
            return False
        await asyncio.to_thread(self.outbox.delivered, item)
        self.metrics.dicom_deliveries.labels(item.destination, "delivered").inc()
        audit("delivered", study=item.study_uid, object=item.kind, destination=item.destination, tries=item.tries + 1)
        return True


def tls_context(cert: Path, key: Path, client_ca: Path | None = None) -> ssl.SSLContext:
    """The server side of DICOM TLS and HTTPS: the gateway's certificate, client certificates required when a
    client CA is given."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _failure(instances: list[tuple[str, bytes]], message: str) -> list[tuple[str, bytes]]:
    """The SR saying why a study has no result, on the header of the first instance it can be placed on (none
    has the UIDs an SR needs: no SR, and the audit line says so)."""
    for _, data in instances:
        try:
            return [("SR", build_failure_sr(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True), message))]
        except (OutputUnavailableError, InvalidDicomError, ValueError, EOFError):
            continue  # the next instance may do
    return []


def _sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
