"""Reading the model repository's ``config.pbtxt`` / ``configs/<name>.pbtxt`` files with Triton's own
ModelConfig protobuf (shipped by tritonclient), so a typo fails here as it would in Triton."""

from __future__ import annotations

import hashlib
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


def model_versions(repository: Path) -> list[ModelVersion]:
    """Each served model's version: Triton's version folder and the ONNX file's SHA-256 prefix."""
    out = []
    for name in MODELS:
        path = repository / name / "1" / "model.onnx"
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.exists() else "missing"
        out.append(ModelVersion(name, f"1 (sha256:{digest})"))
    return out
