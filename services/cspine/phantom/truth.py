"""Ground truth of a SYNTHETIC case, computed from the geometry (never from a modality's label maps).

Areas come from the exact shapes sampled at 0.1 mm on the plane through each body's centre,
perpendicular to the vertebra's axis; lesion volume, diameter and centre from the exact shapes sampled on
a fine lattice; disc heights, the Cobb angle and OPLL from the model's parameters.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cspine.domain import MEASURED_LEVELS
from cspine.phantom.anatomy import LEVELS, Label, Spine
from cspine.phantom.geometry import Canvas, Grid, PointCloud
from cspine.phantom.scanner import Scene
from cspine.shapes import feret_diameter

AREA_STEP_MM = 0.1
LESION_POINTS = 1_500_000  # budget of the lesion lattice: ~0.3 mm for one lesion, coarser for several
LEVEL_SHARE = 0.1  # a lesion "involves" a level holding at least this share of its volume
MIN_COMPONENT_ML = 0.02  # smaller islands of a rough margin count in the volume, not as components


def canal_section(scene: Scene, name: str) -> dict:
    """Canal and cord cross-section of one level on the plane through the body centre (mm, mm²)."""
    v = scene.spine.by_name[name]
    lr, ap, vc = v.canal_lr / 2 + 2.0, v.canal_ap / 2 + 2.0, v.canal_centre_v
    us = np.arange(-lr, lr + 1e-9, AREA_STEP_MM)
    vs = np.arange(vc - ap, vc + ap + 1e-9, AREA_STEP_MM)
    uu, vv = np.meshgrid(us, vs, indexing="ij")
    points = v.centre + uu[..., None] * v.frame[:, 0] + vv[..., None] * v.frame[:, 1]
    canvas = Canvas(PointCloud(points[None]))
    scene.paint(canvas)
    label = canvas.label[0]
    canal = np.isin(label, (Label.CSF, Label.CORD))
    cord = label == Label.CORD
    pixel = AREA_STEP_MM**2
    result = {
        "canal_area_mm2": round(float(canal.sum() * pixel), 2),
        "cord_area_mm2": round(float(cord.sum() * pixel), 2),
    }
    if cord.any():
        cu, cv = np.nonzero(cord)
        lr_mm = (cu.max() - cu.min() + 1) * AREA_STEP_MM
        ap_mm = (cv.max() - cv.min() + 1) * AREA_STEP_MM
        result["cord_compression_ratio"] = round(float(ap_mm / lr_mm), 3)
    else:
        result["cord_compression_ratio"] = 0.0
    return result


def _rounded(values: np.ndarray, digits: int = 3) -> list[float]:
    return [round(float(x), digits) for x in values]


def spine_truth(scene: Scene) -> dict:
    spine = scene.spine
    discs = {d.upper.name: d for d in spine.discs}
    levels = {}
    for name in MEASURED_LEVELS:
        v = spine.by_name[name]
        disc = discs[name]
        levels[name] = {
            **canal_section(scene, name),
            "canal_ap_mm": round(v.canal_ap, 2),
            "disc": disc.name,
            "disc_height_mm": round(disc.height, 2),
            "disc_degeneration": round(disc.degeneration, 2),
            "body_height_mm": round(2 * float(v.half[2]), 2),
            # Geometry for checking measurements: centres and superior-pointing unit axes (patient mm).
            "body_centre_mm": _rounded(v.centre),
            "body_axis": _rounded(v.w, 5),
            "disc_centre_mm": _rounded(disc.centre),
            "disc_axis": _rounded(disc.frame[:, 2], 5),
        }
    return {
        "cobb_angle_c2_c7_deg": round(spine.cobb_c2_c7(), 2),
        "alignment": spine.alignment.value,
        "levels": levels,
        "opll": opll_truth(spine),
    }


def opll_truth(spine: Spine) -> dict:
    if spine.opll is None:
        return {"present": False, "levels": [], "max_thickness_mm": 0.0, "occupying_ratio": 0.0, "type": None}
    name, thickness = spine.opll.max_thickness()
    return {
        "present": True,
        "levels": list(spine.opll.levels),
        "max_thickness_mm": round(thickness, 2),
        # Occupying ratio: OPLL thickness over the bony canal's AP diameter at the same level.
        "occupying_ratio": round(thickness / spine.by_name[name].canal_ap, 3),
        "type": "continuous" if spine.opll.continuous else "segmental",
    }


def tumor_truth(scene: Scene) -> dict | None:
    """Lesion truth; None without a tumor, or when the lesion's shapes cover no tissue they may grow in."""
    tumor = scene.tumor
    if tumor is None:
        return None
    lo, hi = tumor.box()
    lo, hi = lo - 1.0, hi + 1.0
    step = max(0.3, float(np.prod(hi - lo) / LESION_POINTS) ** (1 / 3))
    shape = tuple(int(np.ceil(e / step)) + 1 for e in (hi - lo))
    grid = Grid(lo, np.eye(3) * step, shape)  # type: ignore[arg-type]
    canvas = Canvas(grid)
    scene.paint(canvas)
    mask = canvas.label == Label.TUMOR
    voxel_ml = step**3 / 1000.0
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count == 0:
        return None
    spine = scene.spine
    parts = []
    for index in range(1, count + 1):
        idx = np.argwhere(components == index)
        pts = lo + idx * step
        slabs = spine.slab_index(pts.astype(np.float32))
        share = np.bincount(slabs, minlength=len(LEVELS)) / len(slabs)
        # The hull of voxel centres misses half a voxel at each end of the diameter.
        parts.append(
            {
                "level": LEVELS[int(np.argmax(share))],
                "levels": [LEVELS[i] for i in np.nonzero(share >= LEVEL_SHARE)[0]],
                "volume_ml": round(float(len(idx) * voxel_ml), 3),
                "max_diameter_mm": round(feret_diameter(pts) + step, 2),
                "centre_mm": _rounded(pts.mean(axis=0), 2),
            }
        )
    parts.sort(key=lambda p: -p["volume_ml"])
    total_ml = sum(p["volume_ml"] for p in parts)
    fragments = [p for p in parts[1:] if p["volume_ml"] < MIN_COMPONENT_ML]
    parts = [p for p in parts if p not in fragments]
    main = parts[0]
    levels = sorted({lv for p in parts for lv in p["levels"]}, key=LEVELS.index)
    return {
        "subtype": tumor.subtype.value,
        "class": tumor.tumor_class.value,
        "primary_level": main["level"],
        "levels": levels,
        "max_diameter_mm": main["max_diameter_mm"],
        "volume_ml": round(total_ml, 3),
        "centre_mm": main["centre_mm"],
        "components": parts,
        "minor_fragments": len(fragments),
        "site": tumor.spec.site.value,
        "growth": tumor.spec.growth.value,
        "pattern": tumor.spec.pattern.value,
        "epidural_extension": tumor.epidural,
        "prevertebral_extension": tumor.prevertebral,
        "collapse": {k: round(v, 2) for k, v in tumor.collapse.items()},
        "lattice_mm": round(step, 3),
    }
