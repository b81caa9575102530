"""Triton Python-backend model: every ``model_repository/<model>/1/model.py`` imports ``TritonPythonModel``
from here, so the five models share one implementation and the repository holds no logic of its own.

The model configuration's parameters choose the runner (``ENGINES``): ``engine`` ``onnxruntime`` (the default,
the CPU repository's ``config.pbtxt``) or ``torch`` (``configs/gpu_torch.pbtxt``: the same ONNX file run by
PyTorch on the instance's device — CUDA for ``KIND_GPU``, else the CPU — in the ``precision`` it names).
``spec`` names the model contract when the Triton model's name is another (a benchmark's variant).

Triton's dynamic batcher hands ``execute`` several requests at once; the runner joins them into one call.
ONNX Runtime threads come from the model's ``ort_threads`` parameter in ``config.pbtxt``, overridden by the
``CSPINE_ORT_THREADS`` environment variable; PyTorch's CPU threads from ``torch_threads``.

Each stub ends itself when the tritonserver that started it is gone (``exit_with_server``): Triton's own check
asks whether the server's pid exists, which a server that died but was never reaped still passes.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from cspine.inference.runner import BatchingRunner, OnnxRunner
from cspine.inference.specs import MODELS, ModelSpec

STUB = b"triton_python_backend_stub"
_watching = threading.Lock()


def ort_threads(config: dict) -> int:
    value = os.environ.get("CSPINE_ORT_THREADS") or config.get("parameters", {}).get("ort_threads", {}).get(
        "string_value", "1"
    )
    return max(1, int(value))


def parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value") or default


def _onnxruntime(spec: ModelSpec, path: Path, config: dict, args: dict) -> BatchingRunner:
    return OnnxRunner(spec, path, ort_threads(config))


def _torch(spec: ModelSpec, path: Path, config: dict, args: dict) -> BatchingRunner:
    from cspine.inference.torch_runner import TorchRunner

    gpu = args.get("model_instance_kind") == "GPU"
    device = f"cuda:{args.get('model_instance_device_id', '0')}" if gpu else "cpu"
    threads = int(parameter(config, "torch_threads", "1"))
    return TorchRunner(spec, path, device, parameter(config, "precision", "fp32"), threads)


# engine parameter → the runner it builds from (spec, ONNX file, model configuration, Triton's initialize args)
ENGINES: dict[str, Callable[[ModelSpec, Path, dict, dict], BatchingRunner]] = {
    "onnxruntime": _onnxruntime,
    "torch": _torch,
}


def make_runner(args: dict) -> BatchingRunner:
    """The runner Triton's ``initialize`` arguments ask for (see the module docstring)."""
    config = json.loads(args["model_config"])
    engine = parameter(config, "engine", "onnxruntime")
    if engine not in ENGINES:
        raise ValueError(f"{args['model_name']}: engine {engine!r} is not one of {', '.join(ENGINES)}")
    spec = MODELS[parameter(config, "spec", args["model_name"])]
    path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
    return ENGINES[engine](spec, path, config, args)


def exit_with_server(interval_s: float = 0.5) -> None:
    """In a Python backend stub (once per process): a daemon thread that exits the stub as soon as its parent, the
    server, has died (the stub is then re-parented, so ``getppid`` changes), first removing the stub's
    shared-memory region as the stub's own exit would. Outside a stub, nothing."""
    argv = _command_line()
    if not argv or not argv[0].endswith(STUB) or not _watching.acquire(blocking=False):
        return
    server = os.getppid()
    threading.Thread(
        target=_exit_when_orphaned, args=(server, argv, interval_s), name="cspine-exit-with-server", daemon=True
    ).start()


def _command_line() -> list[bytes]:
    try:
        return Path("/proc/self/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _exit_when_orphaned(server: int, argv: list[bytes], interval_s: float) -> None:
    while os.getppid() == server:
        time.sleep(interval_s)
    # The stub's command line is: stub, model.py, shared-memory region name, … (as Triton's Python backend starts it).
    if len(argv) > 2 and argv[2] and b"/" not in argv[2]:
        with contextlib.suppress(OSError):
            os.unlink(b"/dev/shm/" + argv[2])
    os._exit(1)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        exit_with_server()
        self.runner = make_runner(args)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        spec = self.runner.spec
        inputs = [
            {t.name: pb_utils.get_input_tensor_by_name(r, t.name).as_numpy() for t in spec.inputs} for r in requests
        ]
        results: Sequence[dict[str, np.ndarray] | Exception]
        try:
            results = self.runner.run_batch(inputs)
        except Exception as batch_error:  # noqa: BLE001 — find the bad request(s), answer the rest
            if len(requests) == 1:
                return [_error(pb_utils, spec.name, batch_error)]
            one_by_one: list[dict[str, np.ndarray] | Exception] = []
            for one in inputs:
                try:
                    one_by_one.append(self.runner.run(one))
                except Exception as error:  # noqa: BLE001
                    one_by_one.append(error)
            results = one_by_one
        responses = []
        for result in results:
            if isinstance(result, Exception):
                responses.append(_error(pb_utils, spec.name, result))
            else:
                tensors = [pb_utils.Tensor(name, value) for name, value in result.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses


def _error(pb_utils, model: str, error: Exception):
    message = f"{model}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message))
