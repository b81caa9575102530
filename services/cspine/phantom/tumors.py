"""SYNTHETIC cervical spine tumors: ten subtypes, each benign, borderline or malignant.

Every subtype has its own morphology and location habits (the table ``SUBTYPES``), written after the
textbook picture of its namesake but deliberately overlapping between classes (sizes, margins, patterns),
so that telling the classes apart is not trivial. A lesion is one or more "blobs" (ellipsoids with lobes
and a rough margin) in a vertebra's frame, with an internal pattern (trabeculae, fluid levels, nidus …)
that appears consistently in CT, MR and radiographs because all three sample the same shapes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
from scipy.special import erfinv

from cspine.phantom.anatomy import LEVELS, Label, Spine, Tissue, Vertebra
from cspine.phantom.geometry import Canvas, box_around, local


class TumorClass(str, enum.Enum):
    BENIGN = "benign"
    BORDERLINE = "borderline"
    MALIGNANT = "malignant"


class Site(str, enum.Enum):
    BODY = "body"
    POSTERIOR = "posterior"  # pedicle, lamina, spinous process
    CANAL = "canal"  # intradural–extradural, through the neural foramen


class Growth(str, enum.Enum):
    CONFINED = "confined"  # stays inside the marrow; cortex intact
    EXPANSILE = "expansile"  # bulges the bone, thin eggshell cortex with breaches
    INFILTRATIVE = "infiltrative"  # destroys the cortex, irregular margin, extends into soft tissue
    DISPLACING = "displacing"  # soft-tissue mass that pushes structures aside (canal site)


class Pattern(str, enum.Enum):
    HOMOGENEOUS = "homogeneous"
    HETEROGENEOUS = "heterogeneous"  # necrotic / haemorrhagic patches
    TRABECULAR = "trabecular"  # fat with coarse vertical trabeculae ("polka dots" on axial CT)
    MULTILOCULAR = "multilocular"  # cysts with septa and fluid–fluid levels
    NIDUS = "nidus"  # small lucent nidus with a central dot inside dense sclerosis
    MINERALIZED = "mineralized"  # scattered matrix mineralisation
    CAPPED = "capped"  # bony outgrowth with cortex, marrow and a cartilage cap


class TumorSubtype(str, enum.Enum):
    HEMANGIOMA = "hemangioma"
    OSTEOID_OSTEOMA = "osteoid_osteoma"
    SCHWANNOMA = "schwannoma"
    OSTEOCHONDROMA = "osteochondroma"
    GIANT_CELL_TUMOR = "giant_cell_tumor"
    ANEURYSMAL_BONE_CYST = "aneurysmal_bone_cyst"
    OSTEOBLASTOMA = "osteoblastoma"
    METASTASIS = "metastasis"
    MYELOMA = "myeloma"
    CHORDOMA = "chordoma"


@dataclass(frozen=True)
class SubtypeSpec:
    """How one SYNTHETIC subtype looks and where it grows."""

    tumor_class: TumorClass
    frequency: float  # relative share among tumor cases drawn at random
    site: Site
    levels: dict[str, float]  # relative frequency per level
    diameter_mm: tuple[float, float]  # median and log-sd of the main lesion's diameter
    aspect: tuple[float, float]  # range of the longest / shortest axis ratio
    lobulation: float  # amplitude of lobes (fraction of the radius)
    roughness_mm: float  # amplitude of the irregular (infiltrative) margin
    growth: Growth
    rim_mm: tuple[float, float]  # sclerotic rim / eggshell thickness range; (0, 0) for none
    rim_gaps: float  # fraction of the rim missing: cortical breach
    epidural: float  # probability of an extension into the canal (body lesions; others grow there themselves)
    prevertebral: float  # probability of an anterior soft-tissue mass (body lesions)
    multifocal: float  # probability of further lesions at other levels
    collapse: float  # probability of a pathological collapse of the body
    pattern: Pattern
    edema_mm: tuple[float, float]  # width range of marrow oedema around the lesion
    solid: tuple[float, float, float]  # tumour tissue: CT HU, T1 signal, T2 signal (MR units 0–1000)


_MID = {"C3": 1.0, "C4": 1.0, "C5": 1.0, "C6": 1.0}
_ALL = {"C2": 1.0, "C3": 1.0, "C4": 1.0, "C5": 1.0, "C6": 1.0, "C7": 1.0}
_LOW = {"C3": 0.6, "C4": 0.8, "C5": 1.0, "C6": 1.2, "C7": 1.3, "T1": 0.6}

# fmt: off
SUBTYPES: dict[TumorSubtype, SubtypeSpec] = {
    TumorSubtype.HEMANGIOMA: SubtypeSpec(
        TumorClass.BENIGN, 0.14, Site.BODY, _ALL, (13.0, 0.25), (1.0, 1.4), 0.05, 0.2, Growth.CONFINED,
        (0.0, 0.0), 0.0, 0.0, 0.0, 0.05, 0.0, Pattern.TRABECULAR, (0.0, 0.0), (-30.0, 780.0, 760.0),
    ),
    TumorSubtype.OSTEOID_OSTEOMA: SubtypeSpec(
        TumorClass.BENIGN, 0.08, Site.POSTERIOR, _ALL, (11.0, 0.22), (1.0, 1.3), 0.05, 0.2, Growth.EXPANSILE,
        (1.5, 3.0), 0.0, 0.0, 0.0, 0.0, 0.0, Pattern.NIDUS, (3.0, 7.0), (70.0, 350.0, 600.0),
    ),
    TumorSubtype.SCHWANNOMA: SubtypeSpec(
        TumorClass.BENIGN, 0.10, Site.CANAL, _ALL, (20.0, 0.25), (1.2, 1.8), 0.1, 0.2, Growth.DISPLACING,
        (0.0, 0.0), 0.0, 0.0, 0.0, 0.0, 0.0, Pattern.HETEROGENEOUS, (0.0, 0.0), (38.0, 380.0, 800.0),
    ),
    TumorSubtype.OSTEOCHONDROMA: SubtypeSpec(
        TumorClass.BENIGN, 0.06, Site.POSTERIOR, {"C2": 2.0, **_MID}, (17.0, 0.25), (1.1, 1.6), 0.12, 0.3,
        Growth.EXPANSILE, (1.0, 1.6), 0.0, 0.0, 0.0, 0.0, 0.0, Pattern.CAPPED, (0.0, 0.0), (300.0, 600.0, 380.0),
    ),
    TumorSubtype.GIANT_CELL_TUMOR: SubtypeSpec(
        TumorClass.BORDERLINE, 0.10, Site.BODY, _ALL, (26.0, 0.22), (1.0, 1.4), 0.15, 0.6, Growth.EXPANSILE,
        (0.5, 0.9), 0.35, 0.25, 0.1, 0.0, 0.15, Pattern.HETEROGENEOUS, (0.0, 2.0), (45.0, 330.0, 430.0),
    ),
    TumorSubtype.ANEURYSMAL_BONE_CYST: SubtypeSpec(
        TumorClass.BORDERLINE, 0.08, Site.POSTERIOR, _ALL, (25.0, 0.25), (1.0, 1.5), 0.2, 0.4, Growth.EXPANSILE,
        (0.5, 0.9), 0.2, 0.0, 0.0, 0.0, 0.0, Pattern.MULTILOCULAR, (0.0, 2.0), (30.0, 300.0, 850.0),
    ),
    TumorSubtype.OSTEOBLASTOMA: SubtypeSpec(
        TumorClass.BORDERLINE, 0.07, Site.POSTERIOR, _ALL, (21.0, 0.25), (1.0, 1.5), 0.12, 0.5, Growth.EXPANSILE,
        (0.8, 1.8), 0.15, 0.0, 0.0, 0.0, 0.0, Pattern.MINERALIZED, (3.0, 8.0), (150.0, 320.0, 520.0),
    ),
    TumorSubtype.METASTASIS: SubtypeSpec(
        TumorClass.MALIGNANT, 0.18, Site.BODY, _LOW, (23.0, 0.32), (1.0, 1.6), 0.2, 1.6, Growth.INFILTRATIVE,
        (0.0, 0.0), 0.0, 0.45, 0.2, 0.3, 0.3, Pattern.HETEROGENEOUS, (2.0, 6.0), (45.0, 280.0, 640.0),
    ),
    TumorSubtype.MYELOMA: SubtypeSpec(
        TumorClass.MALIGNANT, 0.10, Site.BODY, {**_ALL, "T1": 0.8}, (18.0, 0.3), (1.0, 1.3), 0.08, 0.5,
        Growth.INFILTRATIVE, (0.0, 0.0), 0.0, 0.25, 0.05, 0.45, 0.3, Pattern.HOMOGENEOUS, (0.0, 3.0),
        (40.0, 250.0, 660.0),
    ),
    TumorSubtype.CHORDOMA: SubtypeSpec(
        TumorClass.MALIGNANT, 0.09, Site.BODY, {"C2": 3.0, "C3": 1.0, "C4": 0.6, "C5": 0.4}, (31.0, 0.22),
        (1.1, 1.6), 0.35, 0.8, Growth.INFILTRATIVE, (0.0, 0.0), 0.0, 0.3, 0.7, 0.0, 0.1, Pattern.MINERALIZED,
        (0.0, 2.0), (28.0, 280.0, 930.0),
    ),
}
# fmt: on

# Tissue values shared by all lesions: (CT HU, T1, T2). TUMOR_SOLID comes from the subtype.
TUMOR_TISSUES = {
    Tissue.TUMOR_RIM: (900.0, 50.0, 40.0),
    Tissue.TUMOR_CYST: (18.0, 170.0, 940.0),
    Tissue.TUMOR_CYST_DEPENDENT: (55.0, 460.0, 360.0),
    Tissue.TUMOR_NIDUS: (80.0, 340.0, 620.0),
    Tissue.TUMOR_MINERAL: (650.0, 60.0, 50.0),
    Tissue.TUMOR_FAT: (-30.0, 780.0, 760.0),
    Tissue.TUMOR_TRABECULA: (650.0, 90.0, 70.0),
    Tissue.TUMOR_NECROSIS: (22.0, 230.0, 900.0),
    Tissue.TUMOR_CARTILAGE: (110.0, 260.0, 930.0),
}

# Where tumours may grow over the anatomy painted before them, by growth style and site.
_BONE_MARROW = (Tissue.CANCELLOUS, Tissue.POSTERIOR_BONE, Tissue.EDEMA)
_GROWS_OVER = {
    Growth.EXPANSILE: (Label.VERTEBRAL_BODY, Label.POSTERIOR_ELEMENTS, Label.SOFT_TISSUE, Label.CSF, Label.TUMOR),
    Growth.INFILTRATIVE: (
        Label.VERTEBRAL_BODY,
        Label.POSTERIOR_ELEMENTS,
        Label.SOFT_TISSUE,
        Label.CSF,
        Label.CORD,
        Label.TUMOR,
    ),
    Growth.DISPLACING: (Label.CSF, Label.CORD, Label.POSTERIOR_ELEMENTS, Label.SOFT_TISSUE, Label.TUMOR),
}


def subtypes_of(tumor_class: TumorClass) -> list[TumorSubtype]:
    return [s for s, spec in SUBTYPES.items() if spec.tumor_class is tumor_class]


def _noise_field(rng: np.random.Generator, period_mm: float, terms: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Random Fourier features: a smooth field of about unit variance defined everywhere in space."""
    directions = rng.normal(size=(terms, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    freqs = directions * (2 * np.pi / period_mm) * rng.uniform(0.7, 1.3, size=(terms, 1))
    return freqs.astype(np.float32), rng.uniform(0, 2 * np.pi, size=terms).astype(np.float32)


def _evaluate(field_: tuple[np.ndarray, np.ndarray], p: np.ndarray) -> np.ndarray:
    freqs, phases = field_
    return np.cos(p @ freqs.T + phases).sum(axis=-1) * np.float32(np.sqrt(2.0 / len(phases)))


@dataclass
class Blob:
    """One ellipsoidal part of a lesion, with lobes and a rough margin, in a host vertebra's frame."""

    centre: np.ndarray
    frame: np.ndarray
    radii: np.ndarray  # (3,) mm along the frame's axes
    lobes: np.ndarray  # (K, 3) unit directions (local)
    lobe_amp: np.ndarray  # (K,)
    roughness_mm: float
    margin_noise: tuple[np.ndarray, np.ndarray]

    @property
    def mean_radius(self) -> float:
        return float(np.mean(self.radii))

    def reach(self) -> np.ndarray:
        return self.radii * (1.0 + float(self.lobe_amp.sum()) + 0.05) + 3.0 * self.roughness_mm + 1.0

    def field(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(s, q): s <= 1 inside the blob's surface, q the local coordinates scaled by the radii."""
        q = local(p, self.centre, self.frame) / self.radii.astype(np.float32)
        rho = np.linalg.norm(q, axis=-1)
        d = q / np.maximum(rho, 1e-6)[..., None]
        bulge = np.clip(d @ self.lobes.T.astype(np.float32), 0, None) ** 3 @ self.lobe_amp.astype(np.float32)
        radius = 1.0 + bulge
        if self.roughness_mm > 0:
            radius = radius + self.roughness_mm / self.mean_radius * _evaluate(self.margin_noise, p)
        return rho / np.maximum(radius, 0.2), q


@dataclass
class Tumor:
    """A placed SYNTHETIC lesion: subtype, blobs and the parameters of its internal pattern."""

    subtype: TumorSubtype
    spec: SubtypeSpec
    level: str  # primary level
    blobs: list[Blob]
    rim_mm: float
    rim_gaps: float
    edema_mm: float
    collapse: dict[str, float]
    solid: tuple[float, float, float]  # CT, T1, T2 after per-case jitter and difficulty blending
    epidural: bool
    prevertebral: bool
    texture: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False, default_factory=dict)
    cells: np.ndarray | None = field(default=None, repr=False)  # multilocular: (K, 3) local seeds
    cell_levels: np.ndarray | None = field(default=None, repr=False)  # fluid level offset per cell (mm)

    @property
    def tumor_class(self) -> TumorClass:
        return self.spec.tumor_class

    def tissue_values(self) -> dict[Tissue, tuple[float, float, float]]:
        return {**TUMOR_TISSUES, Tissue.TUMOR_SOLID: self.solid}

    def box(self) -> tuple[np.ndarray, np.ndarray]:
        boxes = [box_around(b.centre, b.frame, b.reach() + self.edema_mm) for b in self.blobs]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


@dataclass(frozen=True)
class TumorPlan:
    """What is decided about a lesion before the spine exists (its level may collapse the spine)."""

    subtype: TumorSubtype
    spec: SubtypeSpec
    level: str
    collapse: dict[str, float]


def blend_spec(spec: SubtypeSpec, difficulty: float) -> SubtypeSpec:
    """Pull a subtype's distinctive traits toward the average of all subtypes as difficulty rises."""
    if difficulty <= 0:
        return spec
    k = 0.5 * float(np.clip(difficulty, 0.0, 1.0))
    specs = list(SUBTYPES.values())

    def mix(value: float, attr: str) -> float:
        mean = float(np.mean([getattr(s, attr) for s in specs]))
        return (1 - k) * value + k * mean

    median = float(np.exp(np.mean([np.log(s.diameter_mm[0]) for s in specs])))
    diameter = (
        float(np.exp((1 - k) * np.log(spec.diameter_mm[0]) + k * np.log(median))),
        spec.diameter_mm[1] * (1 + k),
    )
    return replace(
        spec,
        diameter_mm=diameter,
        lobulation=mix(spec.lobulation, "lobulation"),
        roughness_mm=mix(spec.roughness_mm, "roughness_mm"),
        epidural=mix(spec.epidural, "epidural"),
        prevertebral=mix(spec.prevertebral, "prevertebral"),
        multifocal=mix(spec.multifocal, "multifocal"),
    )


def plan_tumor(rng: np.random.Generator, subtype: TumorSubtype, difficulty: float) -> TumorPlan:
    spec = blend_spec(SUBTYPES[subtype], difficulty)
    names = list(spec.levels)
    weights = np.array([spec.levels[n] for n in names], dtype=float)
    level = names[rng.choice(len(names), p=weights / weights.sum())]
    collapse = {level: float(rng.uniform(0.5, 0.8))} if rng.random() < spec.collapse else {}
    return TumorPlan(subtype, spec, level, collapse)


def place_tumor(rng: np.random.Generator, plan: TumorPlan, spine: Spine, difficulty: float) -> Tumor:
    """Put the planned lesion (and its extensions and satellites) into the sampled spine."""
    spec = plan.spec
    host = spine.by_name[plan.level]
    diameter = float(np.exp(rng.normal(np.log(spec.diameter_mm[0]), spec.diameter_mm[1])))
    diameter = float(np.clip(diameter, 5.0, 60.0))
    blobs = _main_blobs(rng, spec, spine, host, diameter)
    epidural = spec.site is Site.BODY and rng.random() < spec.epidural
    prevertebral = spec.site is Site.BODY and rng.random() < spec.prevertebral
    if epidural:
        a, b, h = host.half
        blobs.append(
            _blob(
                rng,
                spec,
                host,
                np.array([rng.uniform(-0.25, 0.25) * host.canal_lr, b + 2.0, rng.uniform(-0.3, 0.3) * h]),
                np.array([host.canal_lr * rng.uniform(0.25, 0.4), rng.uniform(2.5, 4.0), h * rng.uniform(0.6, 1.0)]),
            )
        )
    if prevertebral:
        a, b, h = host.half
        blobs.append(
            _blob(
                rng,
                spec,
                host,
                np.array([rng.uniform(-0.2, 0.2) * a, -b - rng.uniform(2.0, 5.0), 0.0]),
                np.array([a * rng.uniform(0.6, 1.0), rng.uniform(4.0, 8.0), h * rng.uniform(0.7, 1.3)]),
            )
        )
    if rng.random() < spec.multifocal:
        others = [n for n in LEVELS[1:] if n != plan.level]
        for name in rng.choice(others, size=int(rng.integers(1, 3)), replace=False):
            other = spine.by_name[str(name)]
            r = diameter / 2 * rng.uniform(0.45, 0.75)
            offset = np.array([rng.uniform(-0.3, 0.3) * other.half[0], rng.uniform(-0.3, 0.2) * other.half[1], 0.0])
            blobs.append(_blob(rng, spec, other, offset, np.full(3, r) * rng.uniform(0.85, 1.15, size=3)))

    jitter = rng.normal(1.0, 0.08, size=3)
    solid = tuple(float(v * j) for v, j in zip(spec.solid, jitter, strict=True))
    host_values = (280.0, 600.0, 380.0) if spec.site is not Site.CANAL else (20.0, 300.0, 700.0)
    k = 0.35 * float(np.clip(difficulty, 0.0, 1.0))
    solid = tuple((1 - k) * s + k * h for s, h in zip(solid, host_values, strict=True))
    tumor = Tumor(
        subtype=plan.subtype,
        spec=spec,
        level=plan.level,
        blobs=blobs,
        rim_mm=float(rng.uniform(*spec.rim_mm)) if spec.rim_mm[1] > 0 else 0.0,
        rim_gaps=spec.rim_gaps,
        edema_mm=float(rng.uniform(*spec.edema_mm)) if spec.edema_mm[1] > 0 else 0.0,
        collapse=dict(plan.collapse),
        solid=solid,  # type: ignore[arg-type]
        epidural=epidural,
        prevertebral=prevertebral,
        texture={
            "patches": _noise_field(rng, 9.0),
            "mineral": _noise_field(rng, 2.6, terms=16),
            "gaps": _noise_field(rng, 7.0),
        },
    )
    if spec.pattern is Pattern.MULTILOCULAR:
        count = int(rng.integers(3, 8))
        seeds = rng.normal(size=(count, 3))
        seeds *= rng.uniform(0.0, 0.75, size=(count, 1)) / np.linalg.norm(seeds, axis=1, keepdims=True)
        tumor.cells = seeds.astype(np.float32)
        tumor.cell_levels = rng.uniform(-0.25, 0.35, size=count).astype(np.float32) * blobs[0].mean_radius
    return tumor


def _blob(rng: np.random.Generator, spec: SubtypeSpec, host: Vertebra, offset: np.ndarray, radii: np.ndarray) -> Blob:
    count = int(rng.integers(2, 6))
    lobes = rng.normal(size=(count, 3))
    lobes /= np.linalg.norm(lobes, axis=1, keepdims=True)
    return Blob(
        centre=host.centre + host.frame @ offset,
        frame=host.frame,
        radii=np.asarray(radii, dtype=float),
        lobes=lobes,
        lobe_amp=rng.uniform(0.0, spec.lobulation, size=count) / np.sqrt(count),
        roughness_mm=float(spec.roughness_mm * rng.uniform(0.6, 1.2)),
        margin_noise=_noise_field(rng, float(rng.uniform(4.0, 8.0))),
    )


def _main_blobs(
    rng: np.random.Generator, spec: SubtypeSpec, spine: Spine, host: Vertebra, diameter: float
) -> list[Blob]:
    a, b, h = host.half
    aspect = rng.uniform(*spec.aspect)
    radii = np.full(3, diameter / 2)
    radii[rng.integers(0, 3)] /= aspect
    radii *= rng.uniform(0.9, 1.1, size=3)
    side = rng.choice([-1.0, 1.0])
    lr, vc, ap = host.canal_lr / 2, host.canal_centre_v, host.canal_ap / 2
    if spec.site is Site.BODY:
        if spec.growth is Growth.CONFINED:  # stays in the marrow: no bigger than the body allows
            radii = np.minimum(radii, np.array([a, b, h]) * rng.uniform(0.6, 1.0))
        u = 0.0 if spec.levels.get("C2", 0) > 2 else rng.uniform(-0.35, 0.35) * a
        offset = np.array([u, rng.uniform(-0.4, 0.3) * b, rng.uniform(-0.25, 0.25) * h])
        return [_blob(rng, spec, host, offset, radii)]
    if spec.site is Site.POSTERIOR:
        where = rng.choice(["pedicle", "lamina", "spinous"], p=[0.35, 0.4, 0.25])
        offsets = {
            "pedicle": np.array([side * (lr + 2.0), vc - ap * 0.6, 0.0]),
            "lamina": np.array([side * (lr * 0.8), vc + ap + 2.5, 0.0]),
            "spinous": np.array([0.0, vc + ap + 3.0 + host.spinous_length * 0.35, -host.spinous_length * 0.15]),
        }
        offset = offsets[str(where)]
        if spec.pattern is Pattern.CAPPED:  # grows outward from the bone surface
            offset = offset + np.array([side * radii[0] * 0.5, radii[1] * 0.6, 0.0])
        return [_blob(rng, spec, host, offset, radii)]
    # CANAL: a dumbbell through the foramen below the host level, half in the canal, half outside.
    disc_w = -(h + 2.8)
    inner = _blob(rng, spec, host, np.array([side * lr * 0.35, vc + 0.5, disc_w]), radii * np.array([0.55, 0.55, 0.8]))
    outer = _blob(rng, spec, host, np.array([side * (lr + 9.0), vc - 2.0, disc_w]), radii * np.array([0.6, 0.6, 0.75]))
    bridge = _blob(rng, spec, host, np.array([side * (lr + 2.5), vc - 1.0, disc_w]), np.array([6.0, 3.5, 3.5]))
    return [inner, bridge, outer]


# --------------------------------------------------------------------------------------------------
# Painting


def paint_tumor(canvas: Canvas, tumor: Tumor, spine: Spine) -> None:
    """Paint oedema around the lesion, then the lesion's tissues over what its growth style allows."""
    spec = tumor.spec
    if tumor.edema_mm > 0:
        for blob in tumor.blobs:
            grow = 1.0 + tumor.edema_mm / blob.mean_radius
            lo, hi = box_around(blob.centre, blob.frame, blob.reach() + tumor.edema_mm)
            canvas.paint(
                lo,
                hi,
                partial(_inside_grown, blob, grow),
                Tissue.EDEMA,
                only_tissues=_BONE_MARROW,
                keep_label=True,
            )
    confined = spec.growth is Growth.CONFINED
    only_tissues = _BONE_MARROW if confined else None
    only_labels = None if confined else _GROWS_OVER[spec.growth]
    for blob in tumor.blobs:
        lo, hi = box_around(blob.centre, blob.frame, blob.reach())
        # Lesion voxels carry the level of the slab they lie in, as the ground truth counts levels.
        canvas.paint(
            lo,
            hi,
            partial(_tissues, tumor, blob),
            None,
            label=Label.TUMOR,
            level=lambda p: spine.slab_index(p) + 1,
            only_labels=only_labels,
            only_tissues=only_tissues,
        )


def _inside_grown(blob: Blob, grow: float, p: np.ndarray) -> np.ndarray:
    """Mask of the points ``p`` inside ``blob`` with its surface scaled by ``grow``."""
    return blob.field(p)[0] <= grow


def _tissues(tumor: Tumor, blob: Blob, p: np.ndarray) -> np.ndarray:
    """Tissue codes of the lesion at points ``p`` (0 outside)."""
    s, q = blob.field(p)
    inside = s <= 1.0
    out = np.where(inside, Tissue.TUMOR_SOLID, 0).astype(np.uint8)
    pattern = tumor.spec.pattern
    t = tumor.texture
    if pattern is Pattern.HETEROGENEOUS:
        out[inside & (_evaluate(t["patches"], p) > 0.9) & (s < 0.85)] = Tissue.TUMOR_NECROSIS
    elif pattern is Pattern.MINERALIZED:
        out[inside & (_evaluate(t["mineral"], p) > 1.25)] = Tissue.TUMOR_MINERAL
    elif pattern is Pattern.TRABECULAR:
        # vertical rods ~0.8 mm thick every 3 mm: dots on axial CT, stripes on sagittal images
        lu = local(p, blob.centre, blob.frame)
        rod = (np.mod(lu[..., 0], 3.0) - 1.5) ** 2 + (np.mod(lu[..., 1], 3.0) - 1.5) ** 2 < 0.45**2
        out[inside] = Tissue.TUMOR_FAT
        out[inside & rod] = Tissue.TUMOR_TRABECULA
    elif pattern is Pattern.NIDUS:
        rho = np.linalg.norm(q, axis=-1)
        out[inside] = Tissue.TUMOR_RIM
        out[inside & (rho < 0.5)] = Tissue.TUMOR_NIDUS
        out[inside & (rho < 0.14)] = Tissue.TUMOR_MINERAL
    elif pattern is Pattern.CAPPED:
        out[inside & (s > 1.0 - tumor.rim_mm / blob.mean_radius)] = Tissue.TUMOR_RIM
        cap = inside & (s > 0.7) & (q[..., 1] > 0.35)
        out[cap] = Tissue.TUMOR_CARTILAGE
    elif pattern is Pattern.MULTILOCULAR and tumor.cells is not None and blob is tumor.blobs[0]:
        d = np.linalg.norm(q[..., None, :] - tumor.cells, axis=-1)
        order = np.sort(d, axis=-1)
        nearest = np.argmin(d, axis=-1)
        septum = (order[..., 1] - order[..., 0]) * blob.mean_radius < 0.7
        # Patient lies supine: the dependent layer of each cyst is the posterior (+y) one.
        seed_y = (blob.centre + (tumor.cells * blob.radii) @ blob.frame.T)[:, 1]
        dependent = p[..., 1] > (seed_y + tumor.cell_levels)[nearest]
        out[inside] = np.where(dependent[inside], Tissue.TUMOR_CYST_DEPENDENT, Tissue.TUMOR_CYST)
        out[inside & septum] = Tissue.TUMOR_RIM
    if tumor.rim_mm > 0 and pattern not in (Pattern.NIDUS, Pattern.CAPPED):
        shell = inside & (s > 1.0 - tumor.rim_mm / blob.mean_radius)
        if tumor.rim_gaps > 0:
            threshold = float(np.sqrt(2) * erfinv(1 - 2 * tumor.rim_gaps))
            shell &= _evaluate(t["gaps"], p) < threshold
        out[shell] = Tissue.TUMOR_RIM
    return out
