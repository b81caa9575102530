"""The memory a study's analysis allocates, planned from its chosen series' geometry before any of it is
allocated, and the refusal of a study whose plan exceeds ``IngestLimits.max_study_model_bytes``.

Every series the pipeline analyses is resampled onto its modality's model grid whatever its own matrix, so
the cost follows the model grid's slices, not the source's pixels: a 1 × 1-pixel CT of 1,000 frames 3 mm
apart is 1,000 slices of 160² pixels × 3 context channels. Per series (modalities and the two MR contrasts
are analysed concurrently, so their costs add up):

- per model-grid voxel: the resampled and the normalised slices (4 + 4 bytes), the inputs with their
  context channels (4·C), the copies of the inputs a Triton request holds while in flight (at most 4 × 4·C:
  the tensor's bytes, the protobuf message, its serialisation, gRPC's buffer; 3.3 × measured), and the
  label maps, component labels and float masks the measurements make (16): 84 bytes for CT, 44 for MR and
  radiographs;
- per source voxel within the model grid's reach: the float32 copy slab and block means make (4);
- the DICOM SEG, made of one series once the analyses are done (so the larger of the two counts): per
  source voxel the label map on the source grid, its renumbered copy and highdicom's frames (6), and per
  SEG frame (at most one per source frame and segment) its functional-group items (8 KiB; 7.4 measured).

The figures are upper bounds of what `cspine serve` and tracemalloc measured on the 2-core reference
machine: a 1 × 1-pixel CT of 1,000 frames 3 mm apart is planned at 2.15 GB and raised the gateway's peak
RSS by 1.54 GB; the phantom study (CT, two MR, radiograph, SEG) is planned at 235 MB and took 151 MB; a
600-slice 512² CT is planned at 0.97 GB on 2 mm slabs of 0.5 mm slices, 1.86 GB with 2 mm slices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from cspine.domain import Modality, Series, SeriesRole
from cspine.errors import StudyTooLargeError
from cspine.imaging.seg_input import slab_of
from cspine.inference.specs import SEG_GEOMETRY, SEG_LABELS

FLOAT32 = 4
TRITON_REQUEST_COPIES = 4  # copies of the inputs a Triton request holds while in flight
RESAMPLE_BYTES_PER_VOXEL = 2 * FLOAT32  # the resampled and the normalised slices
MEASURE_BYTES_PER_VOXEL = 16  # label maps (uint8), component labels (int32), float masks of the measurements
SOURCE_BYTES_PER_VOXEL = FLOAT32  # the copy of the source within reach that slab and block means make
SEG_BYTES_PER_SOURCE_VOXEL = 6  # source-grid label map, its renumbered copy, highdicom's frames
SEG_BYTES_PER_FRAME = 8 * 1024  # highdicom's per-frame functional-group items (7.4 KiB measured)


def model_bytes_per_voxel(modality: Modality) -> int:
    """Bytes the analysis allocates per voxel of ``modality``'s model grid (84 for CT, 44 for MR and XR)."""
    inputs = FLOAT32 * SEG_GEOMETRY[modality].channels
    return RESAMPLE_BYTES_PER_VOXEL + inputs * (1 + TRITON_REQUEST_COPIES) + MEASURE_BYTES_PER_VOXEL


@dataclass(frozen=True)
class SeriesPlan:
    """What analysing one chosen series allocates, in bytes."""

    modality: Modality
    name: str  # "CT series 2 (ct)": modality, series number and role, no header text
    slices: int  # on the model grid
    model_bytes: int
    source_bytes: int
    seg_bytes: int  # its DICOM SEG, were it the one written

    @property
    def analysis_bytes(self) -> int:
        return self.model_bytes + self.source_bytes

    def describe(self) -> str:
        g = SEG_GEOMETRY[self.modality]
        return (
            f"{self.name}: {self.slices} model-grid slice(s) of {g.size}×{g.size} × {g.channels} channel(s), "
            f"{self.analysis_bytes} bytes"
        )


def plan_series(role: SeriesRole, series: Series) -> SeriesPlan:
    """The plan of one series with a volume, from its geometry alone (no voxel is read)."""
    modality, volume = role.modality, series.volume
    if volume is None:
        raise ValueError(f"{role.value}: a series without a volume has no plan")
    g = SEG_GEOMETRY[modality]
    k, rows, cols = volume.shape
    slices = -(-k // slab_of(modality, volume))
    # the source pixels the model grid reaches, with the interpolation's margin (seg_input._reach)
    reach = [
        min(count, math.ceil((g.size - 1) * g.spacing_mm / spacing) + 7)
        for count, spacing in zip((rows, cols), volume.pixel_spacing, strict=True)
    ]
    segments = len(SEG_LABELS[modality]) - 1
    number = series.series_number if series.series_number is not None else "?"
    return SeriesPlan(
        modality=modality,
        name=f"{series.dicom_modality or modality.value} series {number} ({role.value})",
        slices=slices,
        model_bytes=slices * g.size * g.size * model_bytes_per_voxel(modality),
        source_bytes=k * reach[0] * reach[1] * SOURCE_BYTES_PER_VOXEL,
        seg_bytes=k * rows * cols * SEG_BYTES_PER_SOURCE_VOXEL + k * segments * SEG_BYTES_PER_FRAME,
    )


@dataclass(frozen=True)
class StudyPlan:
    series: tuple[SeriesPlan, ...]
    seg: bool  # a DICOM SEG is asked for

    @property
    def analysis_bytes(self) -> int:
        return sum(s.analysis_bytes for s in self.series)

    @property
    def seg_bytes(self) -> int:
        return max((s.seg_bytes for s in self.series), default=0) if self.seg else 0

    @property
    def bytes(self) -> int:
        """The planned peak: the series' analyses together, or the one SEG written after them."""
        return max(self.analysis_bytes, self.seg_bytes)

    def check(self, limit: int) -> None:
        """Raise ``StudyTooLargeError`` (→ RESOURCE_EXHAUSTED) naming each series when the plan exceeds ``limit``."""
        if self.bytes <= limit:
            return
        parts = "; ".join(s.describe() for s in self.series)
        if self.seg_bytes > self.analysis_bytes:
            parts += f"; its DICOM SEG {self.seg_bytes} bytes"
        raise StudyTooLargeError(
            f"the study's analysis would allocate {self.bytes} bytes, more than the limit of {limit} "
            f"(max_study_model_bytes): {parts}"
        )


def plan_study(chosen: Mapping[SeriesRole, Series], seg: bool = False) -> StudyPlan:
    """The plan of the chosen series the pipeline analyses (those with a volume)."""
    return StudyPlan(tuple(plan_series(r, s) for r, s in chosen.items() if s.volume is not None), seg)
