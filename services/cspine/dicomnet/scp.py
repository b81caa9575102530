"""C-ECHO and C-STORE SCP (pynetdicom): the storage classes of the images cspine analyses, in the transfer
syntaxes ingest decodes; callers checked before anything is stored.

- A calling AE title not in ``allowed_aes`` is rejected at association time (A-ASSOCIATE-RJ, "calling AE title
  not recognised"); a peer address outside ``allowed_peers`` has its connection closed before association.
- Each instance is stored by the spool (durable) before the C-STORE response: Success 0x0000; 0xA700 (out of
  resources) when the study passes a limit or the disk is full; 0xC000 (cannot understand) for bytes that are not
  a Part-10 data set with a study and instance UID.
- With TLS the server speaks DICOM TLS (TLS around the upper layer) with the gateway's certificate and, with a
  client CA, requires client certificates it signed.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Callable

import pydicom.uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]  # generated at import, absent from the stubs
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    MRImageStorage,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from cspine.config import DicomNodeConfig
from cspine.dicom.pixels import can_decode
from cspine.dicomnet.spool import Received, Spool
from cspine.errors import NotDicomError, StudyTooLargeError

logger = logging.getLogger(__name__)

STORAGE_CLASSES = (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    MRImageStorage,
    EnhancedMRImageStorage,
    LegacyConvertedEnhancedMRImageStorage,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
)

SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
# The largest P-DATA PDU the SCP accepts: pynetdicom's default (16 KiB) costs a Python round per 16 KiB of pixels.
MAX_PDU_BYTES = 4 * 1024 * 1024


def transfer_syntaxes() -> list[str]:
    """The transfer syntaxes ingest decodes here (the uncompressed ones, and each compressed one a pydicom
    plugin installed here decodes), uncompressed first."""
    native = [
        pydicom.uid.ExplicitVRLittleEndian,
        pydicom.uid.ImplicitVRLittleEndian,
        pydicom.uid.DeflatedExplicitVRLittleEndian,
        pydicom.uid.ExplicitVRBigEndian,
    ]
    compressed = [ts for ts in pydicom.uid.AllTransferSyntaxes if ts not in native and can_decode(ts)]
    return [*native, *compressed]


# (the instance's place in the spool, peer address, calling AE title, "dimse" or "stow")
OnReceived = Callable[[Received, str, str, str], None]
OnAssociation = Callable[[str, str, str], None]  # (outcome: accepted, rejected, refused; peer; calling AE)


class StoreScp:
    """The DIMSE side of the node; handlers run on pynetdicom's association threads."""

    def __init__(
        self,
        spool: Spool,
        config: DicomNodeConfig,
        host: str,
        on_received: OnReceived,
        on_association: OnAssociation,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.spool = spool
        self.config = config
        self.host = host
        self.on_received = on_received
        self.on_association = on_association
        self.tls = tls
        self.ae = AE(ae_title=config.ae_title)
        self.ae.require_calling_aet = list(config.allowed_aes)
        self.ae.maximum_associations = 16
        self.ae.maximum_pdu_size = MAX_PDU_BYTES
        self.ae.acse_timeout = self.ae.dimse_timeout = self.ae.network_timeout = 60
        self.ae.add_supported_context(Verification)
        syntaxes = transfer_syntaxes()
        for sop_class in STORAGE_CLASSES:
            self.ae.add_supported_context(sop_class, syntaxes)
        self.server: ThreadedAssociationServer | None = None
        self.port = 0

    def start(self) -> int:
        """Listen (port 0: any free one); the port."""
        assert self.config.port is not None
        handlers: list = [
            (evt.EVT_C_ECHO, lambda event: SUCCESS),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, lambda event: self._association(event, "accepted")),
            (evt.EVT_REJECTED, lambda event: self._association(event, "rejected")),
        ]
        server = self.ae.start_server(
            (self.host, self.config.port), block=False, evt_handlers=handlers, ssl_context=self.tls
        )
        assert server is not None  # block=False returns the running server
        networks = self.config.networks
        if networks:  # socketserver calls verify_request before anything is read: a refused peer gets no association
            server.verify_request = lambda request, client_address: self._peer_allowed(client_address[0], networks)  # type: ignore[method-assign]
        self.server = server
        self.port = server.server_address[1]
        logger.info(
            "DICOM node: C-ECHO/C-STORE SCP %s on %s:%d%s, calling AE titles %s",
            self.config.ae_title,
            self.host,
            self.port,
            " (DICOM TLS)" if self.tls else "",
            ", ".join(self.config.allowed_aes) or "any (loopback)",
        )
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _peer_allowed(self, address: str, networks) -> bool:
        try:
            allowed = any(ipaddress.ip_address(address) in network for network in networks)
        except ValueError:
            allowed = False
        if not allowed:
            self.on_association("refused", address, "-")
        return allowed

    def _association(self, event: evt.Event, outcome: str) -> None:
        requestor = event.assoc.requestor
        self.on_association(outcome, str(requestor.address), str(requestor.ae_title).strip())

    def _on_store(self, event: evt.Event) -> int:
        requestor = event.assoc.requestor
        peer, calling = str(requestor.address), str(requestor.ae_title).strip()
        try:
            received = self.spool.store(event.encoded_dataset(), peer, "the C-STORE data set")
        except StudyTooLargeError as error:
            logger.warning("C-STORE from %s refused: %s", calling, error)
            return OUT_OF_RESOURCES
        except NotDicomError as error:
            logger.warning("C-STORE from %s refused: %s", calling, error)
            return CANNOT_UNDERSTAND
        except OSError as error:  # disk full, permissions: nothing was acknowledged
            logger.error("C-STORE from %s not stored: %s", calling, type(error).__name__)
            return OUT_OF_RESOURCES
        self.on_received(received, peer, calling, "dimse")
        return SUCCESS
