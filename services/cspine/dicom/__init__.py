"""DICOM in and out: ingest (Part-10 bytes → Study), series selection, the inspect report, and the DICOM SEG / SR
writers (the ingest benchmark is ``cspine.bench.ingest``). Import the submodules (``cspine.dicom.ingest`` …).

``ingest`` is the entry point of ingest and holds its design notes; its parts, each importing only ones
before it: ``records``, ``attributes``, ``classify``, ``parse``, ``geometry``, ``pixels``, ``assemble``."""
