"""Configuration as frozen dataclasses, built once in ``main()`` from flags and ``CSPINE_`` environment.

Nothing here reads the environment at import time: ``from_env`` is called explicitly.
Precedence, highest first: command-line flag, ``CSPINE_*`` environment variable, default.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class IngestLimits:
    """Bounds on one uploaded study, enforced by ingest before any pixel data is decoded."""

    max_instances: int = 5000
    max_study_bytes: int = 4096 * MiB
    # Decoded bytes of one frame (rows × columns × samples × bits/8). 64 MiB holds a 4096² 32-bit frame.
    max_frame_bytes: int = 64 * MiB
    # Voxels of all volumes of a study together; each voxel is held as float32 (4 bytes). A frame counts as at
    # least 64 × 64 voxels, which also bounds what ingest holds per frame (~0.7 KiB) whatever its size.
    max_study_voxels: int = 400_000_000
    # Bytes the analysis allocates for the chosen series, planned on the model grids before any of it is
    # allocated (cspine/budget.py): a 600-slice 512² CT of 2 mm slices plans 1.9 GB, of 0.5 mm slices 1.0 GB.
    max_study_model_bytes: int = 3072 * MiB

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"IngestLimits.{f.name} must be a positive integer, got {value!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, prefix: str = "CSPINE_") -> IngestLimits:
        """Read ``CSPINE_MAX_INSTANCES``, ``CSPINE_MAX_STUDY_BYTES``, ``CSPINE_MAX_FRAME_BYTES``,
        ``CSPINE_MAX_STUDY_VOXELS``, ``CSPINE_MAX_STUDY_MODEL_BYTES``; unset variables keep their defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(prefix + f.name.upper())
            if raw is not None:
                try:
                    values[f.name] = int(raw)
                except ValueError:
                    raise ValueError(f"{prefix}{f.name.upper()} must be an integer, got {raw!r}") from None
        return cls(**values)
