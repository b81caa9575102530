"""Triton Python-backend model for the CPU repository: every ``model_repository/<model>/1/model.py``
imports ``TritonPythonModel`` from here, so the five models share one implementation (the ONNX Runtime
runner) and the repository holds no logic of its own.

Triton's dynamic batcher hands ``execute`` several requests at once; the runner joins them into one ONNX
Runtime call. ONNX Runtime threads come from the model's ``ort_threads`` parameter in ``config.pbtxt``,
overridden by the ``CSPINE_ORT_THREADS`` environment variable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cspine.inference.runner import OnnxRunner
from cspine.inference.specs import MODELS


def ort_threads(config: dict) -> int:
    value = os.environ.get("CSPINE_ORT_THREADS") or config.get("parameters", {}).get("ort_threads", {}).get(
        "string_value", "1"
    )
    return max(1, int(value))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        spec = MODELS[args["model_name"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.runner = OnnxRunner(spec, path, ort_threads(config))

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        spec = self.runner.spec
        inputs = [
            {t.name: pb_utils.get_input_tensor_by_name(r, t.name).as_numpy() for t in spec.inputs} for r in requests
        ]
        try:
            results = self.runner.run_batch(inputs)
        except Exception as batch_error:  # noqa: BLE001 — find the bad request(s), answer the rest
            if len(requests) == 1:
                return [_error(pb_utils, spec.name, batch_error)]
            results = []
            for one in inputs:
                try:
                    results.append(self.runner.run(one))
                except Exception as error:  # noqa: BLE001
                    results.append(error)
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
