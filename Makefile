# cspine — every target bootstraps what it needs from the project's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cspine-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests use: dciodvfy (dicom3tools) validates every DICOM file cspine writes; the support
# store's tests start a throwaway PostgreSQL 15 cluster; headless chromium renders the clinical report.
SYSTEM_PACKAGES := dicom3tools postgresql-15 chromium

.PHONY: venv protos sysdeps demo test bench train clean

venv: $(STAMP) protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,train]'
	touch $@

# The gRPC API: protos/cspine/v1/*.proto compiled into services/cspine/v1/ (generated, never edited, not committed).
PROTOS := $(wildcard protos/cspine/v1/*.proto)
GENERATED := $(PROTOS:protos/%.proto=services/%_pb2.py)

protos: $(GENERATED)

$(GENERATED) &: $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=services --pyi_out=services \
	  --grpc_python_out=services $(PROTOS)

sysdeps:
	@{ command -v dciodvfy && test -x /usr/lib/postgresql/15/bin/initdb && command -v chromium; } >/dev/null || \
	  $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }

demo: venv
	$(BIN)/cspine demo

test: venv sysdeps
	$(BIN)/ruff check services tests
	$(BIN)/python -m pytest

# Figures, not tests: ingest speed, ONNX Runtime latency, and the local Triton (batching, overhead, shm).
bench: venv
	$(BIN)/cspine bench ingest
	$(BIN)/cspine bench models
	$(BIN)/cspine bench triton
	$(BIN)/cspine bench pipeline
	$(BIN)/cspine bench gateway
	$(BIN)/cspine bench adapt

# Reproduces the shipped models: train on SYNTHETIC phantom data, export ONNX, evaluate (docs/models/).
train: venv
	$(BIN)/cspine train --preset full --workers 2
	$(BIN)/cspine export
	$(BIN)/cspine evaluate models --preset full --out docs/models

clean:
	rm -rf $(VENV) build .pytest_cache
