"""The async Triton client the pipeline uses: a thin ``tritonclient.grpc.aio`` wrapper driven by
``inference.specs``.

- Inputs are checked against the model's spec before anything is sent (names, dtypes, shapes), so a
  programming error is a clear ``InferenceError`` rather than Triton's message about a tensor.
- A batch larger than the model's ``max_batch_size`` (a CT series of 120 slices) is sent as several
  requests at once; Triton's dynamic batcher schedules them and the outputs are joined in order.
- Every call carries a deadline (the caller's, else the client's default); when it passes the call raises
  ``DeadlineExceededError``.
- Outputs are checked against the spec too: the bundled Python backend answers with empty tensors and no
  error when numpy 2 is in its environment (DESIGN.md §5), and that must never pass for a result.
- Triton down → ``TritonUnavailableError`` naming the URL; a model not ready, or its Python backend process
  dead ("Stub process … is not healthy") → the same, naming the model.
- Behind a Kubernetes headless service (``TritonClientConfig.round_robin``), gRPC resolves the name once and only
  resolves it again when a connection fails, so Triton pods added by the autoscaler would get no work. With
  ``reconnect_s`` the client opens a fresh channel (a fresh DNS lookup) that often; calls already running
  finish on the old channel, which is closed once they have had ``timeout_s``.
- With ``TritonClientConfig.pin_versions`` every call to a model with weights names ``version_set`` (which the
  service sets to the set it serves): a Triton that loads every set (the Helm chart's) answers each gateway with
  its own set's models. A model without such a version is ``TritonUnavailableError``. The ``lesion_classify``
  ensemble cannot name its steps' versions, so a pinned client is asked for ``lesion_embed`` and
  ``proto_classify`` instead (``classifies_by_ensemble``).
- When Triton goes away and comes back (``cspine serve`` restarts a local one that crashed), the channel
  reconnects by itself; its reconnection backoff is capped at ``RECONNECT_MAX_BACKOFF_MS`` so that readiness
  returns within seconds of Triton's, not after gRPC's default of up to two minutes.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from cspine.config import TritonClientConfig
from cspine.errors import DeadlineExceededError, InferenceError, TritonUnavailableError
from cspine.inference.specs import MODELS, SERVED, ModelSpec

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
RECONNECT_MAX_BACKOFF_MS = 2_000


def channel_args(round_robin: bool = False) -> list[tuple[str, object]]:
    """gRPC channel options: large messages, keepalive, and optionally client-side round-robin over every
    address the name resolves to (a Kubernetes headless service lists one per Triton pod; a ClusterIP
    gives one long-lived connection to one pod)."""
    args: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_MAX_BACKOFF_MS),
    ]
    if round_robin:
        args.append(("grpc.lb_policy_name", "round_robin"))
    return args


class TritonClient:
    """One channel to Triton (or, with ``round_robin``, to every Triton behind a DNS name)."""

    def __init__(
        self,
        url: str,
        config: TritonClientConfig = TritonClientConfig(),
        *,
        observer: Callable[[str, float], None] | None = None,
    ) -> None:
        self.url = url
        self.timeout_s = config.timeout_s
        self.reconnect_s = config.reconnect_s
        self.observer = observer  # called with (model, seconds) after every inference request
        self._args = channel_args(config.round_robin)
        self._client = triton_aio.InferenceServerClient(url, channel_args=self._args)
        self._opened = time.monotonic()
        self._retiring: set[asyncio.Task] = set()
        self.pin_versions = config.pin_versions
        self.version_set: int | None = None  # the set a pinned client asks for (the service sets it)

    @property
    def client(self) -> triton_aio.InferenceServerClient:
        """The current channel's client; a fresh one once ``reconnect_s`` has passed."""
        if self.reconnect_s is not None and time.monotonic() - self._opened >= self.reconnect_s:
            old, self._client = self._client, triton_aio.InferenceServerClient(self.url, channel_args=self._args)
            self._opened = time.monotonic()
            task = asyncio.get_running_loop().create_task(self._close_later(old))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)
        return self._client

    async def _close_later(self, old: triton_aio.InferenceServerClient) -> None:
        try:
            await asyncio.sleep(self.timeout_s)
        finally:
            await old.close()

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await self._client.close()

    async def __aenter__(self) -> TritonClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _version(self, model: str) -> str:
        """The version to ask ``model`` for: the service's set when pinned and ``model`` has weights, else "" (the
        one Triton serves)."""
        if self.pin_versions and self.version_set is not None and model in MODELS:
            return str(self.version_set)
        return ""

    @property
    def classifies_by_ensemble(self) -> bool:
        """Whether lesions are embedded and classified in one ``lesion_classify`` call (unpinned), or as two calls
        that each name the set."""
        return not self.pin_versions

    async def server_ready(self, timeout_s: float = 2.0) -> bool:
        try:
            return bool(await self.client.is_server_ready(client_timeout=timeout_s))
        except InferenceServerException:
            return False

    async def check_ready(self, models: tuple[str, ...] | None = None, timeout_s: float = 5.0) -> None:
        """Raise ``TritonUnavailableError`` unless Triton is live and every model in ``models`` is READY. (Not
        Triton's own server readiness: with strict readiness it is false for the seconds a model reload takes,
        while the loaded version goes on answering.)"""
        names = models if models is not None else tuple(SERVED)
        try:
            live = bool(await self.client.is_server_live(client_timeout=timeout_s))
        except InferenceServerException:
            live = False
        if not live:
            raise TritonUnavailableError(f"Triton at {self.url} does not answer or is not ready")
        for name in names:
            try:
                ready = await self.client.is_model_ready(name, self._version(name), client_timeout=timeout_s)
            except InferenceServerException as error:
                raise self._translate(error, name) from None
            if not ready:
                version = self._version(name)
                at = f" at version {version}" if version else ""
                raise TritonUnavailableError(f"model {name} is not ready{at} on Triton at {self.url}")

    async def reload(self, models: tuple[str, ...], back_to: int | None = None, timeout_s: float = 300.0) -> None:
        """Have Triton load ``models`` again, in order, each from its config in the repository (a changed version
        policy serves another version): Triton replaces a loaded model without losing its availability. Needs a
        Triton started with ``--model-control-mode=explicit`` (the local one is); ``InferenceError`` names
        Triton's refusal otherwise. When one model fails to load, the ones already loaded again are loaded once
        more at version ``back_to`` (their loaded config with that version policy), so Triton does not serve
        a mix of two version sets."""
        done: list[str] = []
        for name in models:
            try:
                await self.client.load_model(name, client_timeout=timeout_s)
            except InferenceServerException as error:
                if back_to is not None:
                    await self._load_at(done, back_to, timeout_s)
                if error.status() == str(grpc.StatusCode.UNAVAILABLE):
                    raise TritonUnavailableError(f"Triton at {self.url} does not answer (loading {name})") from None
                raise InferenceError(f"Triton at {self.url} did not load {name}: {error.message()}") from None
            done.append(name)

    async def _load_at(self, models: list[str], version: int, timeout_s: float) -> None:
        for name in models:
            config = await self.client.get_model_config(name, as_json=True, client_timeout=timeout_s)
            config = config.get("config", config)
            if "ensemble_scheduling" not in config:
                config["version_policy"] = {"specific": {"versions": [str(version)]}}
            await self.client.load_model(name, config=json.dumps(config), client_timeout=timeout_s)

    async def ready_versions(self, timeout_s: float = 5.0) -> dict[str, set[int]]:
        """The versions of each model Triton has READY (its repository index)."""
        try:
            index = await self.client.get_model_repository_index(client_timeout=timeout_s)
        except InferenceServerException as error:
            raise TritonUnavailableError(f"Triton at {self.url} does not answer ({error.message()})") from None
        out: dict[str, set[int]] = {}
        for model in index.models:
            if model.state == "READY" and model.version.isdigit():
                out.setdefault(model.name, set()).add(int(model.version))
        return out

    async def wait_versions(self, models: tuple[str, ...], version: int, timeout_s: float = 60.0) -> list[str]:
        """Wait until each of ``models`` has ``version`` ready and no other (after a reload, Triton unloads the
        version it replaces a moment after the new one is ready, and until then answers with the highest). The
        models that did not get there within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            ready = await self.ready_versions()
            behind = [name for name in models if ready.get(name) != {version}]
            if not behind or time.monotonic() > deadline:
                return behind
            await asyncio.sleep(0.1)

    async def infer(
        self, model: str | ModelSpec, inputs: dict[str, np.ndarray], *, deadline_s: float | None = None
    ) -> dict[str, np.ndarray]:
        """Run ``model`` on ``inputs`` (named as in the spec, batch axis first for batching models) and return
        its outputs by name. ``deadline_s`` is the time left for the whole call, in seconds."""
        spec = SERVED[model] if isinstance(model, str) else model
        check_inputs(spec, inputs)
        deadline = time.monotonic() + (deadline_s if deadline_s is not None else self.timeout_s)
        if spec.max_batch_size == 0:
            return await self._infer_once(spec, inputs, deadline)
        size = len(next(iter(inputs.values())))
        step = spec.max_batch_size
        parts = [{k: v[i : i + step] for k, v in inputs.items()} for i in range(0, size, step)]
        results = await asyncio.gather(*(self._infer_once(spec, p, deadline) for p in parts))
        if len(results) == 1:
            return results[0]
        return {t.name: np.concatenate([r[t.name] for r in results]) for t in spec.outputs}

    async def _infer_once(self, spec: ModelSpec, inputs: dict[str, np.ndarray], deadline: float) -> dict:
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceededError(f"the deadline passed before {spec.name} was called")
        request = []
        for t in spec.inputs:
            value = np.ascontiguousarray(inputs[t.name])
            tensor = InferInput(t.name, list(value.shape), t.dtype.value)
            tensor.set_data_from_numpy(value)
            request.append(tensor)
        outputs = [InferRequestedOutput(t.name) for t in spec.outputs]
        start = time.perf_counter()
        try:
            result = await self.client.infer(
                spec.name, request, self._version(spec.name), outputs=outputs, client_timeout=left
            )
        except InferenceServerException as error:
            raise self._translate(error, spec.name) from None
        finally:
            if self.observer is not None:
                self.observer(spec.name, time.perf_counter() - start)
        answer = {t.name: result.as_numpy(t.name) for t in spec.outputs}
        check_outputs(spec, inputs, answer)
        return answer

    def _translate(self, error: InferenceServerException, model: str) -> Exception:
        status = error.status() or ""
        message = error.message() or ""
        if status == str(grpc.StatusCode.DEADLINE_EXCEEDED):
            return DeadlineExceededError(f"{model}: the deadline passed while Triton was working")
        if status == str(grpc.StatusCode.UNAVAILABLE):
            return TritonUnavailableError(f"Triton at {self.url} does not answer ({model})")
        if "unknown model" in message or "is not ready" in message or "is not found" in message:
            return TritonUnavailableError(f"model {model} is not ready on Triton at {self.url}")
        if "Stub process" in message and "is not healthy" in message:
            return TritonUnavailableError(f"model {model} is not available on Triton at {self.url}: its process died")
        return InferenceError(f"{model}: Triton answered {status or 'an error'}: {message.splitlines()[0]}")


def _expected_shape(spec: ModelSpec, shape: tuple[int, ...]) -> tuple[int, ...]:
    return (-1, *shape) if spec.max_batch_size > 0 else shape


def _matches(want: tuple[int, ...], got: tuple[int, ...]) -> bool:
    return len(want) == len(got) and all(w in (-1, g) for w, g in zip(want, got, strict=True))


def check_inputs(spec: ModelSpec, inputs: dict[str, np.ndarray]) -> None:
    names = {t.name for t in spec.inputs}
    if set(inputs) != names:
        raise InferenceError(f"{spec.name} takes inputs {sorted(names)}, not {sorted(inputs)}")
    batch = set()
    for t in spec.inputs:
        value = inputs[t.name]
        if value.dtype != np.dtype(t.dtype.numpy):
            raise InferenceError(f"{spec.name}.{t.name} must be {t.dtype.numpy}, not {value.dtype}")
        if not _matches(_expected_shape(spec, t.shape), value.shape) or 0 in value.shape:
            raise InferenceError(f"{spec.name}.{t.name} has shape {value.shape}; the spec says {t.shape}")
        if spec.max_batch_size > 0:
            batch.add(value.shape[0])
    if len(batch) > 1:
        raise InferenceError(f"{spec.name}: inputs disagree on the batch size ({sorted(batch)})")


def check_outputs(spec: ModelSpec, inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> None:
    for t in spec.outputs:
        value = outputs[t.name]
        if value is None or value.size == 0:
            raise InferenceError(f"{spec.name}.{t.name}: Triton returned an empty tensor")
        if value.dtype != np.dtype(t.dtype.numpy) or not _matches(_expected_shape(spec, t.shape), value.shape):
            raise InferenceError(f"{spec.name}.{t.name}: Triton returned {value.dtype} {value.shape}")
        if spec.max_batch_size > 0 and value.shape[0] != len(next(iter(inputs.values()))):
            raise InferenceError(f"{spec.name}.{t.name}: {value.shape[0]} results for a different batch size")
