"""A seeded model of the cervical spine (C1–T1) in patient millimetres, painted onto any grid.

The spine is built bottom-up: T1 is placed, then each vertebra above it is stacked on a disc along a
sagittal curve whose alignment varies (lordotic, straight, kyphotic, S-shaped). Each vertebra has its own
frame (u: patient left, v: posterior, w: superior when upright). Structures are implicit shapes in those
frames, so the same anatomy can be sampled on a CT, MR or radiograph grid, or on a fine lattice for
ground truth. All of it is SYNTHETIC: plausible shapes and sizes, not a patient.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from cspine.domain import VERTEBRAL_LEVELS
from cspine.phantom.geometry import Canvas, box_around, local, rotation

LEVELS = VERTEBRAL_LEVELS  # level code = index + 1 in level maps


def level_code(name: str) -> int:
    return LEVELS.index(name) + 1


class Label(enum.IntEnum):
    """Structure labels of the phantom's ground-truth label maps (written to labels.npz)."""

    BACKGROUND = 0  # air outside the body and in the airway
    SOFT_TISSUE = 1
    VERTEBRAL_BODY = 2  # C2–T1 bodies with the dens
    POSTERIOR_ELEMENTS = 3  # arches, pillars, processes; the whole C1 ring
    DISC = 4
    CSF = 5  # the spinal canal outside the cord
    CORD = 6
    OPLL = 7  # ossified posterior longitudinal ligament
    TUMOR = 8


class Tissue(enum.IntEnum):
    """What a point is made of; modality renderers turn tissues into HU, MR signal or attenuation."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    CORTICAL = 3
    CANCELLOUS = 4
    POSTERIOR_BONE = 5  # thin posterior elements: cortex and marrow averaged
    DISC_ANNULUS = 6
    DISC_NUCLEUS = 7
    CSF = 8
    CORD = 9
    OPLL = 10
    EDEMA = 11  # marrow oedema around a lesion: still labelled bone
    TUMOR_SOLID = 12
    TUMOR_RIM = 13  # sclerotic rim, eggshell cortex, septa
    TUMOR_CYST = 14
    TUMOR_CYST_DEPENDENT = 15  # the lower layer of a fluid–fluid level
    TUMOR_NIDUS = 16
    TUMOR_MINERAL = 17  # matrix mineralisation, calcification
    TUMOR_FAT = 18  # fatty stroma (haemangioma)
    TUMOR_TRABECULA = 19  # coarse thickened trabeculae (haemangioma)
    TUMOR_NECROSIS = 20
    TUMOR_CARTILAGE = 21  # cartilage cap


class Alignment(str, enum.Enum):
    LORDOTIC = "lordotic"
    STRAIGHT = "straight"
    KYPHOTIC = "kyphotic"
    S_SHAPED = "s_shaped"


# alignment: (probability, Cobb mean deg, Cobb sd deg, S-curve amplitude deg)
ALIGNMENTS = {
    Alignment.LORDOTIC: (0.68, 22.0, 8.0, 0.0),
    Alignment.STRAIGHT: (0.15, 2.0, 3.5, 0.0),
    Alignment.KYPHOTIC: (0.10, -9.0, 4.0, 0.0),
    Alignment.S_SHAPED: (0.07, 6.0, 4.0, 9.0),
}

# Per level, typical adult sizes in mm (SYNTHETIC, textbook order of magnitude):
# body LR width, AP depth, height; canal AP, LR; cord AP, LR; spinous process length; disc height below.
_SIZES = {
    "C1": (0.0, 0.0, 0.0, 16.5, 25.0, 7.6, 11.0, 0.0, 0.0),
    "C2": (16.0, 15.5, 15.0, 15.5, 23.5, 7.4, 11.0, 18.0, 4.8),
    "C3": (16.5, 15.5, 13.5, 14.5, 23.0, 7.2, 11.0, 12.0, 5.2),
    "C4": (17.5, 15.8, 13.5, 14.3, 23.5, 7.2, 11.5, 12.0, 5.6),
    "C5": (18.5, 16.0, 13.5, 14.3, 24.0, 7.0, 12.5, 13.0, 5.8),
    "C6": (20.0, 16.5, 13.8, 14.5, 24.5, 7.0, 12.8, 16.0, 5.8),
    "C7": (21.5, 16.8, 14.5, 14.8, 23.5, 7.0, 11.5, 22.0, 5.6),
    "T1": (25.0, 17.5, 16.5, 15.0, 22.0, 7.2, 10.0, 24.0, 0.0),
}

CORTEX_MM = 1.2
_FREE = (Label.BACKGROUND, Label.SOFT_TISSUE)  # posterior elements never overwrite a body
DENS_RADIUS = 5.0
DENS_LENGTH = 15.0


@dataclass
class Vertebra:
    name: str
    centre: np.ndarray  # body centre; for C1 the point on the dens axis at the ring's mid-height
    frame: np.ndarray  # columns u, v, w
    half: np.ndarray  # body half sizes (u, v, w); for C1 zeros
    canal_ap: float
    canal_lr: float
    cord_ap: float
    cord_lr: float
    spinous_length: float
    collapse: float = 1.0  # body height factor, < 1 for a pathological collapse

    @property
    def code(self) -> int:
        return level_code(self.name)

    @property
    def w(self) -> np.ndarray:
        return self.frame[:, 2]

    @property
    def canal_centre_v(self) -> float:
        """v of the canal centre in this vertebra's frame."""
        if self.name == "C1":
            return DENS_RADIUS + 1.0 + self.canal_ap / 2
        return self.half[1] + self.canal_ap / 2

    def superior_endplate(self) -> np.ndarray:
        return self.centre + self.w * self.half[2]

    def inferior_endplate(self) -> np.ndarray:
        return self.centre - self.w * self.half[2]

    def sagittal_tilt_deg(self) -> float:
        """Forward lean of the endplates seen on a lateral view (projection on the y–z plane)."""
        w = self.w
        return float(np.degrees(np.arctan2(-w[1], w[2])))


@dataclass
class Disc:
    upper: Vertebra
    lower: Vertebra
    degeneration: float  # 0 healthy … 1 severe (height loss, dark nucleus on T2)

    @property
    def name(self) -> str:
        return f"{self.upper.name}-{self.lower.name}"

    @property
    def height(self) -> float:
        """Height at the centre: distance between the two endplate centres."""
        return float(np.linalg.norm(self.upper.inferior_endplate() - self.lower.superior_endplate()))

    @property
    def centre(self) -> np.ndarray:
        return (self.upper.inferior_endplate() + self.lower.superior_endplate()) / 2

    @property
    def frame(self) -> np.ndarray:
        w = self.upper.inferior_endplate() - self.lower.superior_endplate()
        w = w / np.linalg.norm(w)
        u = (self.upper.frame[:, 0] + self.lower.frame[:, 0]) / 2
        u = u - w * (u @ w)
        u /= np.linalg.norm(u)
        return np.stack([u, np.cross(w, u), w], axis=1)


@dataclass
class Opll:
    """Ossification of the posterior longitudinal ligament over a run of levels."""

    levels: tuple[str, ...]
    thickness: dict[str, float]  # per level, mm
    width: float  # mm, left–right
    continuous: bool  # bridges the discs (continuous type) or lies behind the bodies (segmental)

    def thickness_at(self, vertebra: Vertebra, w: np.ndarray) -> np.ndarray:
        """OPLL thickness (mm) at height ``w`` (local) in ``vertebra``'s slab."""
        t = self.thickness.get(vertebra.name, 0.0)
        if t <= 0:
            return np.zeros_like(w)
        if self.continuous:
            return np.full_like(w, t)
        return np.clip(t * (1.0 - (np.abs(w) / max(vertebra.half[2], 1e-3)) ** 4), 0.0, None)

    def max_thickness(self) -> tuple[str, float]:
        name = max(self.thickness, key=self.thickness.__getitem__)
        return name, self.thickness[name]


@dataclass
class Neck:
    half_lr: float
    half_ap: float
    centre_offset_y: float  # neck centre relative to the body centre line, mm (posterior +)
    fat: float  # subcutaneous fat thickness
    shoulder_z: float  # below this the soft tissue widens (shoulders)
    airway_half_ap: float
    airway_half_lr: float


@dataclass
class Spine:
    vertebrae: list[Vertebra]  # C1 … T1
    discs: list[Disc]  # C2-C3 … C7-T1
    neck: Neck
    alignment: Alignment
    opll: Opll | None = None
    _boundaries: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        by_name = self.by_name
        c2 = by_name["C2"]
        self._boundaries = [(c2.superior_endplate(), c2.w)] + [(d.centre, d.frame[:, 2]) for d in self.discs]

    @property
    def by_name(self) -> dict[str, Vertebra]:
        return {v.name: v for v in self.vertebrae}

    def cobb_c2_c7(self) -> float:
        """C2–C7 Cobb angle in degrees between the C2 and C7 inferior endplates on a lateral view.

        Positive is lordosis (C7 leans further forward than C2), negative kyphosis."""
        v = self.by_name
        return v["C7"].sagittal_tilt_deg() - v["C2"].sagittal_tilt_deg()

    def slab_index(self, points: np.ndarray) -> np.ndarray:
        """Index into ``vertebrae`` of the level slab each point lies in (planes through the discs)."""
        idx = np.zeros(points.shape[:-1], dtype=np.int8)
        for point, normal in self._boundaries:
            idx += ((points - point.astype(np.float32)) @ normal.astype(np.float32) < 0).astype(np.int8)
        return idx

    def centre_line_y(self, z: np.ndarray) -> np.ndarray:
        zs = np.array([v.centre[2] for v in self.vertebrae])
        ys = np.array([v.centre[1] for v in self.vertebrae])
        order = np.argsort(zs)
        return np.interp(z, zs[order], ys[order])

    def extent(self, margin: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
        """Patient box holding C1 to T1 with their processes, plus a margin."""
        corners: list[np.ndarray] = []
        for v in self.vertebrae:
            lo, hi = box_around(v.centre, v.frame, np.array([40.0, 45.0, 20.0]))
            corners += [lo, hi]
        pts = np.array(corners)
        return pts.min(axis=0) - margin, pts.max(axis=0) + margin


def sample_spine(
    rng: np.random.Generator,
    collapse: dict[str, float] | None = None,
    opll_probability: float = 0.12,
    degeneration_rate: float = 1.0,
) -> Spine:
    """Draw a SYNTHETIC adult cervical spine; ``collapse`` maps a level to its body height factor;
    ``degeneration_rate`` multiplies each disc's probability of degeneration (an older population's)."""
    collapse = collapse or {}
    scale = float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15))
    names = list(LEVELS)
    kinds = list(ALIGNMENTS)
    alignment = kinds[rng.choice(len(kinds), p=[ALIGNMENTS[k][0] for k in kinds])]
    _, cobb_mean, cobb_sd, s_amp = ALIGNMENTS[alignment]
    cobb = rng.normal(cobb_mean, cobb_sd)
    head = rng.normal(0.0, 5.0)
    s_amp = s_amp * rng.choice([-1.0, 1.0])
    # Sagittal tilt (forward lean, deg) per level along t = 0 (C2) … 1 (C7): linear + S-curve + noise.
    tilt = {}
    for i, name in enumerate(names[1:7]):
        t = i / 5.0
        tilt[name] = head + cobb * (t - 0.5) + s_amp * np.sin(2 * np.pi * t) + rng.normal(0.0, 1.5)
    tilt["C1"] = tilt["C2"] - rng.normal(4.0, 3.0)
    tilt["T1"] = tilt["C7"] + rng.normal(5.0, 2.0)
    lateral = rng.normal(0.0, 2.0)

    degeneration = {}
    for name in names[1:7]:
        p = min(1.0, (0.35 if name in ("C5", "C6") else 0.12) * degeneration_rate)
        degeneration[name] = float(rng.uniform(0.3, 1.0)) if rng.random() < p else float(rng.uniform(0.0, 0.15))

    # Stack T1 … C2 bottom-up; then hang C1 on the dens.
    frames = {
        n: rotation(np.radians(tilt[n]), np.radians(lateral + rng.normal(0, 1.2)), np.radians(rng.normal(0, 2.0)))
        for n in names
    }
    vertebrae: dict[str, Vertebra] = {}
    centre = np.array([rng.normal(0.0, 2.0), 0.0, 0.0])
    below: Vertebra | None = None
    for name in reversed(names[1:]):
        lr, ap, height, canal_ap, canal_lr, cord_ap, cord_lr, spinous, disc = _SIZES[name]
        jitter = lambda x, sd=0.05: float(x * scale * np.clip(rng.normal(1.0, sd), 0.8, 1.2))  # noqa: E731
        half = np.array([jitter(lr) / 2, jitter(ap) / 2, jitter(height) * collapse.get(name, 1.0) / 2])
        v = Vertebra(
            name=name,
            centre=centre,
            frame=frames[name],
            half=half,
            canal_ap=jitter(canal_ap, 0.08),
            canal_lr=jitter(canal_lr),
            cord_ap=jitter(cord_ap, 0.07),
            cord_lr=jitter(cord_lr, 0.06),
            spinous_length=jitter(spinous, 0.12),
            collapse=collapse.get(name, 1.0),
        )
        if below is not None:
            disc_h = _SIZES[name][8] * scale * np.clip(rng.normal(1.0, 0.08), 0.75, 1.25)
            disc_h *= 1.0 - 0.55 * degeneration[name]
            direction = below.w + v.w
            direction /= np.linalg.norm(direction)
            v.centre = below.centre + direction * (below.half[2] + disc_h + half[2])
            v.centre = v.centre + below.frame[:, 1] * rng.normal(0.0, 0.5)  # slight listhesis
        vertebrae[name] = v
        below = v
        centre = v.centre
    c2 = vertebrae["C2"]
    c1_half = 9.0 * scale
    c1 = Vertebra(
        name="C1",
        centre=c2.centre + c2.w * (c2.half[2] + c1_half) + c2.frame[:, 1] * 1.0,
        frame=frames["C1"],
        half=np.zeros(3),
        canal_ap=_SIZES["C1"][3] * scale * float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15)),
        canal_lr=_SIZES["C1"][4] * scale,
        cord_ap=_SIZES["C1"][5] * scale,
        cord_lr=_SIZES["C1"][6] * scale,
        spinous_length=0.0,
    )
    vertebrae["C1"] = c1
    ordered = [vertebrae[n] for n in names]
    discs = [Disc(ordered[i], ordered[i + 1], degeneration[ordered[i].name]) for i in range(1, 7)]

    neck = Neck(
        half_lr=float(rng.uniform(52, 62) * scale),
        half_ap=float(rng.uniform(55, 65) * scale),
        centre_offset_y=float(rng.uniform(10, 20)),
        fat=float(rng.uniform(3, 9)),
        shoulder_z=float(vertebrae["C6"].centre[2] + rng.normal(0, 5)),
        airway_half_ap=float(rng.uniform(5, 9)),
        airway_half_lr=float(rng.uniform(9, 15)),
    )
    opll = _sample_opll(rng, ordered) if rng.random() < opll_probability else None
    return Spine(vertebrae=ordered, discs=discs, neck=neck, alignment=alignment, opll=opll)


def _sample_opll(rng: np.random.Generator, vertebrae: list[Vertebra]) -> Opll:
    count = int(rng.integers(1, 5))
    start = int(rng.integers(1, 8 - count))  # within C2–C7
    names = tuple(v.name for v in vertebrae[start : start + count])
    peak = float(rng.uniform(2.0, 7.0))
    thickness = {}
    for i, name in enumerate(names):
        falloff = 1.0 - 0.25 * abs(i - (count - 1) / 2)
        thickness[name] = float(max(1.2, peak * falloff * rng.uniform(0.85, 1.0)))
    return Opll(names, thickness, width=float(rng.uniform(8, 14)), continuous=bool(rng.random() < 0.5))


# --------------------------------------------------------------------------------------------------
# Painting


def _superellipse(a: np.ndarray, b: np.ndarray, p: float = 2.0) -> np.ndarray:
    return (np.abs(a) ** p + np.abs(b) ** p) ** (1.0 / p)


def paint_spine(canvas: Canvas, spine: Spine) -> None:
    """Paint soft tissue, airway, vertebrae, discs, canal, cord and OPLL, in that order."""
    paint_soft_tissue(canvas, spine)
    paint_skeleton(canvas, spine)


def paint_skeleton(canvas: Canvas, spine: Spine) -> None:
    """Vertebrae, discs, canal, cord and OPLL (over the soft tissue painted before)."""
    for v in spine.vertebrae:
        if v.name == "C1":
            _paint_atlas(canvas, v)
        else:
            _paint_body(canvas, v)
            _paint_posterior(canvas, spine, v)
    for d in spine.discs:
        _paint_disc(canvas, d)
    _paint_canal(canvas, spine)


def neck_half_lr(neck: Neck, z: np.ndarray) -> np.ndarray:
    """Left–right half width of the soft tissue at height z: the shoulders widen it below ``shoulder_z``."""
    return neck.half_lr + np.clip(neck.shoulder_z - z, 0.0, 45.0) * 2.0


def neck_centre_y(spine: Spine, z: np.ndarray) -> np.ndarray:
    return spine.centre_line_y(z) + spine.neck.centre_offset_y


def airway_centre_y(spine: Spine, z: np.ndarray) -> np.ndarray:
    """The airway lies in front of the bodies; prevertebral soft tissue thickens from C2 (≈5 mm) to T1."""
    c2, t1 = spine.by_name["C2"], spine.by_name["T1"]
    frac = np.clip((c2.centre[2] - z) / max(c2.centre[2] - t1.centre[2], 1.0), 0.0, 1.0)
    return spine.centre_line_y(z) - (13.0 + 10.0 * frac) - spine.neck.airway_half_ap


_NECK_P = 2.2


def neck_chords(spine: Spine, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left–right path lengths (fat, muscle, airway) in mm through the soft tissue at (y, z).

    The same shapes :func:`paint_soft_tissue` paints, integrated exactly along x; radiographs use it so
    that only the spine region needs sampling.
    """
    n = spine.neck
    half_lr = neck_half_lr(n, z)

    def chord(half_x: np.ndarray, dy: np.ndarray, half_y: float, p: float) -> np.ndarray:
        r = np.clip(1.0 - np.abs(dy / half_y) ** p, 0.0, None)
        return 2.0 * half_x * r ** (1.0 / p)

    dy = y - neck_centre_y(spine, z)
    outer = chord(half_lr, dy, n.half_ap, _NECK_P)
    inner = chord(half_lr - n.fat, dy, n.half_ap - n.fat, _NECK_P)
    airway = chord(np.full_like(z, n.airway_half_lr), y - airway_centre_y(spine, z), n.airway_half_ap, 2.0)
    airway = np.minimum(airway, inner)
    return outer - inner, inner - airway, airway


def paint_soft_tissue(canvas: Canvas, spine: Spine) -> None:
    """The neck (subcutaneous fat around muscle, widening into the shoulders) and the airway."""
    n = spine.neck
    lo, hi = spine.extent(margin=60.0)
    lo = lo - np.array([200.0, 100.0, 0.0])
    hi = hi + np.array([200.0, 100.0, 0.0])

    def neck(p: np.ndarray) -> np.ndarray:
        z = p[..., 2]
        half_lr = neck_half_lr(n, z)
        dy = p[..., 1] - neck_centre_y(spine, z)
        r = _superellipse(p[..., 0] / half_lr, dy / n.half_ap, _NECK_P)
        inner = _superellipse(p[..., 0] / (half_lr - n.fat), dy / (n.half_ap - n.fat), _NECK_P)
        codes = np.where(r <= 1.0, Tissue.FAT, 0)
        return np.where(inner <= 1.0, Tissue.MUSCLE, codes).astype(np.uint8)

    canvas.paint(lo, hi, neck, None, label=Label.SOFT_TISSUE)

    def airway(p: np.ndarray) -> np.ndarray:
        dy = p[..., 1] - airway_centre_y(spine, p[..., 2])
        return _superellipse(p[..., 0] / n.airway_half_lr, dy / n.airway_half_ap) <= 1.0

    canvas.paint(lo, hi, airway, Tissue.AIR, label=Label.BACKGROUND, only_labels=(Label.SOFT_TISSUE,))


def _paint_body(canvas: Canvas, v: Vertebra) -> None:
    a, b, h = v.half
    reach = np.array([a, b, h]) + 1.0
    if v.name == "C2":
        reach[2] = h + DENS_LENGTH + 1.0
    lo, hi = box_around(v.centre, v.frame, reach)
    shrink = CORTEX_MM

    def body(p: np.ndarray) -> np.ndarray:
        q = local(p, v.centre, v.frame)
        r = _superellipse(q[..., 0] / a, q[..., 1] / b, 2.6)
        outer = (r <= 1.0) & (np.abs(q[..., 2]) <= h)
        r_in = _superellipse(q[..., 0] / (a - shrink), q[..., 1] / (b - shrink), 2.6)
        inner = (r_in <= 1.0) & (np.abs(q[..., 2]) <= h - shrink)
        if v.name == "C2":  # the dens (odontoid process) rises from the top of C2
            rd = np.hypot(q[..., 0], q[..., 1] - 1.0)
            along = q[..., 2] - h
            tip = DENS_LENGTH - DENS_RADIUS
            dens_r = np.where(along > tip, np.sqrt(np.clip(DENS_RADIUS**2 - (along - tip) ** 2, 0, None)), DENS_RADIUS)
            dens = (along >= -1.0) & (along <= DENS_LENGTH) & (rd <= dens_r)
            outer |= dens
            inner |= dens & (rd <= dens_r - shrink) & (along <= DENS_LENGTH - shrink)
        codes = np.where(outer, Tissue.CORTICAL, 0)
        return np.where(inner, Tissue.CANCELLOUS, codes).astype(np.uint8)

    canvas.paint(lo, hi, body, None, label=Label.VERTEBRAL_BODY, level=v.code)


def _paint_posterior(canvas: Canvas, spine: Spine, v: Vertebra) -> None:
    a, b, h = v.half
    vc = v.canal_centre_v
    ap, lr = v.canal_ap / 2, v.canal_lr / 2
    disc_below = next((d.height for d in spine.discs if d.upper is v), 5.0)
    pillar_h = h + disc_below / 2 - 0.8
    beta = np.radians(25.0 if v.name not in ("C7", "T1") else 35.0)
    sp_start = vc + ap + 3.0
    reach = np.array([lr + 20.0, vc + ap + v.spinous_length + 8.0, h + 12.0])
    lo, hi = box_around(v.centre, v.frame, reach)
    arch_half_h = 0.42 * 2 * h

    def posterior(p: np.ndarray) -> np.ndarray:
        q = local(p, v.centre, v.frame)
        u, vv, w = q[..., 0], q[..., 1], q[..., 2]
        canal = _superellipse(u / lr, (vv - vc) / ap) <= 1.0
        ring = (_superellipse(u / (lr + 4.5), (vv - vc) / (ap + 4.0)) <= 1.0) & ~canal
        ring &= (vv > b - 2.0) & (np.abs(w) <= arch_half_h)
        pillars = (np.abs(np.abs(u) - (lr + 5.0)) <= 4.5) & (np.abs(vv - vc) <= 6.0) & (np.abs(w) <= pillar_h)
        tp_u = np.abs(u)
        transverse = (tp_u >= a - 2.0) & (tp_u <= a + 11.0) & (vv >= -3.0) & (vv <= 5.0) & (np.abs(w) <= 3.0)
        transverse &= np.hypot(tp_u - (a + 3.5), vv - 0.8) > 2.6  # foramen transversarium
        d = np.array([np.cos(beta), -np.sin(beta)])
        rel_v, rel_w = vv - sp_start, w
        t = rel_v * d[0] + rel_w * d[1]
        nrm = -rel_v * d[1] + rel_w * d[0]
        taper = 1.0 - 0.35 * np.clip(t / max(v.spinous_length, 1.0), 0, 1)
        spinous = (t >= -4.0) & (t <= v.spinous_length) & (np.abs(u) <= 2.8 * taper) & (np.abs(nrm) <= 3.6 * taper)
        return ring | pillars | transverse | spinous

    canvas.paint(
        lo, hi, posterior, Tissue.POSTERIOR_BONE, label=Label.POSTERIOR_ELEMENTS, level=v.code, only_labels=_FREE
    )


def _paint_atlas(canvas: Canvas, v: Vertebra) -> None:
    lo, hi = box_around(v.centre, v.frame, np.array([40.0, 36.0, 12.0]))

    def atlas(p: np.ndarray) -> np.ndarray:
        q = local(p, v.centre, v.frame)
        u, vv, w = q[..., 0], q[..., 1], q[..., 2]
        outer = _superellipse(u / 23.0, (vv - 9.0) / 22.0) <= 1.0
        hole = _superellipse(u / 15.0, (vv - 10.0) / 17.0) <= 1.0
        ring = outer & ~hole & (np.abs(w) <= 5.0)
        masses = outer & ~hole & (np.abs(u) >= 12.0) & (np.abs(w) <= 9.0)
        transverse = (np.abs(u) >= 21.0) & (np.abs(u) <= 36.0) & (np.abs(vv - 5.0) <= 4.0) & (np.abs(w) <= 3.0)
        return ring | masses | transverse

    canvas.paint(lo, hi, atlas, Tissue.POSTERIOR_BONE, label=Label.POSTERIOR_ELEMENTS, level=v.code)


def _paint_disc(canvas: Canvas, d: Disc) -> None:
    up, low = d.upper, d.lower
    a = min(up.half[0], low.half[0]) - 0.3
    b = min(up.half[1], low.half[1]) - 0.3
    centre, frame = d.centre, d.frame
    lo, hi = box_around(centre, frame, np.array([a + 1, b + 1, d.height / 2 + 4.0]))
    e_up, e_low = up.inferior_endplate(), low.superior_endplate()

    def disc(p: np.ndarray) -> np.ndarray:
        q = local(p, centre, frame)
        r = _superellipse(q[..., 0] / a, q[..., 1] / b, 2.6)
        between = ((p - e_up.astype(np.float32)) @ up.w.astype(np.float32) <= 0) & (
            (p - e_low.astype(np.float32)) @ low.w.astype(np.float32) >= 0
        )
        inside = between & (r <= 1.0) & (np.abs(q[..., 2]) <= d.height / 2 + 3.0)
        nucleus = inside & (_superellipse(q[..., 0] / (0.55 * a), (q[..., 1] - 1.0) / (0.5 * b)) <= 1.0)
        codes = np.where(inside, Tissue.DISC_ANNULUS, 0)
        return np.where(nucleus, Tissue.DISC_NUCLEUS, codes).astype(np.uint8)

    canvas.paint(lo, hi, disc, None, label=Label.DISC, level=up.code)


def _paint_canal(canvas: Canvas, spine: Spine) -> None:
    """CSF, cord and OPLL, level slab by level slab, in each level's own frame."""
    centres = np.array([v.centre + v.frame[:, 1] * v.canal_centre_v for v in spine.vertebrae])
    lo, hi = centres.min(axis=0) - 20.0, centres.max(axis=0) + 20.0
    lo[2] -= 30.0  # the canal runs on above C1 and below T1
    hi[2] += 30.0
    opll = spine.opll

    def canal(p: np.ndarray) -> np.ndarray:
        out = np.zeros(p.shape[:-1], dtype=np.uint8)
        slab = spine.slab_index(p)
        for i, v in enumerate(spine.vertebrae):
            sel = slab == i
            if not sel.any():
                continue
            q = local(p[sel], v.centre, v.frame)
            out[sel] = canal_tissue(v, q, opll)
        return out

    canvas.paint(lo, hi, canal, None, label=None)
    # labels follow the tissue codes painted above
    _relabel(canvas, {Tissue.CSF: Label.CSF, Tissue.CORD: Label.CORD, Tissue.OPLL: Label.OPLL})


def _relabel(canvas: Canvas, table: dict[Tissue, Label]) -> None:
    for tissue, label in table.items():
        mask = canvas.tissue == tissue
        canvas.label[mask] = label
        canvas.level[mask] = 0


def canal_tissue(v: Vertebra, q: np.ndarray, opll: Opll | None) -> np.ndarray:
    """Tissue codes (CSF, CORD, OPLL or 0) of local points ``q`` of vertebra ``v``'s slab."""
    u, vv, w = q[..., 0], q[..., 1], q[..., 2]
    ap, lr, vc = v.canal_ap / 2, v.canal_lr / 2, v.canal_centre_v
    inside = _superellipse(u / lr, (vv - vc) / ap) <= 1.0
    t = opll.thickness_at(v, w) if opll is not None else np.zeros_like(w)
    half_width = opll.width / 2 if opll is not None else 0.0
    front = vc - ap + t  # anterior wall of the free canal in the midline
    ossified = inside & (vv < front) & (np.abs(u) <= half_width)
    # The cord keeps 0.8 mm of CSF around it; OPLL flattens it (keeping some of its area) and pushes it back.
    cord_ap = np.minimum(v.cord_ap, np.maximum((vc + ap) - front - 1.6, 2.5))
    cord_lr = v.cord_lr * (v.cord_ap / cord_ap) ** 0.3
    cord_centre = np.maximum(vc - 0.5, front + 0.8 + cord_ap / 2)
    cord = _superellipse(u / (cord_lr / 2), (vv - cord_centre) / (cord_ap / 2)) <= 1.0
    codes = np.where(inside, Tissue.CSF, 0)
    codes = np.where(inside & cord, Tissue.CORD, codes)
    return np.where(ossified, Tissue.OPLL, codes).astype(np.uint8)
