"""The shipped ONNX graphs run by PyTorch, for Triton on a GPU without TensorRT or ONNX Runtime
(``configs/gpu_torch.pbtxt``: the Python backend with ``engine`` = ``torch``).

The graph and its weights are read from ``1/model.onnx`` itself, with a protobuf wire-format reader of the few
ONNX messages involved, and each node is run by the PyTorch operation of the table ``OPS``. Not the ``onnx``
package: the GPU machine's is built for its numpy 2 (it imports ml_dtypes, a compiled extension), while Triton's
Python backend stub there runs with the numpy 1.26 that ``scripts/gpu/run.sh`` puts first.
So the GPU runs exactly the shipped graph — the fused convolutions, the appended ``features`` output — and
nothing of ``cspine.modeling`` (which imports this package) is needed where it runs.

FP16 (``precision`` = ``fp16``, CUDA only): the weights of convolutions and matrix products are stored in half
precision and those operations run in it; reductions, normalisation and softmax run in FP32, and every FP32
output is returned as FP32. On a CPU the runner computes in FP32 whatever was asked.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cspine.inference.runner import BatchingRunner
from cspine.inference.specs import ModelSpec

logger = logging.getLogger(__name__)


class OnnxReadError(ValueError):
    """The file is not an ONNX model this reader understands (the message names what and where)."""


# --- protobuf wire format ------------------------------------------------------------------------------


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise OnnxReadError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: an int for varints and fixed-size fields, a
    memoryview for length-delimited ones."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:
            raise OnnxReadError(f"unsupported protobuf wire type {wire} (field {number})")
        yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _ints(wire: int, value: Any) -> list[int]:
    """A repeated int64 field's entries, packed (wire type 2) or one by one."""
    if wire != 2:
        return [_signed(value)]
    out, pos = [], 0
    while pos < len(value):
        v, pos = _varint(value, pos)
        out.append(_signed(v))
    return out


def _floats(wire: int, value: Any) -> list[float]:
    if wire == 5:
        return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]
    return list(struct.unpack(f"<{len(value) // 4}f", value))


# ONNX TensorProto.DataType → numpy dtype
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32),
    2: np.dtype(np.uint8),
    3: np.dtype(np.int8),
    6: np.dtype(np.int32),
    7: np.dtype(np.int64),
    9: np.dtype(np.bool_),
    10: np.dtype(np.float16),
    11: np.dtype(np.float64),
}


def _tensor(data: memoryview) -> tuple[str, np.ndarray]:
    """A TensorProto: its name and values (raw_data, float_data, int32_data or int64_data)."""
    dims: list[int] = []
    name, dtype_code, raw = "", 1, None
    floats: list[float] = []
    ints: list[int] = []
    for number, wire, value in _fields(data):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            dtype_code = value
        elif number == 4:
            floats += _floats(wire, value)
        elif number in (5, 7):
            ints += _ints(wire, value)
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = bytes(value)
        elif number == 14 and value == 1:
            raise OnnxReadError(f"tensor {name or '?'} keeps its data in an external file")
    if dtype_code not in DTYPES:
        raise OnnxReadError(f"tensor {name}: ONNX data type {dtype_code} is not supported")
    dtype = DTYPES[dtype_code]
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<")).astype(dtype)
    else:
        array = np.array(floats if dtype.kind == "f" else ints, dtype=dtype)
    return name, array.reshape(dims)


@dataclass(frozen=True)
class Node:
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, Any] = field(default_factory=dict)


def _attribute(data: memoryview) -> tuple[str, Any]:
    name: str = ""
    value: Any = None
    listed: list[Any] = []
    for number, wire, raw in _fields(data):
        if number == 1:
            name = bytes(raw).decode()
        elif number == 2:
            value = _floats(wire, raw)[0]
        elif number == 3:
            value = _signed(raw)
        elif number == 4:
            value = bytes(raw).decode()
        elif number == 5:
            value = _tensor(raw)[1]
        elif number == 7:
            listed += _floats(wire, raw)
        elif number == 8:
            listed += _ints(wire, raw)
    return name, value if value is not None else listed


def _node(data: memoryview) -> Node:
    inputs: list[str] = []
    outputs: list[str] = []
    op_type, attributes = "", {}
    for number, _, value in _fields(data):
        if number == 1:
            inputs.append(bytes(value).decode())
        elif number == 2:
            outputs.append(bytes(value).decode())
        elif number == 4:
            op_type = bytes(value).decode()
        elif number == 5:
            key, attr = _attribute(value)
            attributes[key] = attr
    return Node(op_type, tuple(inputs), tuple(outputs), attributes)


def _value_name(data: memoryview) -> str:
    return next((bytes(v).decode() for n, _, v in _fields(data) if n == 1), "")


@dataclass
class OnnxGraph:
    """An ONNX graph as data: nodes in order, initializers by name, input and output names."""

    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[str]
    outputs: list[str]


def read_onnx(path: Path) -> OnnxGraph:
    """The graph of an ONNX model file, read without the ``onnx`` package."""
    data = memoryview(Path(path).read_bytes())
    graph = next((v for n, w, v in _fields(data) if n == 7 and w == 2), None)
    if graph is None:
        raise OnnxReadError(f"{path}: no graph in the model")
    nodes: list[Node] = []
    initializers: dict[str, np.ndarray] = {}
    inputs: list[str] = []
    outputs: list[str] = []
    for number, _, value in _fields(graph):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, array = _tensor(value)
            initializers[name] = array
        elif number == 11:
            inputs.append(_value_name(value))
        elif number == 12:
            outputs.append(_value_name(value))
    return OnnxGraph(nodes, initializers, [i for i in inputs if i not in initializers], outputs)


# --- ONNX operations in PyTorch -------------------------------------------------------------------------


def _pair(values: Sequence[int], default: int) -> tuple[int, int]:
    return (values[0], values[1]) if values else (default, default)


def _padding(a: dict) -> tuple[int, int]:
    if a.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
        raise OnnxReadError(f"auto_pad {a['auto_pad']} is not supported")
    pads = list(a.get("pads", [0, 0, 0, 0]))
    if pads[:2] != pads[2:]:
        raise OnnxReadError(f"asymmetric pads {pads} are not supported")
    return pads[0], pads[1]


def _axes(x, inputs: list, a: dict) -> list[int] | None:
    axes = inputs[1].tolist() if len(inputs) > 1 and inputs[1] is not None else a.get("axes")
    return None if not axes else [int(v) % x.dim() for v in axes]


def _reduce(fn: Callable) -> Callable:
    def op(inputs: list, a: dict):
        x = inputs[0].float()
        axes = _axes(x, inputs, a)
        if axes is None and a.get("noop_with_empty_axes", 0):
            return x
        return fn(x, axes if axes is not None else list(range(x.dim())), bool(a.get("keepdims", 1)))

    return op


def _shape_op(inputs: list, a: dict):
    import torch

    shape = list(inputs[0].shape)
    return torch.tensor(shape[a.get("start", 0) : a.get("end", len(shape))], dtype=torch.int64)


def _concat(inputs: list, a: dict):
    import torch

    devices = {t.device for t in inputs}
    if len(devices) > 1:  # a shape (on the CPU) never meets data; data tensors share the model's device
        raise OnnxReadError("Concat of tensors on different devices")
    return torch.cat(inputs, dim=a["axis"])


def _expand(inputs: list, a: dict):
    import torch

    x, shape = inputs
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(shape.tolist())))


def _reshape(inputs: list, a: dict):
    x, shape = inputs
    dims = [int(d) for d in shape.tolist()]
    if not a.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _gemm(inputs: list, a: dict):
    x, w = inputs[0], inputs[1]
    x = x.to(w.dtype)
    x = x.t() if a.get("transA", 0) else x
    w = w.t() if a.get("transB", 0) else w
    y = (x @ w) * a.get("alpha", 1.0)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + inputs[2] * a.get("beta", 1.0)
    return y


def _unsqueeze(inputs: list, a: dict):
    x = inputs[0]
    axes = inputs[1].tolist() if len(inputs) > 1 else a["axes"]
    rank = x.dim() + len(axes)
    for axis in sorted(int(v) % rank for v in axes):
        x = x.unsqueeze(axis)
    return x


def _cast(inputs: list, a: dict):
    import torch

    return inputs[0].to(getattr(torch, DTYPES[a["to"]].name))


def _ops() -> dict[str, Callable]:
    import torch
    import torch.nn.functional as F

    def conv(inputs: list, a: dict):
        x, w = inputs[0], inputs[1]
        return F.conv2d(
            x.to(w.dtype),
            w,
            inputs[2] if len(inputs) > 2 else None,
            stride=_pair(a.get("strides", []), 1),
            padding=_padding(a),
            dilation=_pair(a.get("dilations", []), 1),
            groups=a.get("group", 1),
        )

    def conv_transpose(inputs: list, a: dict):
        x, w = inputs[0], inputs[1]
        return F.conv_transpose2d(
            x.to(w.dtype),
            w,
            inputs[2] if len(inputs) > 2 else None,
            stride=_pair(a.get("strides", []), 1),
            padding=_padding(a),
            output_padding=_pair(a.get("output_padding", []), 0),
            groups=a.get("group", 1),
            dilation=_pair(a.get("dilations", []), 1),
        )

    def max_pool(inputs: list, a: dict):
        return F.max_pool2d(
            inputs[0],
            _pair(a["kernel_shape"], 1),
            stride=_pair(a.get("strides", []), 1),
            padding=_padding(a),
            dilation=_pair(a.get("dilations", []), 1),
            ceil_mode=bool(a.get("ceil_mode", 0)),
        )

    def argmax(inputs: list, a: dict):
        if a.get("select_last_index", 0):
            raise OnnxReadError("ArgMax with select_last_index is not supported")
        return torch.argmax(inputs[0], dim=a.get("axis", 0), keepdim=bool(a.get("keepdims", 1)))

    def clip(inputs: list, a: dict):
        low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
        high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
        return torch.clamp(inputs[0], min=low, max=high)

    return {
        "Conv": conv,
        "ConvTranspose": conv_transpose,
        "MaxPool": max_pool,
        "Relu": lambda i, a: F.relu(i[0]),
        "Concat": _concat,
        "Shape": _shape_op,
        "Expand": _expand,
        "Reshape": _reshape,
        "Gemm": _gemm,
        "ArgMax": argmax,
        "Cast": _cast,
        "Clip": clip,
        "ReduceMean": _reduce(lambda x, axes, keep: x.mean(dim=axes, keepdim=keep)),
        "ReduceSum": _reduce(lambda x, axes, keep: x.sum(dim=axes, keepdim=keep)),
        "ReduceL2": _reduce(lambda x, axes, keep: torch.linalg.vector_norm(x, dim=axes, keepdim=keep)),
        "Unsqueeze": _unsqueeze,
        "Add": lambda i, a: i[0] + i[1],
        "Sub": lambda i, a: i[0] - i[1],
        "Mul": lambda i, a: i[0] * i[1],
        "Div": lambda i, a: i[0] / i[1],
        "Pow": lambda i, a: torch.pow(i[0].float(), i[1]),
        "Softmax": lambda i, a: torch.softmax(i[0].float(), dim=a.get("axis", -1)),
        "Identity": lambda i, a: i[0],
    }


# Operations whose weights (inputs 1 and 2) are kept in the compute precision (FP16 where asked).
HALF_WEIGHTS = {"Conv", "ConvTranspose", "Gemm"}


class TorchGraph:
    """An ``OnnxGraph`` ready to run on ``device``: float initializers on the device (the weights of
    ``HALF_WEIGHTS`` operations in ``dtype``), integer ones — shapes and axes — on the CPU."""

    def __init__(self, graph: OnnxGraph, device: str = "cpu", half: bool = False) -> None:
        import torch

        self.ops = _ops()
        unknown = sorted({n.op_type for n in graph.nodes} - set(self.ops))
        if unknown:
            raise OnnxReadError(f"ONNX operations without a PyTorch counterpart here: {', '.join(unknown)}")
        self.graph = graph
        self.device = torch.device(device)
        halved = {name for n in graph.nodes if n.op_type in HALF_WEIGHTS for name in n.inputs[1:3]} if half else set()
        self.constants = {}
        for name, array in graph.initializers.items():
            tensor = torch.from_dlpack(array.reshape(-1).copy()).reshape(array.shape)
            if array.dtype.kind == "f":
                tensor = tensor.to(self.device, torch.float16 if name in halved else torch.float32)
            self.constants[name] = tensor

    def __call__(self, **inputs) -> dict[str, Any]:
        values: dict[str, Any] = {**self.constants, **inputs}
        for node in self.graph.nodes:
            args = [values[name] if name else None for name in node.inputs]
            result = self.ops[node.op_type](args, node.attributes)
            values[node.outputs[0]] = result
        return {name: values[name] for name in self.graph.outputs}


def to_torch(array: np.ndarray, device):
    """A numpy array on ``device`` through DLPack (no dependence on torch's numpy bridge, so a numpy of another
    major version than torch was built against works too)."""
    import torch

    if not (array.flags.c_contiguous and array.flags.writeable):
        array = np.array(array, order="C")
    return torch.from_dlpack(array).to(device)


def to_numpy(tensor) -> np.ndarray:
    return np.from_dlpack(tensor.detach().to("cpu").contiguous())


class TorchRunner(BatchingRunner):
    """Runs one model of ``spec`` from its ONNX file in PyTorch on ``device`` (``cpu``, ``cuda``, ``cuda:1`` …).
    ``precision`` ``fp16`` applies on CUDA only; ``threads`` sets PyTorch's CPU threads when given."""

    def __init__(
        self, spec: ModelSpec, path: Path, device: str = "cpu", precision: str = "fp32", threads: int | None = None
    ) -> None:
        import torch

        if precision not in ("fp32", "fp16"):
            raise ValueError(f"precision must be fp32 or fp16, got {precision!r}")
        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.device = torch.device(device)
        self.precision = precision if self.device.type == "cuda" else "fp32"
        if self.precision != precision:
            logger.info("%s: %s asked for on %s; computing in fp32", spec.name, precision, self.device)
        self.graph = TorchGraph(read_onnx(path), str(self.device), half=self.precision == "fp16")
        self._outputs = {t.name: t.dtype.numpy for t in spec.outputs}

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            feeds = {t.name: to_torch(inputs[t.name], self.device) for t in self.spec.inputs}
            got = self.graph(**feeds)
            return {name: to_numpy(got[name]).astype(dtype, copy=False) for name, dtype in self._outputs.items()}
