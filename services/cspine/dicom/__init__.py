"""DICOM in and out: ingest (Part-10 bytes → Study), series selection, the inspect report and the ingest
benchmark; the SEG/SR writers will live here too. Import the submodules (``cspine.dicom.ingest`` …)."""
