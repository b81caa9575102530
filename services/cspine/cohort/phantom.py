"""A written SYNTHETIC phantom cohort's ground truth in the labelled-cohort format (docs/cohort.md), as a site's
annotation tools would give it (``cspine phantom --labels dicom``): per case one DICOM SEG per image series cspine
analyses and ``boxes.json`` with each lesion's box per series; the cohort's ``manifest.csv``.

The SEGs are made on the series as ingest reads them back from the written files (so they reference the real
instances and geometry), with the codes cspine writes in its own SEG: vertebral bodies one per vertebra (Anatomic
Region C2 … T1), posterior elements, discs, CSF, cord, OPLL and tumor.
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from cspine.client.files import is_part10, iter_files
from cspine.cohort.labels import BOXES_FILE
from cspine.cohort.manifest import MANIFEST_FILE, ManifestRow, write_manifest
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.outputs import SegKind, label_map_seg
from cspine.dicom.selection import select_series
from cspine.domain import Series, SeriesRole, Volume
from cspine.phantom.anatomy import LEVELS, Label

LABELS_FOLDER = "labels"  # a case's SEG files: labels/<role>.dcm
PHANTOM_SEG = SegKind(
    series_number=801,
    series_description="SYNTHETIC phantom ground truth labels (cspine phantom)",
    content_label="TRUTH",
    algorithm="cspine phantom",
)
BODY_LEVELS = ("C2", "C3", "C4", "C5", "C6", "C7", "T1")
NAMES = (
    "background",
    "vertebral_body",  # a body at a level without a code of its own
    *(f"{level.lower()}_body" for level in BODY_LEVELS),
    "posterior_elements",
    "disc",
    "csf",
    "cord",
    "opll",
    "tumor",
)
_STRUCTURE_NAME = {
    Label.POSTERIOR_ELEMENTS: "posterior_elements",
    Label.DISC: "disc",
    Label.CSF: "csf",
    Label.CORD: "cord",
    Label.OPLL: "opll",
    Label.TUMOR: "tumor",
}
_NPZ_KEY = {SeriesRole.CT: "ct", SeriesRole.MR_T1: "mr", SeriesRole.MR_T2: "mr", SeriesRole.XR: "xr"}
# Every fourth case is held out (the manifest's split): cases 4, 8, 12 … are "test".
TEST_EVERY = 4


def ground_truth_map(structure: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """The phantom's structure and level maps as one label map in ``NAMES``."""
    out = np.zeros(structure.shape, dtype=np.uint8)
    body = structure == Label.VERTEBRAL_BODY
    out[body] = NAMES.index("vertebral_body")
    for level in BODY_LEVELS:
        out[body & (levels == LEVELS.index(level) + 1)] = NAMES.index(f"{level.lower()}_body")
    for label, name in _STRUCTURE_NAME.items():
        out[structure == label] = NAMES.index(name)
    return out


def _corner_mm(volume: Volume, index: tuple[int, int, int]) -> list[float]:
    k, r, c = index
    point = (
        volume.slice_positions()[k]
        + c * volume.pixel_spacing[1] * volume.row_direction
        + r * volume.pixel_spacing[0] * volume.column_direction
    )
    return [round(float(v), 3) for v in point]


def _boxes(series: Series, tumor: np.ndarray) -> list[dict]:
    """One box per connected lesion of a series' tumor mask, in the boxes.json format."""
    volume = series.volume
    assert volume is not None
    components, _ = ndimage.label(tumor, structure=np.ones((3, 3, 3)))
    out = []
    for box in ndimage.find_objects(components):
        if box is None:
            continue
        first = tuple(s.start for s in box)
        last = tuple(s.stop - 1 for s in box)
        item: dict = {"series_instance_uid": series.series_instance_uid, "structure": "tumor"}
        if volume.projection:
            item["corners_px"] = [[first[2], first[1]], [last[2], last[1]]]
        else:
            item["corners_mm"] = [_corner_mm(volume, first), _corner_mm(volume, last)]  # type: ignore[arg-type]
        out.append(item)
    return out


def write_dicom_labels(case_dir: Path) -> None:
    """Write ``case_dir``'s labels (from its labels.npz) as SEG files and boxes.json."""
    images = [p for p in iter_files([case_dir]) if is_part10(p) and LABELS_FOLDER not in p.relative_to(case_dir).parts]
    study = ingest_paths(images)
    chosen = select_series(study).chosen
    with np.load(case_dir / "labels.npz") as npz:
        truth = {k: npz[k] for k in npz.files}
    folder = case_dir / LABELS_FOLDER
    folder.mkdir(exist_ok=True)
    boxes: list[dict] = []
    for role, series in sorted(chosen.items(), key=lambda item: item[0].value):
        key = _NPZ_KEY[role]
        structure, levels = truth[f"{key}_labels"], truth[f"{key}_levels"]
        if structure.ndim == 2:
            structure, levels = structure[None], levels[None]
        labels = ground_truth_map(structure, levels)
        seg, _ = label_map_seg(
            series,
            NAMES,
            labels,
            (study.study_instance_uid, series.series_instance_uid, "phantom labels"),
            PHANTOM_SEG,
            f"SYNTHETIC ground truth of the {role.value} series",
        )
        seg.save_as(folder / f"{role.value}.dcm", enforce_file_format=True)
        boxes.extend(_boxes(series, structure == Label.TUMOR))
    (case_dir / BOXES_FILE).write_text(
        json.dumps({"synthetic": True, "note": "SYNTHETIC phantom ground truth", "boxes": boxes}, indent=1) + "\n"
    )


def manifest_row(index: int, case_id: str, lesion: dict | None, cobb_deg: float) -> ManifestRow:
    """A phantom case's manifest row: its truth's class, subtype, level and Cobb angle; every fourth case held
    out."""
    return ManifestRow(
        study=case_id,
        tumor_class=lesion["class"] if lesion else "none",
        subtype=lesion["subtype"] if lesion else "",
        level=lesion["primary_level"] if lesion else "",
        reference="SYNTHETIC phantom truth.json",
        split="test" if (index + 1) % TEST_EVERY == 0 else "train",
        cobb_deg=f"{cobb_deg:.2f}",
    )


def write_cohort_labels(out: Path, truths: list[dict], workers: int = 1) -> None:
    """Write the labels of every case of a phantom cohort just generated in ``out`` (``truths`` as
    ``generate_cohort`` returned them), then its manifest."""
    folders = [out / t["case_id"] for t in truths]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(write_dicom_labels, folders))
    else:
        for folder in folders:
            write_dicom_labels(folder)
    write_manifest(
        out / MANIFEST_FILE,
        [manifest_row(t["case_index"], t["case_id"], t["tumor"], t["cobb_angle_c2_c7_deg"]) for t in truths],
    )
