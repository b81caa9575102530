"""The DICOM node: how a PACS reaches cspine without the gRPC API.

- ``scp.py``: C-ECHO and C-STORE (pynetdicom) with calling-AE and peer checks at association time, DICOM TLS;
- ``stow.py``: DICOMweb STOW-RS (aiohttp) with the gateway's bearer tokens;
- ``spool.py``: every received instance on disk and in SQLite before it is acknowledged, grouped by study;
- ``outbox.py``: SEG and SR waiting for their destinations (C-STORE SCU, STOW-RS), retried with backoff;
- ``node.py``: a study is complete once quiet for ``quiet_s`` (or on a STOW-RS trigger), then analysed by the
  same ``AnalysisService`` as a gRPC upload, and its results (or an SR saying why it could not be) queued.

Nothing here speaks a DICOM network protocol by hand. docs/dicom-node.md describes the node for integrators.
"""
