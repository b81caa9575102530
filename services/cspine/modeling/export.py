"""ONNX export of the trained models into ``model_repository/<model>/1/model.onnx``.

Tensor names, dtypes and shapes come from ``inference.specs``; the batch axis (and for
``proto_classify`` the embedding and prototype counts) is dynamic. Every export is checked by the ONNX
checker and compared with PyTorch in ONNX Runtime on real and random inputs (``PARITY``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

import cspine
from cspine.domain import Modality
from cspine.inference.runner import onnx_session
from cspine.inference.specs import (
    LESION_EMBED,
    MODALITY_ORDER,
    PROTO_CLASSIFY,
    SEG_GEOMETRY,
    SEG_LABELS,
    ModelSpec,
    seg_spec,
)
from cspine.modeling.networks import LesionEncoder, ProtoClassifier, SegExport, UNet2D

logger = logging.getLogger(__name__)

OPSET = 18
# ONNX Runtime against PyTorch: label maps agree on at least this share of pixels (ties of nearly equal
# logits may fall either way), embeddings and probabilities within this absolute difference.
PARITY = {"labels_agreement": 0.999, "atol": 1e-4}


class EmbedExport(torch.nn.Module):
    def __init__(self, encoder: LesionEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, roi: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.encoder(roi, modality)


def model_path(repository: Path, name: str) -> Path:
    return repository / name / "1" / "model.onnx"


def _example(spec: ModelSpec, batch: int, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
    tensors = []
    for t in spec.inputs:
        shape = tuple(batch if d == -1 else d for d in t.shape)
        shape = (batch, *shape) if spec.max_batch_size > 0 else shape
        tensors.append(torch.from_numpy(rng.standard_normal(shape).astype(np.float32)))
    return tuple(tensors)


def _dynamic_shapes(spec: ModelSpec) -> tuple[dict, ...]:
    if spec.max_batch_size > 0:
        batch = torch.export.Dim("batch", min=1, max=4096)
        return tuple({0: batch} for _ in spec.inputs)
    # no batching: every -1 in the spec is its own dimension
    return tuple(
        {i: torch.export.Dim(f"{t.name}_{i}", min=1, max=4096) for i, d in enumerate(t.shape) if d == -1}
        for t in spec.inputs
    )


def export_module(module: torch.nn.Module, spec: ModelSpec, path: Path, metadata: dict) -> Path:
    """Export ``module`` (inputs and outputs in the order of ``spec``) to ``path`` and check it."""
    module = module.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(spec, 2, np.random.default_rng(0))
    torch.onnx.export(
        module,
        example,
        str(path),
        input_names=[t.name for t in spec.inputs],
        output_names=[t.name for t in spec.outputs],
        dynamo=True,
        dynamic_shapes=_dynamic_shapes(spec),
        opset_version=OPSET,
        external_data=False,
    )
    model = onnx.load(str(path))
    model.doc_string = f"cspine {spec.name}: trained on SYNTHETIC phantom data only"
    for key, value in {"cspine_version": cspine.__version__, "synthetic_training_data": "true", **metadata}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def check_parity(module: torch.nn.Module, spec: ModelSpec, path: Path, inputs: tuple[np.ndarray, ...]) -> dict:
    """Run PyTorch and ONNX Runtime on the same inputs; return the agreement figures."""
    session = onnx_session(path)
    feeds = {t.name: x.astype(np.float32) for t, x in zip(spec.inputs, inputs, strict=True)}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = module.eval()(*[torch.from_numpy(x.astype(np.float32)) for x in inputs])
    want = [w.numpy() for w in (want if isinstance(want, tuple) else (want,))]
    figures = {}
    for g, w in zip(got, want, strict=True):
        if g.dtype == np.uint8:
            figures["labels_agreement"] = float((g == w).mean())
        else:
            diff = float(np.abs(g.astype(np.float64) - w).max())
            figures["max_abs_diff"] = max(figures.get("max_abs_diff", 0.0), diff)
    return figures


def export_seg(net: UNet2D, modality: Modality, repository: Path, metadata: dict) -> Path:
    spec = seg_spec(modality)
    return export_module(SegExport(net), spec, model_path(repository, spec.name), metadata)


def export_embed(encoder: LesionEncoder, repository: Path, metadata: dict) -> Path:
    return export_module(EmbedExport(encoder), LESION_EMBED, model_path(repository, LESION_EMBED.name), metadata)


def export_proto(proto: ProtoClassifier, repository: Path, metadata: dict) -> Path:
    return export_module(proto, PROTO_CLASSIFY, model_path(repository, PROTO_CLASSIFY.name), metadata)


def random_inputs(spec: ModelSpec, batch: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    return tuple(t.numpy() for t in _example(spec, batch, np.random.default_rng(seed)))


def one_hot_batch(batch: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.eye(len(MODALITY_ORDER), dtype=np.float32)[rng.integers(len(MODALITY_ORDER), size=batch)]


def _onnx_model(path: Path) -> tuple[onnx.ModelProto, dict]:
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    if "training_config" not in meta:
        raise ValueError(f"{path} has no training_config metadata: not a cspine export")
    return model, json.loads(meta["training_config"])


def _load_folded(net: torch.nn.Module, model: onnx.ModelProto, prefix: str, path: Path) -> None:
    """Load an export's weights into ``net`` (whose ONNX initializers are named ``<prefix>.<parameter>``).

    Export folds each BatchNorm into the convolution before it (initializers ``<conv>.weight`` and
    ``<conv>.weight_bias``). The net gets the folded weights, and each BatchNorm becomes the identity that adds
    the folded bias (weight 1, running mean 0, running variance 1 - eps). In eval mode the net then computes
    exactly what the ONNX model does. A fine-tuning run must keep its BatchNorms in eval mode
    (``freeze_batchnorm``): the batch statistics the original scale came from are gone."""
    weights = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    state = net.state_dict()
    loaded = set()
    for name, module in net.named_modules():
        if not isinstance(module, torch.nn.BatchNorm2d):
            continue
        # the convolution just before it in the same Sequential
        parent, index = name.rsplit(".", 1)
        conv = f"{parent}.{int(index) - 1}"
        state[f"{conv}.weight"] = torch.from_numpy(weights[f"{prefix}.{conv}.weight"].copy())
        state[f"{name}.bias"] = torch.from_numpy(weights[f"{prefix}.{conv}.weight_bias"].copy())
        state[f"{name}.weight"] = torch.ones_like(state[f"{name}.weight"])
        state[f"{name}.running_mean"] = torch.zeros_like(state[f"{name}.running_mean"])
        state[f"{name}.running_var"] = torch.full_like(state[f"{name}.running_var"], 1.0 - module.eps)
        loaded |= {f"{conv}.weight", f"{name}.bias", f"{name}.weight", f"{name}.running_mean", f"{name}.running_var"}
    for key in state:
        if key not in loaded and f"{prefix}.{key}" in weights:
            state[key] = torch.from_numpy(weights[f"{prefix}.{key}"].copy())
            loaded.add(key)
    missing = [k for k in state if k not in loaded and not k.endswith("num_batches_tracked")]
    if missing:
        raise ValueError(f"{path}: no weights for {', '.join(missing[:5])}")
    net.load_state_dict(state)
    net.eval()


def load_seg_onnx(path: Path) -> tuple[UNet2D, dict]:
    """The PyTorch U-Net of an exported segmentation model (``model.onnx`` of a Triton model version) and its
    training configuration (the ``training_config`` metadata), to fine-tune it (``_load_folded``)."""
    model, config = _onnx_model(path)
    if "modality" not in config:
        raise ValueError(f"{path} is not a cspine segmentation export")
    modality = Modality(config["modality"])
    net = UNet2D(
        SEG_GEOMETRY[modality].channels,
        len(SEG_LABELS[modality]),
        tuple(config["widths"]),
        bool(config["coordinates"]),
    )
    _load_folded(net, model, "net", path)
    return net, config


def load_embed_onnx(path: Path) -> tuple[LesionEncoder, dict]:
    """The PyTorch lesion encoder of an exported ``lesion_embed`` model and its training configuration, to
    fine-tune it (``_load_folded``)."""
    model, config = _onnx_model(path)
    encoder = LesionEncoder(tuple(config["widths"]))
    _load_folded(encoder, model, "encoder", path)
    return encoder, config


def freeze_batchnorm(net: torch.nn.Module) -> None:
    """Keep every BatchNorm of ``net`` in eval mode (running statistics), whatever mode the net is in: for
    fine-tuning a net loaded by ``load_seg_onnx``. Their bias still learns."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()
            module.weight.requires_grad_(False)
