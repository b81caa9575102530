"""DICOM in and out: ingest (Part-10 bytes → Study), series selection, the inspect report, the ingest
benchmark, and the DICOM SEG / SR writers. Import the submodules (``cspine.dicom.ingest`` …)."""
