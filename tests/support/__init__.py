"""Harnesses the tests share, one module each: ``dicom`` (Part-10 builders), ``server`` (an in-process gateway,
channels, uploads, free ports, polling), ``tokens`` (the bearer tokens test gateways accept), ``phantom`` (the
session's SYNTHETIC cohort), ``pipeline`` (an analysis as the service runs it), ``postgres`` (a throwaway
cluster) and ``helm`` (the chart rendered by the real helm). The fixtures built on them are in tests/conftest.py;
pytest puts tests/ on ``sys.path``, so tests import them as ``from support.server import GatewayThread``."""
