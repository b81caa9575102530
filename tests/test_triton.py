"""Triton serving: the model repository's configs agree with the specs (and so with the ONNX graphs, which
test_models checks against the same specs), the GPU plan
commands follow the specs, and a real tritonserver (bundled binary, CPU, Python backend) serves every model
with the outputs in-process ONNX Runtime gives, rejects malformed requests, and counts them in its metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from cspine.errors import DeadlineExceededError, InferenceError, TritonUnavailableError
from cspine.inference.client import TritonClient
from cspine.inference.local_triton import LocalTriton, TritonPorts, TritonStartError, default_repository
from cspine.inference.model_config import config_path, data_type, load_config, opt_batch
from cspine.inference.runner import OnnxRunner
from cspine.inference.specs import ENSEMBLES, MAX_EMBEDDINGS, MAX_PROTOTYPES, MODELS, SERVED, ModelSpec
from support.server import free_port

REPOSITORY = default_repository()


def _inputs(spec: ModelSpec, batch: int, seed: int = 0, prototypes: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for t in spec.inputs:
        if spec.max_batch_size > 0:
            shape = (batch, *t.shape)
        else:
            shape = tuple((prototypes if t.name == "prototypes" else batch) if d == -1 else d for d in t.shape)
        if t.name == "modality":
            out[t.name] = np.eye(shape[-1], dtype=np.float32)[rng.integers(shape[-1], size=shape[0])]
        else:
            out[t.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _config_tensors(tensors) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, data_type(t.data_type), tuple(t.dims)) for t in tensors]


def _spec_tensors(tensors) -> list[tuple[str, str, tuple[int, ...]]]:
    return [(t.name, t.dtype.value, t.shape) for t in tensors]


# --- contract: configs ⇄ specs ⇄ ONNX graphs --------------------------------------------------------------


def test_the_repository_serves_exactly_the_specified_models():
    folders = sorted(p.name for p in REPOSITORY.iterdir() if p.is_dir())
    assert folders == sorted(SERVED)


@pytest.mark.parametrize("config_name", [None, "gpu"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_configs_parse_and_agree_with_the_specs(name, config_name):
    spec = MODELS[name]
    config = load_config(config_path(REPOSITORY, name, config_name))
    assert config.name == name
    assert config.max_batch_size == spec.max_batch_size
    assert _config_tensors(config.input) == _spec_tensors(spec.inputs)
    assert _config_tensors(config.output) == _spec_tensors(spec.outputs)
    assert config.HasField("dynamic_batching") == (spec.max_batch_size > 0)
    if spec.max_batch_size > 0:
        assert all(1 <= b <= spec.max_batch_size for b in config.dynamic_batching.preferred_batch_size)
    (group,) = config.instance_group
    if config_name is None:
        assert config.backend == "python" and group.kind == group.KIND_CPU
        assert int(config.parameters["ort_threads"].string_value) >= 1
        assert (REPOSITORY / name / "1" / "model.py").read_text().count("cspine.inference.triton_backend") == 1
    else:
        assert config.platform == "tensorrt_plan" and config.default_model_filename == "model.plan"
        assert group.kind == group.KIND_GPU and list(group.profile) == ["0"]


def test_the_ensemble_chains_embedding_and_prototype_classifier():
    (name,) = ENSEMBLES
    spec = ENSEMBLES[name]
    config = load_config(config_path(REPOSITORY, name))
    assert config.platform == "ensemble" and config.max_batch_size == 0
    assert _config_tensors(config.input) == _spec_tensors(spec.inputs)
    assert _config_tensors(config.output) == _spec_tensors(spec.outputs)
    produced = {t.name for t in spec.inputs}
    for step in config.ensemble_scheduling.step:
        model = MODELS[step.model_name]
        assert set(step.input_map) == {t.name for t in model.inputs}
        assert set(step.input_map.values()) <= produced
        assert set(step.output_map) <= {t.name for t in model.outputs}
        produced |= set(step.output_map.values())
    assert {t.name for t in spec.outputs} <= produced


def test_plan_commands_follow_the_specs_and_gpu_configs():
    out = subprocess.run(
        [sys.executable, "-m", "cspine", "triton", "plan-commands", "--repository", "/models"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    commands = [shlex.split(line) for line in out.splitlines()]
    assert [c[0] for c in commands] == ["trtexec"] * len(MODELS)
    for command in commands:
        flags = dict(a[2:].split("=", 1) for a in command[1:] if "=" in a)
        name = re.fullmatch(r"/models/(\w+)/1/model\.onnx", flags["onnx"])[1]
        spec = MODELS[name]
        assert flags["saveEngine"] == f"/models/{name}/1/model.plan" and "--fp16" in command
        shapes = {
            key: {t.split(":")[0]: tuple(int(d) for d in t.split(":")[1].split("x")) for t in flags[key].split(",")}
            for key in ("minShapes", "optShapes", "maxShapes")
        }
        for t in spec.inputs:
            if spec.max_batch_size > 0:
                opt = opt_batch(load_config(config_path(REPOSITORY, name, "gpu")))
                assert shapes["minShapes"][t.name] == (1, *t.shape)
                assert shapes["optShapes"][t.name] == (opt, *t.shape)
                assert shapes["maxShapes"][t.name] == (spec.max_batch_size, *t.shape)
            else:
                top = MAX_PROTOTYPES if t.name == "prototypes" else MAX_EMBEDDINGS
                assert shapes["minShapes"][t.name] == (1, *t.shape[1:])
                assert shapes["maxShapes"][t.name] == (top, *t.shape[1:])


# --- a real tritonserver --------------------------------------------------------------------------------


def _run(coro):
    return asyncio.run(coro)


async def _infer(url: str, name: str, inputs: dict, **kwargs) -> dict:
    async with TritonClient(url) as client:
        return await client.infer(name, inputs, **kwargs)


def _assert_same(spec: ModelSpec, got: dict, want: dict) -> None:
    for t in spec.outputs:
        assert got[t.name].dtype == want[t.name].dtype and got[t.name].shape == want[t.name].shape
        assert got[t.name].nbytes == want[t.name].nbytes > 0
        if t.dtype.value == "UINT8":
            assert (got[t.name] == want[t.name]).mean() >= 0.999
        else:
            np.testing.assert_allclose(got[t.name], want[t.name], atol=1e-5)


def _listening_addresses(port: int) -> set[str]:
    """The addresses of the sockets listening on TCP ``port`` on this host (IPv4 and IPv6, from /proc)."""
    found = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                address, port_hex = fields[1].split(":")
                if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    # /proc writes each 32-bit word in host (little-endian) order
                    ip = ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, width, 4)))
                    found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # gRPC binds ::ffff:127.0.0.1
    return found


def test_the_local_triton_listens_on_loopback_only(triton):
    for name, port in (("http", triton.ports.http), ("grpc", triton.ports.grpc), ("metrics", triton.ports.metrics)):
        addresses = _listening_addresses(port)
        assert addresses, f"nothing listens on Triton's {name} port {port}"
        assert all(ipaddress.ip_address(a).is_loopback for a in addresses), (name, addresses)


def test_every_model_is_ready(triton):
    async def check():
        async with TritonClient(triton.grpc_url) as client:
            await client.check_ready()
            return await client.server_ready()

    assert _run(check())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_triton_outputs_equal_in_process_onnx_runtime(triton, name):
    spec = MODELS[name]
    inputs = _inputs(spec, batch=5, seed=3)
    want = OnnxRunner(spec, REPOSITORY / name / "1" / "model.onnx", threads=1).run(inputs)
    got = _run(_infer(triton.grpc_url, name, inputs))
    _assert_same(spec, got, want)


@pytest.mark.parametrize("name", ["seg_ct", "lesion_embed"])
def test_concurrent_requests_of_mixed_sizes_each_get_their_own_answer(triton, name):
    spec = MODELS[name]
    runner = OnnxRunner(spec, REPOSITORY / name / "1" / "model.onnx", threads=1)
    requests = [_inputs(spec, batch=b, seed=b) for b in (1, 4, 2, 7, 3, 1)]

    async def all_at_once():
        async with TritonClient(triton.grpc_url) as client:
            return await asyncio.gather(*(client.infer(name, r) for r in requests))

    for request, got in zip(requests, _run(all_at_once()), strict=True):
        _assert_same(spec, got, runner.run(request))


def test_a_series_larger_than_the_batch_limit_is_split_and_joined_in_order(triton):
    spec = MODELS["lesion_embed"]
    inputs = _inputs(spec, batch=spec.max_batch_size + 9, seed=5)
    want = OnnxRunner(spec, REPOSITORY / "lesion_embed" / "1" / "model.onnx", threads=1).run(inputs)
    _assert_same(spec, _run(_infer(triton.grpc_url, "lesion_embed", inputs)), want)


def test_the_ensemble_equals_embedding_then_prototype_classifier(triton):
    embed = MODELS["lesion_embed"]
    inputs = _inputs(embed, batch=4, seed=8)
    prototypes = np.random.default_rng(9).standard_normal((5, 64)).astype(np.float32)
    embedding = _run(_infer(triton.grpc_url, "lesion_embed", inputs))["embedding"]
    want = _run(_infer(triton.grpc_url, "proto_classify", {"embedding": embedding, "prototypes": prototypes}))
    got = _run(_infer(triton.grpc_url, "lesion_classify", {**inputs, "prototypes": prototypes}))
    np.testing.assert_allclose(got["embedding"], embedding, atol=1e-6)
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-6)
    assert got["probabilities"].shape == (4, 5)


MALFORMED = {  # case: (model, input name, shape, dtype) sent straight through tritonclient, past cspine's checks
    "wrong shape": ("seg_ct", "image", [2, 3, 150, 160], "FP32"),
    "wrong dtype": ("seg_ct", "image", [2, 3, 160, 160], "FP16"),
    "unknown input": ("seg_ct", "pixels", [2, 3, 160, 160], "FP32"),
    "missing input": ("seg_ct", None, None, None),
    "unknown model": ("seg_spine", "image", [2, 3, 160, 160], "FP32"),
    "prototypes of another width": ("proto_classify", "prototypes", [3, 32], "FP32"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_get_an_error_and_the_server_keeps_serving(triton, case):
    model, name, shape, dtype = MALFORMED[case]
    inputs = []
    if name is not None:
        tensor = grpcclient.InferInput(name, shape, dtype)
        tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float16 if dtype == "FP16" else np.float32))
        inputs.append(tensor)
    with pytest.raises(InferenceServerException) as raised:
        grpcclient.InferenceServerClient(triton.grpc_url).infer(model, inputs)
    assert raised.value.message()
    spec = MODELS["seg_ct"]
    assert _run(_infer(triton.grpc_url, "seg_ct", _inputs(spec, 1)))["labels"].shape == (1, 160, 160)


def test_the_client_checks_inputs_before_sending(triton):
    spec = MODELS["seg_xr"]
    good = _inputs(spec, 1)
    with pytest.raises(InferenceError, match="float32"):
        _run(_infer(triton.grpc_url, "seg_xr", {"image": good["image"].astype(np.float64)}))
    with pytest.raises(InferenceError, match="shape"):
        _run(_infer(triton.grpc_url, "seg_xr", {"image": good["image"][:, :, :100]}))
    with pytest.raises(InferenceError, match="inputs"):
        _run(_infer(triton.grpc_url, "seg_xr", {"pixels": good["image"]}))


def test_a_passed_deadline_is_deadline_exceeded(triton):
    inputs = _inputs(MODELS["seg_ct"], batch=64)
    with pytest.raises(DeadlineExceededError):
        _run(_infer(triton.grpc_url, "seg_ct", inputs, deadline_s=0.001))


def _success_count(metrics: str, model: str) -> float:
    pattern = rf'^nv_inference_request_success\{{model="{model}",version="1"\}} (\S+)$'
    found = re.search(pattern, metrics, re.MULTILINE)
    return float(found[1]) if found else 0.0


def test_the_metrics_endpoint_counts_the_requests(triton):
    def metrics() -> str:
        with urllib.request.urlopen(triton.metrics_url, timeout=5) as response:
            return response.read().decode()

    before = _success_count(metrics(), "seg_mr")
    spec = MODELS["seg_mr"]
    for seed in range(3):
        _run(_infer(triton.grpc_url, "seg_mr", _inputs(spec, 2, seed)))
    deadline = time.monotonic() + 10
    while _success_count(metrics(), "seg_mr") < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)  # Triton refreshes counters on its own schedule
    assert _success_count(metrics(), "seg_mr") == before + 3


def test_an_unreachable_triton_is_unavailable():
    async def check():
        async with TritonClient(f"127.0.0.1:{free_port()}") as client:
            await client.check_ready(timeout_s=1)

    with pytest.raises(TritonUnavailableError, match="does not answer"):
        _run(check())
    with pytest.raises(TritonUnavailableError):
        _run(_infer(f"127.0.0.1:{free_port()}", "seg_xr", _inputs(MODELS["seg_xr"], 1), deadline_s=2))


def test_a_model_that_does_not_load_is_named_with_triton_s_reason(tmp_path):
    repository = tmp_path / "repository"
    for name in ("lesion_embed", "proto_classify"):
        shutil.copytree(REPOSITORY / name, repository / name)
    (repository / "proto_classify" / "1" / "model.onnx").write_bytes(b"this is not an ONNX model")
    ports = TritonPorts(http=free_port(), grpc=free_port(), metrics=free_port())
    with pytest.raises(TritonStartError, match=r"model proto_classify did not load: .+"):
        LocalTriton(repository, ports).start()


def test_cspine_triton_start_serves_until_sigterm_then_stops_cleanly(tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(REPOSITORY / "proto_classify", repository / "proto_classify")
    ports = [free_port() for _ in range(3)]
    command = [sys.executable, "-m", "cspine", "triton", "start", "--repository", str(repository)]
    command += ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("Triton ready"):
                break
        assert lines and lines[-1].startswith(f"Triton ready: gRPC 127.0.0.1:{ports[1]}"), "".join(lines[-20:])
        assert any("successfully loaded 'proto_classify'" in line for line in lines)  # Triton's log, forwarded
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{ports[0]}/v2/health/live", timeout=2)


def test_benchmark_variants_change_only_the_dynamic_batching_of_the_cpu_configs(tmp_path):
    from cspine.bench.triton import variant

    off = variant(REPOSITORY, tmp_path / "off", None)
    slow = variant(REPOSITORY, tmp_path / "slow", 12345)
    for name, spec in MODELS.items():
        shipped = load_config(config_path(REPOSITORY, name))
        plain, delayed = load_config(config_path(off, name)), load_config(config_path(slow, name))
        assert not plain.HasField("dynamic_batching")
        shipped.ClearField("dynamic_batching")
        assert plain == shipped
        if spec.max_batch_size > 0:
            assert delayed.dynamic_batching.max_queue_delay_microseconds == 12345
        assert load_config(config_path(slow, name, "gpu")) == load_config(config_path(REPOSITORY, name, "gpu"))
