# cspine — every target bootstraps what it needs from the project's own files.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cspine-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Debian packages the tests use: dciodvfy (dicom3tools) validates every DICOM file cspine writes.
SYSTEM_PACKAGES := dicom3tools

.PHONY: venv sysdeps demo test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

sysdeps:
	@command -v dciodvfy >/dev/null || \
	  $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null || \
	  { $(SUDO) apt-get update -q >/dev/null && $(SUDO) apt-get install -y -q $(SYSTEM_PACKAGES) >/dev/null; }

demo: venv
	$(BIN)/cspine demo

test: venv sysdeps
	$(BIN)/ruff check services tests
	$(BIN)/python -m pytest

bench: venv
	$(BIN)/cspine bench ingest

clean:
	rm -rf $(VENV) build .pytest_cache
