"""The one ONNX Runtime runner: evaluation, benchmarks and every model of the CPU Triton repository
(its ``1/model.py`` hands over to ``cspine.inference.triton_backend``) run the shipped ONNX files
through it. ``BatchingRunner`` is what it shares with the PyTorch runner of the GPU configuration
(``torch_runner``): joining the requests Triton hands over into one call.

Thread counts are always set explicitly. ONNX Runtime's default is one intra-op thread per core in every
session; with five models loaded in one Triton that oversubscribes a small machine several times over.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cspine.inference.specs import ModelSpec


def onnx_session(path: Path, threads: int = 2):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class BatchingRunner(ABC):
    """What every runner shares: ``run_batch`` takes the inputs of several requests and, for a model with a
    batch axis, concatenates them into one ``run`` and splits the outputs back; a model without one
    (``proto_classify``) runs request by request."""

    spec: ModelSpec

    @abstractmethod
    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call of the model on ``inputs`` (the spec's input names), its outputs by the spec's names."""

    def run_batch(self, requests: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
        if self.spec.max_batch_size == 0 or len(requests) == 1:
            return [self.run(r) for r in requests]
        sizes = [len(r[self.spec.inputs[0].name]) for r in requests]
        joined = {t.name: np.concatenate([r[t.name] for r in requests]) for t in self.spec.inputs}
        outputs = self.run(joined)
        bounds = np.cumsum(sizes)[:-1]
        split = {name: np.split(value, bounds) for name, value in outputs.items()}
        return [{name: parts[i] for name, parts in split.items()} for i in range(len(requests))]


class OnnxRunner(BatchingRunner):
    """Runs one model described by ``spec`` in ONNX Runtime (CPU, ``threads`` intra-op threads)."""

    def __init__(self, spec: ModelSpec, path: Path, threads: int) -> None:
        self.spec = spec
        self.session = onnx_session(path, threads)
        self._outputs = [t.name for t in spec.outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {t.name: inputs[t.name] for t in self.spec.inputs}
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds), strict=True))
