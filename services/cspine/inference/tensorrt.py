"""The ``trtexec`` commands that build each model's TensorRT engine (``N/model.plan``, for each version set N the
repository holds) from its ``N/model.onnx`` on the GPU it will run on — engines are specific to the GPU and
TensorRT version, so they are built where they run (the Helm chart's init container, from the same Triton
image). Shapes come from ``inference.specs``; the optimisation profile spans batch 1 … ``max_batch_size`` and is
tuned for the largest preferred batch size of the model's ``configs/gpu.pbtxt``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from cspine.inference.specs import (
    EMBEDDING_TENSOR,
    MAX_EMBEDDINGS,
    MAX_PROTOTYPES,
    MODELS,
    PROTOTYPES_TENSOR,
    ModelSpec,
)

# Per dynamic axis of a model without a batch axis (proto_classify): (opt, max) of each input's first axis.
_UNBATCHED = {EMBEDDING_TENSOR: (8, MAX_EMBEDDINGS), PROTOTYPES_TENSOR: (3, MAX_PROTOTYPES)}


@dataclass(frozen=True)
class Profile:
    minimum: dict[str, tuple[int, ...]]
    optimum: dict[str, tuple[int, ...]]
    maximum: dict[str, tuple[int, ...]]


def profile(spec: ModelSpec, opt_batch: int) -> Profile:
    lo, opt, hi = {}, {}, {}
    for t in spec.inputs:
        if spec.max_batch_size > 0:
            lo[t.name], opt[t.name], hi[t.name] = ((b, *t.shape) for b in (1, opt_batch, spec.max_batch_size))
        else:
            o, m = _UNBATCHED[t.name]
            lo[t.name], opt[t.name], hi[t.name] = (tuple(v if d == -1 else d for d in t.shape) for v in (1, o, m))
    return Profile(lo, opt, hi)


def _shapes(shapes: dict[str, tuple[int, ...]]) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims)}" for name, dims in shapes.items())


def plan_command(
    spec: ModelSpec, repository: str, opt_batch: int, version: int = 1, workspace_mib: int = 2048
) -> list[str]:
    folder = f"{repository.rstrip('/')}/{spec.name}/{version}"
    p = profile(spec, opt_batch)
    return [
        "trtexec",
        f"--onnx={folder}/model.onnx",
        f"--saveEngine={folder}/model.plan",
        "--fp16",
        f"--minShapes={_shapes(p.minimum)}",
        f"--optShapes={_shapes(p.optimum)}",
        f"--maxShapes={_shapes(p.maximum)}",
        f"--memPoolSize=workspace:{workspace_mib}M",
        "--skipInference",
    ]


def plan_commands(repository: str, opt_batches: dict[str, int], versions: tuple[int, ...] = (1,)) -> list[list[str]]:
    """One command per model and version set; ``opt_batches`` maps batching models to the batch size to optimise
    for."""
    return [
        plan_command(spec, repository, opt_batches.get(name, 1), version)
        for version in versions
        for name, spec in MODELS.items()
    ]


def format_commands(commands: list[list[str]]) -> str:
    return "\n".join(shlex.join(c) for c in commands)
