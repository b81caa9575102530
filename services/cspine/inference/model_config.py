"""Reading the model repository's ``config.pbtxt`` / ``configs/<name>.pbtxt`` files with Triton's own
ModelConfig protobuf (shipped by tritonclient), so a typo fails here as it would in Triton."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from cspine.domain import ModelVersion
from cspine.errors import CspineError
from cspine.inference.specs import MODELS

ModelConfig = model_config_pb2.ModelConfig


def config_path(repository: Path, model: str, config_name: str | None = None) -> Path:
    folder = Path(repository) / model
    return folder / "configs" / f"{config_name}.pbtxt" if config_name else folder / "config.pbtxt"


def load_config(path: Path) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as error:
        raise CspineError(f"model configuration {path}: {error}") from None


def data_type(config_type: int) -> str:
    """``TYPE_FP32`` → ``FP32`` (the names of ``specs.DType``)."""
    return model_config_pb2.DataType.Name(config_type).removeprefix("TYPE_")


def opt_batch(config: model_config_pb2.ModelConfig) -> int:
    """The batch size TensorRT should optimise for: the largest preferred batch size, else the maximum."""
    preferred = list(config.dynamic_batching.preferred_batch_size)
    return max(preferred) if preferred else max(config.max_batch_size, 1)


# Version sets. Every model with weights (specs.MODELS) is served at one version, the same for all of them: the
# shipped SYNTHETIC phantom models are version 1; a site's fine-tuned models (``cspine export --version N``) are
# version N, with every model of the set in its N/ folder. Each model's config names the version Triton serves
# (``version_policy: { specific: { versions: [ N ] } }``); the files that belong to a version beside the models
# (calibration.json, competence.json/.npz, model_card.json) are in the repository's root, named with ``.vN``
# for version N (``version_file``).
VERSION_POLICY = re.compile(r"^version_policy:.*$", re.MULTILINE)


def _config_files(repository: Path, model: str) -> list[Path]:
    folder = Path(repository) / model
    return [folder / "config.pbtxt", *sorted((folder / "configs").glob("*.pbtxt"))]


def served_version(repository: Path, model: str) -> int:
    """The version of ``model`` its config.pbtxt has Triton serve: the one version of its ``specific`` policy;
    without a policy, Triton's default (the highest version folder)."""
    config = load_config(config_path(repository, model))
    policy = config.version_policy
    if policy.HasField("specific"):
        versions = list(policy.specific.versions)
        if len(versions) != 1:
            raise CspineError(f"{model}: its version policy serves {versions}; cspine serves one version per model")
        return int(versions[0])
    if policy.HasField("all") or (policy.HasField("latest") and policy.latest.num_versions != 1):
        raise CspineError(f"{model}: cspine serves one version per model, not the version policy {policy}")
    numbered = [int(p.name) for p in (Path(repository) / model).iterdir() if p.is_dir() and p.name.isdigit()]
    if not numbered:
        raise CspineError(f"{model}: no version folder in {Path(repository) / model}")
    return max(numbered)


def served_set(repository: Path) -> int:
    """The version every model with weights is served at; ``CspineError`` when they differ."""
    versions = {name: served_version(repository, name) for name in MODELS}
    if len(set(versions.values())) != 1:
        raise CspineError(
            "the models are served at different versions ("
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + "): cspine models use N serves one version set"
        )
    return next(iter(versions.values()))


def version_file(repository: Path, name: str, version: int | None = None) -> Path:
    """A file of a version set (default: the served one) beside the models, in the repository's root: ``name``
    itself for version 1, ``<stem>.v<N><suffix>`` for version N (Triton takes every folder of the repository for
    a model, so the files of a version cannot have one). A folder without the models' configs (calibration files
    alone) holds ``name``."""
    if version is None:
        if not all((Path(repository) / model / "config.pbtxt").exists() for model in MODELS):
            return Path(repository) / name
        version = served_set(repository)
    if version == 1:
        return Path(repository) / name
    stem, dot, suffix = name.partition(".")
    return Path(repository) / f"{stem}.v{version}{dot}{suffix}"


def served_model_file(repository: Path, model: str) -> Path:
    return Path(repository) / model / str(served_version(repository, model)) / "model.onnx"


def available_sets(repository: Path) -> list[int]:
    """The versions every model with weights has a folder of."""
    sets = None
    for name in MODELS:
        numbered = {int(p.name) for p in (Path(repository) / name).iterdir() if p.is_dir() and p.name.isdigit()}
        sets = numbered if sets is None else sets & numbered
    return sorted(sets or ())


def use_version(repository: Path, version: int) -> list[Path]:
    """Serve the version set ``version``: every model's configs get the version policy of that one version (a
    running ``cspine serve`` has its Triton reload the models, ``AnalysisService.refresh_models``; otherwise the
    next start serves it). Returns the configs changed. ``CspineError`` when a model has no such version."""
    if version not in available_sets(repository):
        raise CspineError(
            f"no version set {version} in {repository}: the sets are {', '.join(map(str, available_sets(repository)))}"
        )
    return _write_policy(repository, f"version_policy: {{ specific: {{ versions: [ {version} ] }} }}")


def serve_every_version(repository: Path) -> list[Path]:
    """Have a Triton over ``repository`` load every version set it holds (``version_policy: { all: {} }``) for
    cspine gateways that each ask for their own set by number (``TritonClientConfig.pin_versions``; the Helm
    chart's Triton pods). A repository in this state is for Triton only: ``served_set`` refuses it."""
    return _write_policy(repository, "version_policy: { all: {} }")


def _write_policy(repository: Path, line: str) -> list[Path]:
    changed = []
    for name in MODELS:
        for path in _config_files(repository, name):
            text = path.read_text()
            new = (
                VERSION_POLICY.sub(line, text)
                if VERSION_POLICY.search(text)
                else text.rstrip("\n") + "\n" + line + "\n"
            )
            if new != text:
                path.write_text(new)
                changed.append(path)
            load_config(path)  # still a valid config
    return changed


def model_versions(repository: Path) -> list[ModelVersion]:
    """Each served model's version: Triton's version folder and the ONNX file's SHA-256 prefix."""
    out = []
    for name in MODELS:
        version = served_version(repository, name)
        path = Path(repository) / name / str(version) / "model.onnx"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"
        out.append(ModelVersion(name, f"{version} (sha256:{digest})"))
    return out
