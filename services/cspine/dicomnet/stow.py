"""DICOMweb STOW-RS receiver (aiohttp): ``POST /studies`` and ``POST /studies/{StudyInstanceUID}`` with a
``multipart/related; type="application/dicom"`` body, and ``POST /studies/{StudyInstanceUID}/complete`` to
have a study analysed without waiting for the quiet period.

Status codes: 200 every part stored; 202 some stored (the response lists which failed); 400 none stored
because no part was a DICOM data set (or a part belongs to another study than the URL's); 401 no or an unknown
bearer token; 403 a token whose role may not analyse; 404 ``complete`` for a study with no instance here; 413
the body passes the study limit (``Content-Length`` or counted); 415 not multipart/related of application/dicom;
503 the disk refused a write. Every part is stored durably (spool.py) before the response says so.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from aiohttp import BodyPartReader, web

from cspine.config import IngestLimits
from cspine.dicomnet.spool import Received, Spool, StudyMismatchError
from cspine.errors import NotDicomError, StudyTooLargeError
from cspine.gateway.tokens import Role, TokenStore

logger = logging.getLogger(__name__)

CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700
STUDY_MISMATCH = 0xA900  # "data set does not match SOP class" is the nearest; the URL named another study


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _sequence(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"vr": "SQ", "Value": items}


def _reference(sop_class: str | None, sop_uid: str | None, failure: int | None = None) -> dict[str, Any]:
    """A Referenced SOP Sequence item; a part that is no DICOM data set has no UIDs to name, only its reason."""
    item: dict[str, Any] = {}
    if sop_class and sop_uid:
        item["00081150"] = {"vr": "UI", "Value": [sop_class]}
        item["00081155"] = {"vr": "UI", "Value": [sop_uid]}
    if failure is not None:
        item["00081197"] = {"vr": "US", "Value": [failure]}
    return item


class StowReceiver:
    def __init__(
        self,
        spool: Spool,
        tokens: TokenStore,
        limits: IngestLimits,
        on_received: Callable[[Received, str, str, str], None],
        on_trigger: Callable[[str], None],
    ) -> None:
        self.spool = spool
        self.tokens = tokens
        self.limits = limits
        self.on_received = on_received
        self.on_trigger = on_trigger
        self.runner: web.AppRunner | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._authenticate])
        app.router.add_post("/studies", self.store)
        app.router.add_post("/studies/{study}", self.store)
        app.router.add_post("/studies/{study}/complete", self.complete)
        return app

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=tls)
        await site.start()
        self.port = self.runner.addresses[0][1]  # the bound port (port 0: the one the system chose)
        logger.info("DICOM node: STOW-RS on %s://%s:%d/studies", "https" if tls else "http", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @web.middleware
    async def _authenticate(self, request: web.Request, handler) -> web.StreamResponse:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        caller = self.tokens.caller_of(token.strip()) if scheme.lower() == "bearer" else None
        if caller is None:
            return _error(401, "a bearer token cspine knows is required", **{"WWW-Authenticate": "Bearer"})
        if caller.role.rank < Role.ANALYST.rank:
            return _error(403, f"the role {caller.role.value} may not send studies")
        return await handler(request)

    async def complete(self, request: web.Request) -> web.Response:
        study = request.match_info["study"]
        if not await asyncio.to_thread(self.spool.trigger, study):
            return _error(404, "no instance of this study has been received")
        self.on_trigger(study)
        return web.json_response({"study": study, "status": "queued for analysis"}, status=202)

    async def store(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > self.limits.max_study_bytes:
            return _error(413, f"the body is larger than the limit of {self.limits.max_study_bytes} bytes")
        if request.content_type != "multipart/related" or "application/dicom" not in request.headers.get(
            "Content-Type", ""
        ):
            return _error(415, 'the body must be multipart/related; type="application/dicom"')
        want_study = request.match_info.get("study")
        peer = request.remote or "-"
        stored: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        total = 0
        reader = await request.multipart()
        part_number = 0
        while True:
            part = await reader.next()
            if part is None:
                break
            part_number += 1
            if not isinstance(part, BodyPartReader):
                failed.append(_reference(None, None, CANNOT_UNDERSTAND))
                continue
            data = bytearray()
            while chunk := await part.read_chunk(1 << 20):
                total += len(chunk)
                if total > self.limits.max_study_bytes:
                    return _error(413, f"the body is larger than the limit of {self.limits.max_study_bytes} bytes")
                data += chunk
            if part.headers.get("Content-Type", "application/dicom").split(";")[0].strip() != "application/dicom":
                failed.append(_reference(None, None, CANNOT_UNDERSTAND))
                continue
            label = f"part {part_number}"
            try:
                received = await asyncio.to_thread(self.spool.store, bytes(data), peer, label, want_study)
            except NotDicomError as error:
                logger.warning("STOW-RS from %s: %s", peer, error)
                failed.append(_reference(None, None, CANNOT_UNDERSTAND))
                continue
            except StudyMismatchError:
                failed.append(_reference(None, None, STUDY_MISMATCH))
                continue
            except StudyTooLargeError as error:
                return _error(413, str(error))
            except OSError as error:
                logger.error("STOW-RS from %s not stored: %s", peer, type(error).__name__)
                return _error(503, "the received instances could not be stored; nothing of this part was kept")
            stored.append(_reference(received.sop_class, received.sop_uid))
            self.on_received(received, peer, "-", "stow")
        if not stored:
            return _error(400, f"no part of the body is a DICOM data set cspine can store ({len(failed)} parts)")
        body: dict[str, Any] = {"00081199": _sequence(stored)}
        if failed:
            body["00081198"] = _sequence(failed)
        return web.json_response(body, status=202 if failed else 200, content_type="application/dicom+json")
