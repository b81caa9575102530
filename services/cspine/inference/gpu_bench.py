"""The GPU benchmark of ``scripts/gpu/run.sh``: the ``gpu_torch`` repository served by a real tritonserver on one
device, measured side by side with the same models in this process, in one run.

Needs only what the GPU machine has (PyTorch, numpy, the standard library) plus the server's folders: no
ONNX Runtime, no tritonclient (Triton is called over its HTTP API with binary tensors), no pydicom. In order:

1. **Parity** on ``--reference`` (real inputs with ONNX Runtime's answers, made by ``scripts/gpu/reference.py``):
   per model, the PyTorch runner on the device in FP32 and, on CUDA, in FP16; FP16 is kept for a model whose
   config asks for it only if it meets ``GATES`` (label agreement, probabilities), else FP32 is served.
2. **A serving repository** (a copy): each model's ``configs/gpu_torch.pbtxt`` with the chosen precision (and, with
   ``--device cpu``, ``KIND_CPU`` for the rehearsal), plus for every batching model a twin ``<model>_nodb`` with
   no ``dynamic_batching`` block, so batching on and off are measured on one server.
3. **Triton**, started with ``--model-config-name=gpu_torch``; its answers on the reference inputs are checked
   against ONNX Runtime's (an empty answer, the Python backend's symptom of numpy 2, fails the run).
4. **Cells**: per model, items/s and p50/p99 latency for batches of ``--batches`` items from one caller and for
   ``--callers`` concurrent single-item callers (with dynamic batching and without), through Triton and
   in-process (the same runner, same device, same precision). Each cell runs ``--seconds`` after its warm-up
   calls; cells past ``--budget-s`` are recorded as skipped.

Writes ``results.json`` and ``results.md`` into ``--out`` (nothing else: a device run returns few files).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import logging
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cspine.inference.local_triton import LocalTriton, TritonDist, TritonPorts, find_triton
from cspine.inference.specs import (
    EMBEDDING_TENSOR,
    LESION_CLASSIFY,
    LESION_EMBED,
    MODELS,
    PROBABILITIES_TENSOR,
    PROTO_CLASSIFY,
    PROTOTYPES_TENSOR,
    SERVED,
    DType,
    ModelSpec,
)
from cspine.inference.torch_runner import TorchRunner

logger = logging.getLogger(__name__)

CONFIG_NAME = "gpu_torch"
NO_BATCHING = "_nodb"  # suffix of the twin model served without dynamic batching
BATCHES = (1, 8, 16, 64)
CALLERS = (1, 8, 32)
# What FP16 must keep against ONNX Runtime (FP32, CPU) on the reference inputs to be served.
GATES = {"labels_agreement": 0.995, "probabilities_max_abs_diff": 0.01}
_BATCHING = re.compile(r"^dynamic_batching \{.*?^\}\n", re.MULTILINE | re.DOTALL)
_PRECISION = re.compile(r'(key: "precision", value: \{ string_value: ")(\w+)(")')
_NAME = re.compile(r'^name: "\w+"', re.MULTILINE)
_HTTP_TYPES = {DType.FP32: "FP32", DType.UINT8: "UINT8"}
_NUMPY_TYPES = {"FP32": np.float32, "UINT8": np.uint8, "FP16": np.float16, "INT64": np.int64}


@dataclass(frozen=True)
class BenchOptions:
    repository: Path
    reference: Path
    out: Path
    device: str = "cuda"
    seconds: float = 1.5
    warmup_calls: int = 2
    batches: tuple[int, ...] = BATCHES
    callers: tuple[int, ...] = CALLERS
    budget_s: float = 360.0
    triton: TritonDist | None = None  # None: the installed nvidia-pytriton's server
    workdir: Path | None = None  # where the serving repository is written (None: a temporary folder)
    startup_timeout_s: float = 300.0


@dataclass
class Cell:
    """One measurement: ``calls`` calls of ``batch`` items each from ``callers`` concurrent callers."""

    model: str
    where: str  # triton | in_process
    batching: str  # dynamic | none (Triton's dynamic batcher; "none" in-process and for unbatched models)
    batch: int
    callers: int
    calls: int = 0
    items: int = 0
    seconds: float = 0.0
    items_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    skipped: str = ""


@dataclass
class Progress:
    began: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.began


# --- reference data and parity -----------------------------------------------------------------------------


def load_reference(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """``model.tensor`` keys of the reference file, grouped by model."""
    out: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as npz:
        for key in npz.files:
            model, _, tensor = key.partition(".")
            value = npz[key]  # images and ROIs travel in FP16 (scripts/gpu/reference.py); models take FP32
            out.setdefault(model, {})[tensor] = value.astype(np.float32) if value.dtype == np.float16 else value
    return out


def agreement(spec: ModelSpec, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> dict[str, float]:
    """Label agreement (share of equal pixels) and the largest absolute difference of each float output."""
    figures: dict[str, float] = {}
    for t in spec.outputs:
        if t.name not in want:
            continue
        g, w = got[t.name], want[t.name]
        if g.shape != w.shape:
            raise RuntimeError(f"{spec.name}.{t.name}: shape {g.shape}, expected {w.shape}")
        if t.dtype is DType.UINT8:
            figures[f"{t.name}_agreement"] = float((g == w).mean())
        else:
            figures[f"{t.name}_max_abs_diff"] = float(np.abs(g.astype(np.float64) - w).max())
    return figures


def passes(figures: dict[str, float]) -> bool:
    return (
        figures.get("labels_agreement", 1.0) >= GATES["labels_agreement"]
        and figures.get("probabilities_max_abs_diff", 0.0) <= GATES["probabilities_max_abs_diff"]
    )


def _inputs_of(spec: ModelSpec, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {t.name: data[t.name] for t in spec.inputs}


def _chunks(spec: ModelSpec, data: dict[str, np.ndarray], size: int = 64) -> list[dict[str, np.ndarray]]:
    if spec.max_batch_size == 0:
        return [_inputs_of(spec, data)]
    count = len(data[spec.inputs[0].name])
    return [{t.name: data[t.name][i : i + size] for t in spec.inputs} for i in range(0, count, size)]


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def run_all(run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]], spec, data) -> dict[str, np.ndarray]:
    return _joined([run(chunk) for chunk in _chunks(spec, data)])


def config_precision(repository: Path, model: str) -> str:
    match = _PRECISION.search((repository / model / "configs" / f"{CONFIG_NAME}.pbtxt").read_text())
    return match[2] if match else "fp32"


def parity(repository: Path, reference: dict[str, dict[str, np.ndarray]], device: str) -> dict[str, dict]:
    """Per model: the PyTorch runner's agreement with ONNX Runtime in each precision tried on ``device``, and the
    precision to serve (the config's, if it meets ``GATES``, else fp32)."""
    precisions = ("fp32", "fp16") if device.startswith("cuda") else ("fp32",)
    proto = TorchRunner(PROTO_CLASSIFY, repository / PROTO_CLASSIFY.name / "1" / "model.onnx", device, "fp32")
    out: dict[str, dict] = {}
    for name, spec in MODELS.items():
        data = reference[name]
        entry: dict = {}
        for precision in precisions:
            runner = TorchRunner(spec, repository / name / "1" / "model.onnx", device, precision)
            got = run_all(runner.run, spec, data)
            figures = agreement(spec, got, data)
            if name == LESION_EMBED.name:  # what the embedding's error does to the classification
                feeds = {EMBEDDING_TENSOR: got[EMBEDDING_TENSOR], PROTOTYPES_TENSOR: data[PROTOTYPES_TENSOR]}
                want = {PROBABILITIES_TENSOR: data[PROBABILITIES_TENSOR]}
                figures.update(agreement(PROTO_CLASSIFY, proto.run(feeds), want))
            entry[precision] = {**figures, "passes": passes(figures)}
        wanted = config_precision(repository, name)
        entry["config"] = wanted
        entry["served"] = wanted if entry.get(wanted, {}).get("passes") else "fp32"
        out[name] = entry
        logger.info("parity %s: %s", name, entry)
    return out


# --- the serving repository --------------------------------------------------------------------------------


def serving_repository(repository: Path, into: Path, precision: dict[str, str], device: str) -> Path:
    """A copy of ``repository`` to serve with ``--model-config-name=gpu_torch``: the chosen precision per model,
    KIND_CPU when ``device`` is the CPU, and a ``<model>_nodb`` twin without dynamic batching for each model
    that batches."""
    into.mkdir(parents=True)
    for name in SERVED:
        shutil.copytree(repository / name, into / name, ignore=shutil.ignore_patterns("__pycache__"))
        config = into / name / "configs" / f"{CONFIG_NAME}.pbtxt"
        if not config.exists():
            continue  # the ensemble: Triton falls back to its config.pbtxt
        chosen = precision.get(name)
        text = config.read_text()
        if chosen:
            text = _PRECISION.sub(rf"\g<1>{chosen}\g<3>", text)
        if not device.startswith("cuda"):
            text = text.replace("KIND_GPU", "KIND_CPU")
        config.write_text(text)
        if _BATCHING.search(text):
            twin = into / f"{name}{NO_BATCHING}"
            shutil.copytree(into / name, twin)
            plain = _NAME.sub(f'name: "{name}{NO_BATCHING}"', _BATCHING.sub("", text))
            plain += f'parameters: {{ key: "spec", value: {{ string_value: "{name}" }} }}\n'
            (twin / "configs" / f"{CONFIG_NAME}.pbtxt").write_text(plain)
            (twin / "config.pbtxt").unlink()
    return into


# --- Triton over HTTP with binary tensors ------------------------------------------------------------------


class HttpModel:
    """One caller's keep-alive HTTP connection to one Triton model (binary tensor extension, no tritonclient)."""

    def __init__(self, port: int, model: str, spec: ModelSpec) -> None:
        self.model, self.spec = model, spec
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        self.connection.connect()
        assert self.connection.sock is not None
        # headers and body go out in two writes: without this, Nagle and delayed ACKs add ~40 ms to each call
        self.connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def body(self, inputs: dict[str, np.ndarray]) -> tuple[bytes, int]:
        header = {
            "inputs": [
                {
                    "name": t.name,
                    "shape": list(inputs[t.name].shape),
                    "datatype": _HTTP_TYPES[t.dtype],
                    "parameters": {"binary_data_size": inputs[t.name].nbytes},
                }
                for t in self.spec.inputs
            ],
            "outputs": [{"name": t.name, "parameters": {"binary_data": True}} for t in self.spec.outputs],
        }
        head = json.dumps(header).encode()
        return head + b"".join(np.ascontiguousarray(inputs[t.name]).tobytes() for t in self.spec.inputs), len(head)

    def call(self, body: tuple[bytes, int]) -> dict[str, np.ndarray]:
        data, head = body
        self.connection.request(
            "POST",
            f"/v2/models/{self.model}/infer",
            data,
            {"Inference-Header-Content-Length": str(head), "Content-Type": "application/octet-stream"},
        )
        response = self.connection.getresponse()
        payload = response.read()
        if response.status != 200:
            raise RuntimeError(f"{self.model}: HTTP {response.status}: {payload[:300]!r}")
        size = int(response.getheader("Inference-Header-Content-Length") or len(payload))
        header = json.loads(payload[:size])
        out, offset = {}, size
        for output in header["outputs"]:
            nbytes = output["parameters"]["binary_data_size"]
            array = np.frombuffer(payload[offset : offset + nbytes], dtype=_NUMPY_TYPES[output["datatype"]])
            out[output["name"]] = array.reshape(output["shape"])
            offset += nbytes
        return out

    def close(self) -> None:
        self.connection.close()


def server_version(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", "/v2")
        return json.loads(connection.getresponse().read()).get("version", "")
    finally:
        connection.close()


# --- measuring ---------------------------------------------------------------------------------------------


def measure(cell: Cell, make_caller: Callable[[], tuple[Callable[[], int], Callable[[], None]]], options) -> Cell:
    """Run ``cell.callers`` threads, each with its own caller (a call returning its item count, and a close):
    ``options.warmup_calls`` calls each, then calls until ``options.seconds`` have passed (at least one)."""
    clock = {"began": 0.0, "deadline": 0.0}

    def go() -> None:  # run by the last thread to arrive, before any is released
        clock["began"] = time.perf_counter()
        clock["deadline"] = clock["began"] + options.seconds

    start = threading.Barrier(cell.callers + 1, action=go)
    latencies: list[list[float]] = [[] for _ in range(cell.callers)]
    items = [0] * cell.callers
    ended = [0.0] * cell.callers
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        call, close = make_caller()
        try:
            for _ in range(options.warmup_calls):
                call()
            start.wait()
            while True:
                began = time.perf_counter()
                items[i] += call()
                latencies[i].append(time.perf_counter() - began)
                if time.perf_counter() >= clock["deadline"]:
                    break
            ended[i] = time.perf_counter()
        except BaseException as error:  # noqa: BLE001 — reported by the measuring thread
            errors.append(error)
            start.abort()
        finally:
            close()

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(cell.callers)]
    for thread in threads:
        thread.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a caller failed: its error is raised below
        start.wait()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    every = np.array([v for per in latencies for v in per]) * 1000
    cell.calls, cell.items = len(every), sum(items)
    cell.seconds = max(ended) - clock["began"]
    cell.items_per_s = cell.items / cell.seconds
    cell.p50_ms, cell.p99_ms = float(np.percentile(every, 50)), float(np.percentile(every, 99))
    return cell


def batch_of(spec: ModelSpec, data: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``batch`` items of the reference inputs (repeated as needed); a prototype set stays whole."""
    out = {}
    for t in spec.inputs:
        value = data[t.name]
        out[t.name] = value if t.name == PROTOTYPES_TENSOR else np.resize(value, (batch, *value.shape[1:]))
    return out


def _bench_inputs(name: str, reference: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if name == LESION_CLASSIFY.name:
        embed = reference[LESION_EMBED.name]
        return {**embed, PROTOTYPES_TENSOR: embed[PROTOTYPES_TENSOR]}
    return reference[name]


def bench(options: BenchOptions) -> dict:
    progress = Progress()
    reference = load_reference(options.reference)
    result: dict = {"environment": environment(options.device), "options": _options_dict(options)}
    result["parity"] = parity(options.repository, reference, options.device)
    served = {name: entry["served"] for name, entry in result["parity"].items()}
    with tempfile.TemporaryDirectory(prefix="cspine-gpu-bench-", dir=options.workdir) as workdir:
        repository = serving_repository(options.repository, Path(workdir) / "repository", served, options.device)
        result.update(_serve_and_measure(repository, reference, served, options, progress))
    result["seconds"] = round(progress.elapsed(), 1)
    return result


def _serve_and_measure(repository: Path, reference, served: dict[str, str], options: BenchOptions, progress) -> dict:
    """Start Triton on ``repository``, check its answers, then measure every cell."""
    result: dict = {}
    cells: list[Cell] = []
    began = time.monotonic()
    with LocalTriton(
        repository,
        TritonPorts.free(),
        model_config_name=CONFIG_NAME,
        dist=options.triton,
        startup_timeout_s=options.startup_timeout_s,
    ) as server:
        result["triton_startup_s"] = round(time.monotonic() - began, 1)
        result["triton"] = server_version(server.ports.http)
        result["triton_parity"] = _triton_parity(server.ports.http, reference)
        for name in (*MODELS, LESION_CLASSIFY.name):
            spec = SERVED[name]
            data = _bench_inputs(name, reference)
            twin = f"{name}{NO_BATCHING}" if (repository / f"{name}{NO_BATCHING}").is_dir() else None
            runner = None
            if name in MODELS:
                runner = TorchRunner(spec, options.repository / name / "1" / "model.onnx", options.device, served[name])
            for cell, make in _cells(name, spec, data, twin, runner, server.ports.http, options):
                if progress.elapsed() > options.budget_s:
                    cell.skipped = "budget"
                else:
                    measure(cell, make, options)
                    logger.info(
                        "%s %s %s batch %d callers %d: %.1f items/s, p50 %.2f ms, p99 %.2f ms (%d calls)",
                        cell.model,
                        cell.where,
                        cell.batching,
                        cell.batch,
                        cell.callers,
                        cell.items_per_s,
                        cell.p50_ms,
                        cell.p99_ms,
                        cell.calls,
                    )
                cells.append(cell)
    result["cells"] = [asdict(c) for c in cells]
    result["summary"] = summary(cells)
    return result


def _cells(name, spec, data, twin, runner, port, options):
    """(cell, caller factory) pairs of one model, in the order they are measured."""

    def triton(model: str, batch: int):
        inputs = batch_of(spec, data, batch)

        def make():
            client = HttpModel(port, model, spec)
            body = client.body(inputs)
            return (lambda: (client.call(body), batch)[1]), client.close

        return make

    def local(batch: int):
        assert runner is not None
        inputs = batch_of(spec, data, batch)
        return lambda: ((lambda: (runner.run(inputs), batch)[1]), lambda: None)

    batching = "dynamic" if twin else "none"
    for batch in options.batches:
        yield Cell(name, "triton", batching, batch, 1), triton(name, batch)
        if runner is not None:
            yield Cell(name, "in_process", "none", batch, 1), local(batch)
    for callers in options.callers:
        measured = callers == 1 and 1 in options.batches  # one caller of one item: the batch-1 cells above
        if not measured:
            yield Cell(name, "triton", batching, 1, callers), triton(name, 1)
        if twin:
            yield Cell(name, "triton", "none", 1, callers), triton(twin, 1)
        if runner is not None and not measured:
            yield Cell(name, "in_process", "none", 1, callers), local(1)


def _triton_parity(port: int, reference: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """Triton's answers on the reference inputs against ONNX Runtime's (the ensemble's against the chain)."""
    out = {}
    for name in (*MODELS, LESION_CLASSIFY.name):
        spec = SERVED[name]
        data = _bench_inputs(name, reference)
        client = HttpModel(port, name, spec)
        try:
            got = run_all(lambda chunk: client.call(client.body(chunk)), spec, data)  # noqa: B023 — called here
        finally:
            client.close()
        for t in spec.outputs:
            if got[t.name].size == 0:
                raise RuntimeError(
                    f"Triton answered {name}.{t.name} with an empty tensor: the Python backend stub sees numpy 2"
                )
        want = (
            {EMBEDDING_TENSOR: data[EMBEDDING_TENSOR], PROBABILITIES_TENSOR: data[PROBABILITIES_TENSOR]}
            if name == LESION_CLASSIFY.name
            else data
        )
        figures = agreement(spec, got, want)
        out[name] = {**figures, "passes": passes(figures)}
        logger.info("Triton parity %s: %s", name, out[name])
    return out


def summary(cells: list[Cell]) -> dict[str, dict]:
    """Per model: dynamic batching's gain in items/s at the most callers, and Triton's p50 over in-process
    p50 at each batch size (the goals: ≥ 2× and ≤ 1.2×)."""
    out: dict[str, dict] = {}
    done = [c for c in cells if not c.skipped]
    for model in dict.fromkeys(c.model for c in cells):
        mine = [c for c in done if c.model == model]
        entry: dict = {}
        concurrent = [c for c in mine if c.batch == 1 and c.where == "triton"]
        most = max((c.callers for c in concurrent), default=0)
        on = next((c for c in concurrent if c.callers == most and c.batching == "dynamic"), None)
        off = next((c for c in concurrent if c.callers == most and c.batching == "none"), None)
        if on and off:
            entry[f"dynamic_batching_gain_at_{most}_callers"] = round(on.items_per_s / off.items_per_s, 2)
        ratios = {}
        for c in mine:
            if c.where == "triton" and c.callers == 1:
                same = (d for d in mine if d.where == "in_process" and d.callers == 1 and d.batch == c.batch)
                local = next(same, None)
                if local:
                    ratios[str(c.batch)] = round(c.p50_ms / local.p50_ms, 2)
        if ratios:
            entry["triton_over_in_process_p50_by_batch"] = ratios
        out[model] = entry
    return out


def environment(device: str) -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "device": device,
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
        env["cuda"] = torch.version.cuda
        smi = shutil.which("nvidia-smi")
        if smi:
            query = [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
            env["nvidia_smi"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip()
    return env


def _options_dict(options: BenchOptions) -> dict:
    out = {k: v for k, v in asdict(options).items() if k != "triton"}
    return {k: str(v) if isinstance(v, Path) else v for k, v in out.items()}


# --- report ------------------------------------------------------------------------------------------------


def _number(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


PARITY_HEAD = ("| model | served precision | FP32 vs ORT | FP16 vs ORT | Triton vs ORT |", "|---|---|---|---|---|")
CELLS_HEAD = (
    "| model | where | batching | batch | callers | items/s | p50 ms | p99 ms | calls |",
    "|---|---|---|---|---|---|---|---|---|",
)
SUMMARY_HEAD = (
    "| model | dynamic batching gain (items/s, most callers) | Triton p50 / in-process p50 by batch |",
    "|---|---|---|",
)


def markdown(result: dict) -> str:
    env = result["environment"]
    where = env.get("nvidia_smi") or env.get("gpu") or f"CPU ({env['cpu_count']} cores)"
    lines = [
        f"Device: {where}; Python {env['python']}, torch {env['torch']}, numpy {env['numpy']}, "
        f"Triton {result['triton']}; {result['seconds']} s in all "
        f"(Triton ready in {result['triton_startup_s']} s).",
        "",
        *PARITY_HEAD,
    ]
    triton = result["triton_parity"]
    for name, entry in result["parity"].items():
        fp32, fp16 = (_figures(entry.get(p)) for p in ("fp32", "fp16"))
        lines.append(f"| {name} | {entry['served']} | {fp32} | {fp16} | {_figures(triton[name])} |")
    lines += [f"| lesion_classify | (ensemble) | | | {_figures(triton['lesion_classify'])} |", "", *CELLS_HEAD]
    for c in result["cells"]:
        setting = f"| {c['model']} | {c['where']} | {c['batching']} | {c['batch']} | {c['callers']} |"
        if c["skipped"]:
            lines.append(f"{setting} skipped ({c['skipped']}) | | | |")
        else:
            figures = (_number(c["items_per_s"]), _number(c["p50_ms"]), _number(c["p99_ms"]), str(c["calls"]))
            lines.append(f"{setting} {' | '.join(figures)} |")
    lines += ["", *SUMMARY_HEAD]
    for name, entry in result["summary"].items():
        gain = next((f"{v}× ({k.split('_')[-2]} callers)" for k, v in entry.items() if k.startswith("dynamic")), "—")
        ratios = ", ".join(f"{b}: {r}×" for b, r in entry.get("triton_over_in_process_p50_by_batch", {}).items())
        lines.append(f"| {name} | {gain} | {ratios or '—'} |")
    return "\n".join(lines) + "\n"


def _figures(figures: dict | None) -> str:
    if not figures:
        return "—"
    parts = []
    for key, value in figures.items():
        if key.endswith("_agreement"):
            parts.append(f"{key.removesuffix('_agreement')} {value:.4f}")
        elif key.endswith("_max_abs_diff"):
            parts.append(f"{key.removesuffix('_max_abs_diff')} ±{value:.1e}")
    return ", ".join(parts) + ("" if figures.get("passes", True) else " (fails the gates)")


def check_finite(result: dict) -> None:
    """Every measured figure is positive and finite (a run that produced nothing usable fails loudly)."""
    for c in result["cells"]:
        if c["skipped"]:
            continue
        for key in ("items_per_s", "p50_ms", "p99_ms", "seconds"):
            if not (math.isfinite(c[key]) and c[key] > 0):
                raise RuntimeError(
                    f"{c['model']} {c['where']} batch {c['batch']} callers {c['callers']}: {key} {c[key]}"
                )


# --- command line ------------------------------------------------------------------------------------------


def _sizes(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(",") if v)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cspine.inference.gpu_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True, help="the model repository (model_repository/)")
    parser.add_argument("--reference", type=Path, required=True, help="reference.npz of scripts/gpu/reference.py")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (the rehearsal)")
    parser.add_argument("--seconds", type=float, default=1.5, help="measured seconds per cell")
    parser.add_argument("--warmup-calls", type=int, default=2)
    parser.add_argument("--batches", type=_sizes, default=BATCHES)
    parser.add_argument("--callers", type=_sizes, default=CALLERS)
    parser.add_argument("--budget-s", type=float, default=360.0, help="cells starting later than this are skipped")
    parser.add_argument("--triton", type=Path, help="an unpacked tritonserver folder (default: the installed wheel's)")
    parser.add_argument("--triton-libs", type=Path, help="its shared libraries (default: <triton>/../libs)")
    parser.add_argument("--workdir", type=Path, help="where the serving repository is written (default: a temp dir)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("cspine.triton").setLevel(logging.WARNING)
    dist = None
    if args.triton:
        dist = TritonDist(root=args.triton.resolve(), libs=(args.triton_libs or args.triton.parent / "libs").resolve())
    else:
        find_triton()  # fail now, not after the parity stage, when there is no server
    options = BenchOptions(
        repository=args.repository.resolve(),
        reference=args.reference.resolve(),
        out=args.out.resolve(),
        device=args.device,
        seconds=args.seconds,
        warmup_calls=args.warmup_calls,
        batches=args.batches,
        callers=args.callers,
        budget_s=args.budget_s,
        triton=dist,
        workdir=args.workdir,
    )
    options.out.mkdir(parents=True, exist_ok=True)
    result = bench(options)
    check_finite(result)
    (options.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    (options.out / "results.md").write_text(markdown(result))
    logger.info("wrote %s and %s", options.out / "results.json", options.out / "results.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
