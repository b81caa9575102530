"""Triton Python backend: hands over to cspine's shared ONNX Runtime runner (see that module)."""

from cspine.inference.triton_backend import TritonPythonModel  # noqa: F401
