"""Lesions in a segmentation: the tumor mask they are measured on, connected components, the small specks
that are not lesions, each lesion's measurements (level, diameter, volume, box) in patient millimetres, the
findings above C2 that are told, not counted, and the inputs that embed and classify the lesions on Triton."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from cspine.analysis.levels import SpineFrame
from cspine.analysis.masks import component_sizes, component_voxels, components
from cspine.domain import Lesion, Modality, Notice, NoticeCode, SeriesRole, Volume
from cspine.imaging.roi import lesion_roi, modality_one_hot
from cspine.imaging.seg_input import SegGrid
from cspine.inference.specs import MODALITY_TENSOR, PROTOTYPES_TENSOR, ROI_TENSOR, SEG_LABELS
from cspine.shapes import feret

MIN_LESION_MM3 = 50.0  # smaller components are noise, not lesions (a 4.6 mm sphere)


def remove_small_lesions(mask: np.ndarray, voxel_mm3: float, min_mm3: float = MIN_LESION_MM3) -> np.ndarray:
    """The mask without components smaller than ``min_mm3`` (for a 2D radiograph, pass mm² per pixel and
    an area)."""
    if not mask.any():
        return mask
    labels, count = components(mask)
    sizes = component_sizes(labels, count) * voxel_mm3
    keep = np.zeros(count + 1, dtype=bool)
    keep[1:] = sizes >= min_mm3
    return keep[labels]


MIN_LESION_MM2 = 20.0  # on a radiograph (a projection), by area


def clean_tumor_labels(
    labels: np.ndarray, tumor: int, spacing_mm: tuple[float, float, float], projection: bool
) -> np.ndarray:
    """Label map [K, R, C] with tumor specks below the minimum lesion size set to background."""
    mask = labels == tumor
    if projection:
        kept = remove_small_lesions(mask[0], spacing_mm[1] * spacing_mm[2], MIN_LESION_MM2)[None]
    else:
        kept = remove_small_lesions(mask, float(np.prod(spacing_mm)), MIN_LESION_MM3)
    out = labels.copy()
    out[mask & ~kept] = 0
    return out


def clean_grid_labels(modality: Modality, labels: np.ndarray, grid: SegGrid, volume: Volume) -> np.ndarray:
    """A segmentation model's labels on its grid without tumor specks too small to be lesions (sizes in mm on
    the model grid)."""
    tumor = SEG_LABELS[modality].index("tumor")
    return clean_tumor_labels(labels, tumor, grid.volume(volume, labels).spacing, volume.projection)


def tumor_mask(
    modality: Modality, label_maps: Mapping[SeriesRole, np.ndarray], volumes: Mapping[SeriesRole, Volume]
) -> np.ndarray:
    """The tumor mask lesions are measured on: the first role's, joined with the other MR contrast's when
    both lie on the same grid (a lesion bright on T2 may be faint on T1 and the other way round)."""
    tumor = SEG_LABELS[modality].index("tumor")
    roles = list(label_maps)
    mask = label_maps[roles[0]] == tumor
    for role in roles[1:]:
        if same_grid(volumes[roles[0]], volumes[role]):
            mask = mask | (label_maps[role] == tumor)
    return mask


def same_grid(a: Volume, b: Volume) -> bool:
    """Whether two volumes lie on one voxel grid (MR T1 and T2 of one acquisition plan usually do)."""
    return (
        a.shape == b.shape
        and np.allclose(a.origin, b.origin, atol=0.01)
        and np.allclose(a.row_direction, b.row_direction, atol=1e-4)
        and np.allclose(a.column_direction, b.column_direction, atol=1e-4)
        and np.allclose(a.pixel_spacing, b.pixel_spacing, atol=1e-4)
        and np.allclose(a.slice_offsets, b.slice_offsets, atol=0.01)
    )


def _voxel_edges(volume: Volume) -> np.ndarray:
    """(3, 3) edge vectors (mm) of one voxel; a radiograph's pixels have no depth."""
    return np.stack(
        [
            volume.slice_direction * (0.0 if volume.projection else volume.slice_spacing),
            volume.column_direction * volume.pixel_spacing[0],
            volume.row_direction * volume.pixel_spacing[1],
        ]
    )


def voxel_extent(volume: Volume, direction: np.ndarray) -> float:
    """Length (mm) of one voxel of ``volume`` along a unit ``direction``: what the distance between voxel
    centres misses at the two ends of a diameter."""
    return float(np.abs(_voxel_edges(volume) @ direction).sum())


def _point_mm(point: np.ndarray) -> tuple[float, float, float]:
    """A point in patient mm, rounded to 0.01 mm."""
    x, y, z = (round(float(v), 2) for v in point)
    return x, y, z


def measure_lesions(mask: np.ndarray, volume: Volume, frame: SpineFrame | None, series_uid: str) -> list[Lesion]:
    """Every connected lesion of a cleaned tumor mask [K, R, C] on ``volume``'s grid, largest first: level,
    Feret diameter, volume (area on a radiograph), centre and box, in patient mm."""
    if not mask.any():
        return []
    labels, _ = components(mask[0] if volume.projection else mask)
    if volume.projection:
        labels = labels[None]
    half = 0.5 * np.abs(_voxel_edges(volume)).sum(axis=0)
    voxel_mm3 = volume.slice_spacing * volume.pixel_spacing[0] * volume.pixel_spacing[1]
    pixel_mm2 = volume.pixel_spacing[0] * volume.pixel_spacing[1]
    lesions = []
    for kij in component_voxels(labels):
        points = volume.index_to_patient(kij)
        diameter, direction = feret(points)
        level, levels = frame.levels_of(points) if frame is not None else ("unknown", ())
        lesions.append(
            Lesion(
                vertebral_level=level,
                levels=levels,
                max_diameter_mm=round(diameter + voxel_extent(volume, direction), 2),
                volume_ml=None if volume.projection else round(len(kij) * voxel_mm3 / 1000.0, 3),
                area_mm2=round(len(kij) * pixel_mm2, 1) if volume.projection else None,
                centre_mm=_point_mm(points.mean(axis=0)),
                bbox_min_mm=_point_mm(points.min(axis=0) - half),
                bbox_max_mm=_point_mm(points.max(axis=0) + half),
                series_instance_uid=series_uid,
            )
        )
    lesions.sort(key=lambda lesion: -(lesion.volume_ml if lesion.volume_ml is not None else lesion.area_mm2 or 0.0))
    return lesions


# Lesion centres of C2 lie up to about 15 mm above the C2–C3 disc (its body is 15–18 mm tall). Above C2's
# body lie the dens, C1 and the skull base, which the models never saw a lesion in; there, and at the top
# edge of a CT's field of view, they mark false lesions. Such findings are reported as notices instead.
ABOVE_C2_MM = 22.0


def split_above_c2(lesions: list[Lesion], frame: SpineFrame | None) -> tuple[list[Lesion], list[Lesion]]:
    """(lesions within C2–T1, findings centred above C2's body)."""
    if frame is None or frame.top != "C2":
        return lesions, []
    inside = [les for les in lesions if frame.height_above_top(np.array(les.centre_mm)) <= ABOVE_C2_MM]
    return inside, [les for les in lesions if les not in inside]


def above_c2_notices(modality: Modality, above: list[Lesion], series_uid: str) -> list[Notice]:
    """One notice per finding above C2's body, which is not counted as a lesion."""
    return [
        Notice(
            NoticeCode.OUTSIDE_ANALYSED_LEVELS,
            f"{modality.value}: a finding of {lesion.max_diameter_mm:.0f} mm above the C2 body (dens, C1 or skull "
            "base) was not counted: cspine analyses C2 to T1",
            series_uid,
        )
        for lesion in above
    ]


def find_lesions(
    modality: Modality,
    label_maps: Mapping[SeriesRole, np.ndarray],
    volumes: Mapping[SeriesRole, Volume],
    frame: SpineFrame | None,
    series_uid: str,
) -> tuple[list[Lesion], list[Notice]]:
    """A modality's lesions within C2–T1, largest first, measured on its first role's grid (``tumor_mask``),
    and a notice per finding above C2's body."""
    first = next(iter(label_maps))
    lesions = measure_lesions(tumor_mask(modality, label_maps, volumes), volumes[first], frame, series_uid)
    lesions, above = split_above_c2(lesions, frame)
    return lesions, above_c2_notices(modality, above, series_uid)


def classify_inputs(
    modality: Modality, lesions: Sequence[Lesion], volumes: Mapping[SeriesRole, Volume], prototypes: np.ndarray | None
) -> dict[str, np.ndarray]:
    """The inputs of one ``lesion_classify`` call for ``lesions``: each one's ROI about its centre on the
    modality's ``volumes``, the modality one-hot, and the modality's class ``prototypes`` (None: no prototypes,
    the inputs of ``lesion_embed``)."""
    rois = np.stack([lesion_roi(modality, volumes, np.array(lesion.centre_mm)) for lesion in lesions])
    onehot = np.tile(modality_one_hot(modality), (len(lesions), 1))
    inputs = {ROI_TENSOR: rois.astype(np.float32), MODALITY_TENSOR: onehot}
    if prototypes is not None:
        inputs[PROTOTYPES_TENSOR] = prototypes
    return inputs
