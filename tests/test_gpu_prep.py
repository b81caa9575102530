"""The CPU side of the GPU run (issue 23): the ``gpu_torch`` configs agree with the specs, the PyTorch runner reads
the shipped ONNX files as the ``onnx`` package does and answers as ONNX Runtime does on real inputs, the serving
repository's rewrite changes only what it says, and ``scripts/gpu/prepare.sh`` then ``scripts/gpu/run.sh --cpu``
rehearse the whole GPU command here: a real tritonserver from the carried archives, real figures.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from cspine.inference.gpu_bench import (
    CONFIG_NAME,
    GATES,
    NO_BATCHING,
    agreement,
    load_reference,
    serving_repository,
)
from cspine.inference.local_triton import default_repository
from cspine.inference.model_config import config_path, load_config
from cspine.inference.runner import OnnxRunner
from cspine.inference.specs import MODELS, PROTO_CLASSIFY, SERVED, DType
from cspine.inference.torch_runner import TorchRunner, read_onnx
from cspine.inference.triton_backend import make_runner

REPOSITORY = default_repository()
ROOT = REPOSITORY.parent
SCRIPTS = ROOT / "scripts" / "gpu"


def _tensors(tensors) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.dtype.value if isinstance(t.dtype, DType) else t.dtype, tuple(t.shape)) for t in tensors]


def _config_tensors(tensors) -> list[tuple[str, str, tuple[int, ...]]]:
    from cspine.inference.model_config import data_type

    return [(t.name, data_type(t.data_type), tuple(t.dims)) for t in tensors]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gpu_torch_configs_parse_and_serve_the_specs_with_torch_on_kind_gpu(name):
    spec = MODELS[name]
    config = load_config(config_path(REPOSITORY, name, CONFIG_NAME))
    assert config.name == name and config.backend == "python"
    assert config.max_batch_size == spec.max_batch_size
    assert _config_tensors(config.input) == _tensors(spec.inputs)
    assert _config_tensors(config.output) == _tensors(spec.outputs)
    assert config.HasField("dynamic_batching") == (spec.max_batch_size > 0)
    assert all(1 <= b <= spec.max_batch_size for b in config.dynamic_batching.preferred_batch_size)
    (group,) = config.instance_group
    assert group.kind == group.KIND_GPU
    parameters = {k: v.string_value for k, v in config.parameters.items()}
    assert parameters["engine"] == "torch" and int(parameters["torch_threads"]) >= 1
    assert parameters["precision"] == ("fp32" if name == PROTO_CLASSIFY.name else "fp16")
    # the TensorRT configuration stays for clusters with trtexec
    assert load_config(config_path(REPOSITORY, name, "gpu")).platform == "tensorrt_plan"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_onnx_reader_gives_what_the_onnx_package_reads(name):
    path = REPOSITORY / name / "1" / "model.onnx"
    graph, want = read_onnx(path), onnx.load(str(path)).graph
    assert graph.inputs == [i.name for i in want.input] and graph.outputs == [o.name for o in want.output]
    assert list(graph.initializers) == [i.name for i in want.initializer]
    for tensor in want.initializer:
        expected = numpy_helper.to_array(tensor)
        got = graph.initializers[tensor.name]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    assert [(n.op_type, n.inputs, n.outputs) for n in graph.nodes] == [
        (n.op_type, tuple(n.input), tuple(n.output)) for n in want.node
    ]
    for node, expected_node in zip(graph.nodes, want.node, strict=True):
        for attribute in expected_node.attribute:
            value = helper.get_attribute_value(attribute)
            value = value.decode() if isinstance(value, bytes) else value
            got = node.attributes[attribute.name]
            assert (list(got) if isinstance(got, list) else got) == (list(value) if isinstance(value, list) else value)


def test_the_runner_factory_takes_engine_device_and_spec_from_triton_s_arguments():
    def args(parameters: dict, kind: str = "CPU", name: str = "seg_mr_nodb") -> dict:
        config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}}
        return {
            "model_config": json.dumps(config),
            "model_name": name,
            "model_repository": str(REPOSITORY / "seg_mr"),
            "model_version": "1",
            "model_instance_kind": kind,
            "model_instance_device_id": "0",
        }

    runner = make_runner(args({"engine": "torch", "precision": "fp16", "spec": "seg_mr", "torch_threads": "1"}))
    assert isinstance(runner, TorchRunner) and runner.spec is MODELS["seg_mr"]
    assert str(runner.device) == "cpu" and runner.precision == "fp32"  # FP16 applies on CUDA only
    assert isinstance(make_runner(args({"spec": "seg_mr"})), OnnxRunner)  # no engine: ONNX Runtime, as on CPU
    with pytest.raises(ValueError, match="engine 'tensorrt' is not one of onnxruntime, torch"):
        make_runner(args({"engine": "tensorrt", "spec": "seg_mr"}))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_serving_repository_changes_only_kind_and_precision_and_adds_unbatched_twins(tmp_path, device):
    served = serving_repository(REPOSITORY, tmp_path / "repo", {"seg_ct": "fp32"}, device)
    twins = sorted(p.name for p in served.iterdir() if p.name.endswith(NO_BATCHING))
    assert twins == sorted(f"{n}{NO_BATCHING}" for n, s in MODELS.items() if s.max_batch_size > 0)
    for name in SERVED:
        if name not in MODELS:  # the ensemble keeps its one config
            assert (served / name / "config.pbtxt").read_text() == (REPOSITORY / name / "config.pbtxt").read_text()
            continue
        shipped = load_config(config_path(REPOSITORY, name, CONFIG_NAME))
        got = load_config(config_path(served, name, CONFIG_NAME))
        (group,) = got.instance_group
        assert group.kind == (group.KIND_GPU if device == "cuda" else group.KIND_CPU)
        expected_precision = "fp32" if name == "seg_ct" else shipped.parameters["precision"].string_value
        assert got.parameters["precision"].string_value == expected_precision
        for config in (shipped, got):
            config.ClearField("instance_group")
            config.parameters["precision"].string_value = ""
        assert got == shipped
        model = Path(name, "1", "model.onnx")
        assert (served / model).read_bytes() == (REPOSITORY / model).read_bytes()
        if MODELS[name].max_batch_size > 0:
            twin = load_config(config_path(served, f"{name}{NO_BATCHING}", CONFIG_NAME))
            assert twin.name == f"{name}{NO_BATCHING}" and twin.parameters["spec"].string_value == name
            assert not twin.HasField("dynamic_batching")
            twin.ClearField("instance_group")
            twin.parameters["precision"].string_value = ""
            del twin.parameters["spec"]
            twin.name = name
            shipped.ClearField("dynamic_batching")
            assert twin == shipped


# --- on real inputs, and the whole GPU command rehearsed on the CPU (slow: phantom cases, a real tritonserver) ---


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """scripts/gpu/reference.py's file: SYNTHETIC phantom inputs with ONNX Runtime's answers (~30 s)."""
    path = tmp_path_factory.mktemp("gpu-reference") / "reference.npz"
    subprocess.run([sys.executable, str(SCRIPTS / "reference.py"), "--out", str(path)], check=True, timeout=600)
    return path


@pytest.mark.parametrize("name", sorted(MODELS))
def test_the_torch_runner_on_cpu_answers_as_onnx_runtime_on_real_inputs(reference, name):
    spec = MODELS[name]
    data = load_reference(reference)[name]
    inputs = {t.name: data[t.name] for t in spec.inputs}
    want = OnnxRunner(spec, REPOSITORY / name / "1" / "model.onnx", 2).run(inputs)
    got = TorchRunner(spec, REPOSITORY / name / "1" / "model.onnx", "cpu", "fp32", 2).run(inputs)
    figures = agreement(spec, got, want)
    for t in spec.outputs:
        assert got[t.name].dtype == np.dtype(t.dtype.numpy)
    if "labels_agreement" in figures:
        assert figures["labels_agreement"] >= GATES["labels_agreement"]
        assert figures["features_max_abs_diff"] < 1e-3
    if "probabilities_max_abs_diff" in figures:
        assert figures["probabilities_max_abs_diff"] <= GATES["probabilities_max_abs_diff"]
    if "embedding_max_abs_diff" in figures:
        assert figures["embedding_max_abs_diff"] < 1e-4
    # the stored answers are ONNX Runtime's too
    stored = {t.name: data[t.name] for t in spec.outputs}
    assert all(v == 1.0 or v < 1e-5 for v in agreement(spec, want, stored).values())


def _positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def test_prepare_then_run_on_cpu_serves_gpu_torch_and_writes_figures_for_every_setting(reference, tmp_path):
    carry = tmp_path / "carry"
    carry.mkdir()
    (carry / "reference.npz").write_bytes(reference.read_bytes())  # made once for the module
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    prepared = subprocess.run(
        [str(SCRIPTS / "prepare.sh"), "--out", str(carry), "--stubs", f"3.12 {here}", "--fast"],
        capture_output=True,
        text=True,
        timeout=900,
        env={"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert re.search(r"together [\d.]+ MB of 67\.1 MB", prepared.stdout)
    with tarfile.open(carry / "numpy.tar.xz") as archive:
        names = archive.getnames()
    assert "./numpy-1.26.4.dist-info/METADATA" in names
    assert any(re.fullmatch(r"\./numpy/core/_multiarray_umath\.cpython-312-x86_64-linux-gnu\.so", n) for n in names)
    with tarfile.open(carry / "tritonserver.tar.xz") as archive:
        stubs = sorted(n.split("/")[2] for n in archive.getnames() if n.endswith("triton_python_backend_stub"))
    assert stubs == sorted({"3.12", here})

    out = tmp_path / "out"
    ran = subprocess.run(
        [str(SCRIPTS / "run.sh"), str(out), "--cpu", "--batches", "1,8", "--callers", "1,8", "--seconds", "0.1"],
        capture_output=True,
        text=True,
        timeout=900,
        env={
            "PATH": "/usr/bin:/bin",
            "CSPINE_GPU_CARRY": str(carry),
            "CSPINE_GPU_PYTHON": sys.executable,
            "HOME": str(tmp_path),
        },
    )
    assert ran.returncode == 0, ran.stdout[-5000:]
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md", "run.log"]
    result = json.loads((out / "results.json").read_text())
    assert result["environment"]["device"] == "cpu" and result["triton"].startswith("2.")
    assert _positive(result["triton_startup_s"]) and _positive(result["seconds"])
    for name in MODELS:
        assert result["parity"][name]["served"] == "fp32" and result["parity"][name]["fp32"]["passes"]
    assert set(result["triton_parity"]) == set(SERVED)
    assert all(entry["passes"] for entry in result["triton_parity"].values())
    cells = {(c["model"], c["where"], c["batching"], c["batch"], c["callers"]): c for c in result["cells"]}
    for name, spec in SERVED.items():
        batching = "dynamic" if spec.max_batch_size > 0 else "none"
        wanted = {(name, "triton", batching, b, 1) for b in (1, 8)} | {(name, "triton", batching, 1, 8)}
        if spec.max_batch_size > 0:
            wanted |= {(name, "triton", "none", 1, c) for c in (1, 8)}
        if name in MODELS:
            wanted |= {(name, "in_process", "none", b, 1) for b in (1, 8)} | {(name, "in_process", "none", 1, 8)}
        assert {k for k in cells if k[0] == name} == wanted
    for cell in result["cells"]:
        assert not cell["skipped"]
        assert cell["calls"] >= cell["callers"] and cell["items"] == cell["calls"] * cell["batch"]
        assert all(_positive(cell[k]) for k in ("items_per_s", "p50_ms", "p99_ms", "seconds"))
        assert cell["p99_ms"] >= cell["p50_ms"]
    for name, spec in MODELS.items():
        summary = result["summary"][name]
        assert set(summary["triton_over_in_process_p50_by_batch"]) == {"1", "8"}
        if spec.max_batch_size > 0:
            assert _positive(summary["dynamic_batching_gain_at_8_callers"])
    table = (out / "results.md").read_text()
    assert table.count("| seg_ct | triton | dynamic |") == 3 and "Triton 2." in table
