"""SYNTHETIC acquisitions of one phantom: protocols, sampling grids, rendered series with label maps.

CT is axial, MR sagittal (T1- and T2-like on one grid), the radiograph lateral. Every rendered series
carries the geometry the DICOM writer needs and label maps in the slice order cspine's ingest returns
(ascending along the slice normal, i.e. row direction × column direction).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from cspine.domain import SeriesRole, Volume
from cspine.phantom.anatomy import (
    Label,
    Spine,
    Tissue,
    neck_chords,
    paint_skeleton,
    paint_soft_tissue,
)
from cspine.phantom.geometry import Canvas, Grid
from cspine.phantom.render import (
    BASE_TISSUES,
    mu_table,
    render_ct,
    render_mr,
    render_xr,
)
from cspine.phantom.tumors import Tumor, paint_tumor

# Image matrices: the phantom's own (256² CT and MR, a ~0.55 mm radiograph: fast to make and to analyse) or
# a real scanner's (``real=True``): 512² CT with 0.5 mm slices, 512² MR, a 3072 × 2614 detector at ~0.1 mm.
# The field of view and the anatomy stay the phantom's; real matrices are rendered at about the phantom's
# resolution, interpolated onto the real grid and given their own fine-grained noise there (painting every
# point of a 512² × 300-slice CT or of a 3072² radiograph's rays would take minutes).
MATRICES = ("phantom", "real")
REAL_CT_SIZE = 512
REAL_CT_STEP_MM = 0.5  # slice spacing of a thin-slice neck CT (one slice per 0.5 mm detector row)
REAL_CT_THICKNESS_MM = 0.625
REAL_CT_MIN_COVERAGE_MM = 152.0  # ≥ 300 slices at 0.5 mm
REAL_CT_RENDER_STEP_MM = 1.0  # slices rendered at 1 mm, interpolated to 0.5 mm
REAL_MR_SIZE = 512
REAL_XR_SHAPE = (3072, 2614)  # rows × columns of a 35 × 43 cm class flat-panel detector, portrait
REAL_XR_SPACING_RATIO = 0.2  # real pixel spacing over the phantom's: 0.10–0.12 mm


@dataclass(frozen=True)
class Shift:
    """Domain-shift knobs, 1.0 (or None) meaning the usual cohort variation only."""

    noise: float = 1.0  # multiplies image noise of every modality
    resolution: float = 1.0  # multiplies pixel spacing (coarser images, same field of view)
    contrast: float = 1.0  # scales image contrast around a mid value
    thickness: float | None = None  # slice thickness in mm for CT and MR

    def __post_init__(self) -> None:
        for name in ("noise", "resolution", "contrast"):
            if not 0.1 <= getattr(self, name) <= 10.0:
                raise ValueError(f"shift {name} must be between 0.1 and 10, got {getattr(self, name)}")
        if self.thickness is not None and not 0.3 <= self.thickness <= 10.0:
            raise ValueError(f"shift thickness must be between 0.3 and 10 mm, got {self.thickness}")

    @classmethod
    def parse(cls, text: str) -> Shift:
        """``"noise=2,resolution=1.5,contrast=0.8,thickness=3"`` → Shift; an empty string → no shift."""
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in {"noise", "resolution", "contrast", "thickness"}:
                raise ValueError(f"bad shift {part!r}: expected noise=, resolution=, contrast= or thickness=")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"bad shift {part!r}: {value!r} is not a number") from None
        return cls(**values)

    def as_dict(self) -> dict:
        return {
            "noise": self.noise,
            "resolution": self.resolution,
            "contrast": self.contrast,
            "thickness": self.thickness,
        }


@dataclass(frozen=True)
class Protocol:
    """One modality's acquisition at a site (``sites.SiteProfile``); the defaults change nothing.

    ``noise``, ``resolution``, ``contrast`` and ``thickness_mm`` act like the ``Shift`` knobs of the same
    names and compose with a ``Shift`` by multiplication (a ``Shift`` thickness wins); ``blur_mm`` and
    ``sharpen`` are the reconstruction kernel or image processing, applied in-plane to the finished image
    (its noise included): a soft kernel is a Gaussian of that sigma, a sharp one an unsharp mask (image +
    ``sharpen`` × (image − its Gaussian blur of ``sharpen_mm``)). ``kernel_name`` is what a CT records as
    ConvolutionKernel instead of the drawn one."""

    noise: float = 1.0
    resolution: float = 1.0
    contrast: float = 1.0
    thickness_mm: float | None = None
    blur_mm: float = 0.0
    sharpen: float = 0.0
    sharpen_mm: float = 1.0
    kernel_name: str | None = None

    def __post_init__(self) -> None:
        Shift(self.noise, self.resolution, self.contrast, self.thickness_mm)  # same ranges as a Shift
        if not 0.0 <= self.blur_mm <= 5.0 or not 0.0 <= self.sharpen <= 5.0 or not 0.2 <= self.sharpen_mm <= 5.0:
            raise ValueError(
                f"kernel out of range: blur_mm {self.blur_mm} (0-5), sharpen {self.sharpen} (0-5), "
                f"sharpen_mm {self.sharpen_mm} (0.2-5)"
            )

    def compose(self, shift: Shift) -> Shift:
        """The Shift this protocol amounts to on top of ``shift`` (``shift``'s thickness, if any, wins)."""
        return Shift(
            noise=shift.noise * self.noise,
            resolution=shift.resolution * self.resolution,
            contrast=shift.contrast * self.contrast,
            thickness=shift.thickness if shift.thickness is not None else self.thickness_mm,
        )

    def filter(self, values: np.ndarray, spacing_mm: float) -> np.ndarray:
        """``values`` ([K, R, C] or [R, C]) through the kernel, in-plane; unchanged without one."""
        return apply_kernel(values, spacing_mm, self.blur_mm, self.sharpen, self.sharpen_mm)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ScannerProfile:
    """A site's scanners and protocols: one ``Protocol`` per modality and the MR field strength effects.

    ``mr_field_t`` is recorded as MagneticFieldStrength (None: drawn, 1.5 or 3 T, as without a site); its
    lower SNR at 1.5 T is in ``mr.noise``. ``mr_weighting`` mixes that share of the other weighting's tissue
    signal into each MR series (T1 ← T2 and T2 ← T1: what a longer TR / shorter TE does to the contrast)."""

    ct: Protocol = field(default_factory=Protocol)
    mr: Protocol = field(default_factory=Protocol)
    xr: Protocol = field(default_factory=Protocol)
    mr_field_t: float | None = None
    mr_weighting: float = 0.0

    def __post_init__(self) -> None:
        if self.mr_field_t is not None and not 0.2 <= self.mr_field_t <= 7.0:
            raise ValueError(f"mr_field_t must be between 0.2 and 7 T, got {self.mr_field_t}")
        if not 0.0 <= self.mr_weighting <= 0.5:
            raise ValueError(f"mr_weighting must be between 0 and 0.5, got {self.mr_weighting}")

    def mr_tissue_values(self, tissue_values: dict) -> dict:
        """Tissue (CT, T1, T2) values with ``mr_weighting`` of each weighting mixed into the other."""
        w = self.mr_weighting
        if w == 0.0:
            return tissue_values
        return {t: (ct, (1 - w) * t1 + w * t2, (1 - w) * t2 + w * t1) for t, (ct, t1, t2) in tissue_values.items()}

    def as_dict(self) -> dict:
        return {
            "ct": self.ct.as_dict(),
            "mr": self.mr.as_dict(),
            "xr": self.xr.as_dict(),
            "mr_field_t": self.mr_field_t,
            "mr_weighting": self.mr_weighting,
        }


def varied_scanner(rng: np.random.Generator) -> ScannerProfile:
    """A scanner and protocol drawn at random, for training models that must hold up at other sites than the
    default: per modality noise ×0.7–3.5 (CT), ×0.6–3.0 (MR), ×0.7–4.5 (radiograph), pixels ×0.8–1.4, contrast
    ×0.85–1.15, thin or thick slices (CT, MR), a soft or sharp kernel or none; MR at 1.5 or 3 T with up to 0.35 of
    the other weighting mixed in. The ranges span the phantom's site profiles (sites.py) and go beyond them; a
    profile's exact settings are one draw among many, not a training target."""

    def kernel() -> dict:
        kind = rng.choice(["none", "soft", "sharp"], p=[0.4, 0.3, 0.3])
        if kind == "soft":
            return {"blur_mm": float(rng.uniform(0.2, 1.2))}
        if kind == "sharp":
            return {"sharpen": float(rng.uniform(0.3, 2.0)), "sharpen_mm": float(rng.uniform(0.6, 1.2))}
        return {}

    def protocol(noise: tuple[float, float], thickness: list[float | None]) -> Protocol:
        return Protocol(
            noise=float(rng.uniform(*noise)),
            resolution=float(rng.uniform(0.8, 1.4)),
            contrast=float(rng.uniform(0.85, 1.15)),
            thickness_mm=thickness[int(rng.integers(len(thickness)))],
            **kernel(),
        )

    return ScannerProfile(
        ct=protocol((0.7, 3.5), [None, 1.0, 3.0]),
        mr=protocol((0.6, 3.0), [None, 4.0]),
        xr=protocol((0.7, 4.5), [None]),
        mr_field_t=float(rng.choice([1.5, 3.0])),
        mr_weighting=float(rng.uniform(0.0, 0.35)),
    )


def apply_kernel(
    values: np.ndarray, spacing_mm: float, blur_mm: float, sharpen: float, sharpen_mm: float
) -> np.ndarray:
    """A soft (Gaussian ``blur_mm``) and/or sharp (unsharp mask) kernel over the last two axes."""
    if blur_mm <= 0.0 and sharpen <= 0.0:
        return values
    sigma = [0.0] * (values.ndim - 2)
    out = values.astype(np.float32)
    if blur_mm > 0.0:
        out = ndimage.gaussian_filter(out, [*sigma, blur_mm / spacing_mm, blur_mm / spacing_mm])
    if sharpen > 0.0:
        smooth = ndimage.gaussian_filter(out, [*sigma, sharpen_mm / spacing_mm, sharpen_mm / spacing_mm])
        out = out + np.float32(sharpen) * (out - smooth)
    return out.astype(np.float32)


@dataclass
class RenderedSeries:
    """Float image values on a grid with DICOM geometry, plus ground-truth label maps."""

    role: SeriesRole
    values: np.ndarray  # float32 [K, R, C]: HU, MR signal, or radiograph log-attenuation
    origin: np.ndarray  # ImagePositionPatient of slice 0 (nominal for the radiograph)
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]  # (between rows, between columns) in the patient plane
    slice_spacing: float
    slice_thickness: float
    labels: np.ndarray  # uint8, [K, R, C] (radiograph: [R, C])
    levels: np.ndarray
    acquisition: dict = field(default_factory=dict)  # protocol values the writer records

    @property
    def slice_normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    def as_volume(self) -> Volume:
        """The series as ingest would return it (without the DICOM round trip's quantisation)."""
        count = self.values.shape[0]
        return Volume(
            voxels=self.values.astype(np.float32),
            origin=np.asarray(self.origin, dtype=float),
            row_direction=np.asarray(self.row_direction, dtype=float),
            column_direction=np.asarray(self.column_direction, dtype=float),
            pixel_spacing=self.pixel_spacing,
            slice_offsets=np.arange(count, dtype=float) * self.slice_spacing,
            slice_thickness=self.slice_thickness or None,
            projection=self.role is SeriesRole.XR,
        )


# (centre, half size: one for every axis or one per axis) of a window in patient mm
Roi = tuple[np.ndarray, float | np.ndarray]


@dataclass
class Scene:
    spine: Spine
    tumor: Tumor | None

    def tissue_values(self) -> dict:
        return {**BASE_TISSUES, **(self.tumor.tissue_values() if self.tumor else {})}

    def paint(self, canvas: Canvas) -> None:
        paint_soft_tissue(canvas, self.spine)
        self.paint_inner(canvas)

    def paint_inner(self, canvas: Canvas) -> None:
        paint_skeleton(canvas, self.spine)
        if self.tumor is not None:
            paint_tumor(canvas, self.tumor, self.spine)


def _noise_factor(difficulty: float) -> float:
    return 0.7 + 0.8 * float(np.clip(difficulty, 0.0, 1.0))


def _spine_box(spine: Spine) -> tuple[np.ndarray, np.ndarray]:
    c1, t1 = spine.by_name["C1"], spine.by_name["T1"]
    z_top = c1.centre[2] + 14.0
    z_bottom = t1.centre[2] - t1.half[2] - 10.0
    centre = np.mean([v.centre for v in spine.vertebrae], axis=0)
    return centre, np.array([z_bottom, z_top])


def _check_real(real: bool, roi: Roi | None) -> None:
    if real and roi is not None:
        raise ValueError("a real-size matrix is rendered whole: it takes no roi window")


def _finer(grid: Grid, size: int, slice_step: float | None = None) -> Grid:
    """The real matrix over ``grid``'s field of view: ``size`` points across each in-plane axis (array axes 1
    and 2) about the same centre; along axis 0 the same slices, or slices every ``slice_step`` mm from the
    first one."""
    origin, steps, shape = grid.origin.astype(float), grid.steps.astype(float), list(grid.shape)
    for axis in (1, 2):
        centre = origin + steps[axis] * (shape[axis] - 1) / 2.0
        steps[axis] = steps[axis] * shape[axis] / size
        origin = centre - steps[axis] * (size - 1) / 2.0
        shape[axis] = size
    if slice_step is not None:
        length = float(np.abs(steps[0]).sum()) * (shape[0] - 1)
        steps[0] = steps[0] / np.abs(steps[0]).sum() * slice_step
        shape[0] = int(np.floor(length / slice_step + 1e-6)) + 1
    return Grid(origin, steps, (shape[0], shape[1], shape[2]))


def _onto(
    grid: Grid, fine: Grid, values: np.ndarray, labels: np.ndarray, levels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image values (linear), labels and levels (nearest) of ``grid`` on the finer grid."""
    return (
        grid.resample(values.astype(np.float32), fine, order=1),
        grid.resample(labels, fine, order=0),
        grid.resample(levels, fine, order=0),
    )


def _window(roi: Roi | None) -> tuple[np.ndarray, np.ndarray]:
    if roi is None:
        return np.full(3, -np.inf), np.full(3, np.inf)
    centre, half = roi
    return np.asarray(centre) - half, np.asarray(centre) + half


def acquire_ct(
    scene: Scene,
    rng: np.random.Generator,
    shift: Shift,
    difficulty: float,
    roi: Roi | None = None,
    real: bool = False,
    scanner: ScannerProfile | None = None,
) -> RenderedSeries:
    """An axial CT; with ``roi`` only the part of the same acquisition inside the window is rendered; with
    ``real`` a 512² matrix of 0.5 mm slices over the same field of view (and at least 152 mm of neck). A site's
    ``scanner`` composes its CT protocol with ``shift`` and applies its kernel."""
    _check_real(real, roi)
    protocol = scanner.ct if scanner is not None else None
    if protocol is not None:
        shift = protocol.compose(shift)
    spine = scene.spine
    spacing = float(rng.uniform(0.55, 0.75)) * shift.resolution
    matrix = int(round(256 / shift.resolution / 2)) * 2
    thickness = shift.thickness or float(rng.choice([1.5, 2.0, 2.5]))
    step = thickness if rng.random() < 0.75 else round(thickness * 0.8, 3)
    centre, (z_bottom, z_top) = _spine_box(spine)
    render_step = step
    if real:
        extra = max(0.0, REAL_CT_MIN_COVERAGE_MM - (z_top - z_bottom)) / 2.0
        z_bottom, z_top = z_bottom - extra, z_top + extra
        thickness, step, render_step = REAL_CT_THICKNESS_MM, REAL_CT_STEP_MM, REAL_CT_RENDER_STEP_MM
    count = int(np.ceil((z_top - z_bottom) / render_step)) + 1
    fov_centre = centre + np.array([rng.normal(0, 3), rng.uniform(5, 20), 0.0])
    origin = np.array(
        [fov_centre[0] - spacing * (matrix - 1) / 2, fov_centre[1] - spacing * (matrix - 1) / 2, z_bottom]
    )
    grid = Grid(
        origin, np.array([[0, 0, render_step], [0, spacing, 0], [spacing, 0, 0]], dtype=float), (count, matrix, matrix)
    ).crop(*_window(roi))
    origin = grid.origin
    canvas = Canvas(grid)
    scene.paint(canvas)
    noise = float(rng.uniform(10, 20)) * shift.noise * _noise_factor(difficulty)
    blur = (0.42 * thickness / render_step, 0.6, 0.6)
    hu = render_ct(canvas.tissue, canvas.level, spine, scene.tissue_values(), rng, blur, noise, shift.contrast)
    labels, levels = canvas.label, canvas.level
    acquisition = {
        "kvp": float(rng.choice([100.0, 120.0])),
        "kernel": str(rng.choice(["B30f", "STANDARD", "FC08"])),
        "noise": noise,
    }
    if protocol is not None:
        hu = protocol.filter(hu, spacing)
        acquisition["kernel"] = protocol.kernel_name or acquisition["kernel"]
    if real:
        fine = _finer(grid, REAL_CT_SIZE, REAL_CT_STEP_MM)
        hu, labels, levels = _onto(grid, fine, hu, labels, levels)
        hu += rng.standard_normal(hu.shape, dtype=np.float32) * np.float32(noise)
        origin, spacing = fine.origin, float(fine.steps[1, 1])
    return RenderedSeries(
        role=SeriesRole.CT,
        values=hu,
        origin=origin,
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        pixel_spacing=(spacing, spacing),
        slice_spacing=step,
        slice_thickness=thickness,
        labels=labels,
        levels=levels,
        acquisition=acquisition,
    )


def acquire_mr(
    scene: Scene,
    rng: np.random.Generator,
    shift: Shift,
    difficulty: float,
    roi: Roi | None = None,
    real: bool = False,
    scanner: ScannerProfile | None = None,
) -> tuple[RenderedSeries, RenderedSeries]:
    """Sagittal T1- and T2-weighted series on one grid (same slices, same frame of reference); with
    ``real`` a 512² matrix over the same field of view. A site's ``scanner`` composes its MR protocol with
    ``shift``, sets the field strength, mixes the weightings and applies its kernel."""
    _check_real(real, roi)
    protocol = scanner.mr if scanner is not None else None
    if protocol is not None:
        shift = protocol.compose(shift)
    spine = scene.spine
    spacing = float(rng.uniform(0.7, 0.9)) * shift.resolution
    matrix = int(round(256 / shift.resolution / 2)) * 2
    thickness = shift.thickness or 3.0
    step = round(thickness * 1.1, 3)
    count = int(rng.choice([11, 13, 15]))
    sub = 3
    centre, (z_bottom, z_top) = _spine_box(spine)
    x0 = centre[0] + rng.normal(0, 1.5) + step * (count - 1) / 2  # slice 0 is the patient's leftmost
    z0 = (z_top + z_bottom) / 2 + spacing * (matrix - 1) / 2 + rng.normal(0, 5)
    y0 = centre[1] + rng.uniform(0, 15) - spacing * (matrix - 1) / 2
    slices = Grid(
        np.array([x0, y0, z0]),
        np.array([[-step, 0, 0], [0, 0, -spacing], [0, spacing, 0]], dtype=float),
        (count, matrix, matrix),
    ).crop(*_window(roi))
    origin = slices.origin
    # Each slice is rendered as `sub` sub-slices across its thickness and averaged (partial volume).
    steps = slices.steps.copy()
    steps[0] /= sub
    grid = Grid(origin - steps[0], steps, (slices.shape[0] * sub, *slices.shape[1:]))
    canvas = Canvas(grid)
    scene.paint(canvas)
    labels = canvas.label[1::sub].copy()
    levels = canvas.level[1::sub].copy()
    noise = float(rng.uniform(10, 20)) * shift.noise * _noise_factor(difficulty)
    field_strength = float(rng.choice([1.5, 3.0]))
    tissue_values = scene.tissue_values()
    if scanner is not None:
        field_strength = scanner.mr_field_t or field_strength
        tissue_values = scanner.mr_tissue_values(tissue_values)
    out = []
    weightings = {
        SeriesRole.MR_T1: (1, {"tr": float(rng.uniform(450, 700)), "te": float(rng.uniform(8, 14)), "etl": 3}),
        SeriesRole.MR_T2: (
            2,
            {"tr": float(rng.uniform(2500, 4000)), "te": float(rng.uniform(90, 120)), "etl": int(rng.integers(12, 25))},
        ),
    }
    gains = []
    for role, (channel, params) in weightings.items():
        gains.append(float(rng.uniform(1.5, 3.0)))
        signal = render_mr(
            canvas.tissue,
            canvas.level,
            spine,
            tissue_values,
            rng,
            channel,
            sub,
            noise,
            gain=gains[-1],
            contrast=shift.contrast,
        )
        if protocol is not None:
            signal = protocol.filter(signal, spacing)
        out.append(
            RenderedSeries(
                role=role,
                values=signal,
                origin=origin,
                row_direction=np.array([0.0, 1.0, 0.0]),
                column_direction=np.array([0.0, 0.0, -1.0]),
                pixel_spacing=(spacing, spacing),
                slice_spacing=step,
                slice_thickness=thickness,
                labels=labels,
                levels=levels,
                acquisition={**params, "field_strength": field_strength, "noise": noise},
            )
        )
    if real:
        fine = _finer(slices, REAL_MR_SIZE)
        for index, gain in enumerate(gains):
            values, labels_fine, levels_fine = _onto(slices, fine, out[index].values, labels, levels)
            values = np.abs(values + rng.standard_normal(values.shape, dtype=np.float32) * np.float32(noise * gain))
            spacing_fine = (float(np.abs(fine.steps[1]).sum()), float(np.abs(fine.steps[2]).sum()))
            out[index] = dataclasses.replace(
                out[index],
                values=values,
                origin=fine.origin,
                pixel_spacing=spacing_fine,
                labels=labels_fine,
                levels=levels_fine,
            )
    return out[0], out[1]


# Priority of structures when a ray crosses several (the radiograph label is the highest).
_XR_PRIORITY = np.zeros(256, dtype=np.uint8)
for _rank, _label in enumerate(
    [
        Label.SOFT_TISSUE,
        Label.CSF,
        Label.CORD,
        Label.DISC,
        Label.POSTERIOR_ELEMENTS,
        Label.OPLL,
        Label.VERTEBRAL_BODY,
        Label.TUMOR,
    ],
    start=1,
):
    _XR_PRIORITY[int(_label)] = _rank
_XR_RANK_LABEL = np.zeros(16, dtype=np.uint8)
_XR_RANK_LABEL[_XR_PRIORITY[_XR_PRIORITY > 0]] = np.nonzero(_XR_PRIORITY)[0]


def acquire_xr(
    scene: Scene,
    rng: np.random.Generator,
    shift: Shift,
    difficulty: float,
    roi: Roi | None = None,
    real: bool = False,
    scanner: ScannerProfile | None = None,
) -> RenderedSeries:
    """A lateral radiograph: parallel projection along x, soft tissue integrated analytically. With
    ``roi`` only the window (in y and z) of the same radiograph is rendered. With ``real`` a 3072 × 2614
    detector at a fifth of the phantom's pixel spacing, centred where the phantom's image is: the spine's
    rays are summed at the phantom's spacing and interpolated, the soft tissue is exact on the fine grid,
    and quantum noise is that of the smaller pixels. A site's ``scanner`` composes its radiograph protocol
    with ``shift`` and applies its kernel (detector blur or edge enhancement)."""
    _check_real(real, roi)
    protocol = scanner.xr if scanner is not None else None
    if protocol is not None:
        shift = protocol.compose(shift)
    spine = scene.spine
    spacing = float(rng.uniform(0.5, 0.6)) * shift.resolution
    magnification = float(rng.uniform(1.08, 1.15))
    facing = str(rng.choice(["A", "P"]))  # PatientOrientation of the row direction
    centre, (z_bottom, z_top) = _spine_box(spine)
    z_top += 25.0
    z_bottom -= 15.0
    rows = int(np.ceil((z_top - z_bottom) / spacing))
    y_front = centre[1] - 45.0
    cols = int(np.ceil(150.0 / spacing))
    y_sign = 1.0 if facing == "P" else -1.0
    y_first = y_front if facing == "P" else y_front + spacing * (cols - 1)
    dx = 1.0
    half_x = 42.0
    xs = int(2 * half_x / dx) + 1
    lo, hi = _window(roi)
    lo[0], hi[0] = -np.inf, np.inf  # a projection sees the whole path
    grid = Grid(
        np.array([centre[0] - half_x, y_first, z_top]),
        np.array([[0, 0, -spacing], [0, y_sign * spacing, 0], [dx, 0, 0]], dtype=float),
        (rows, cols, xs),
    ).crop(lo, hi)
    rows, cols, _ = grid.shape
    origin = grid.origin
    canvas = Canvas(grid)
    paint_soft_tissue(canvas, spine)
    base = canvas.tissue.copy()
    scene.paint_inner(canvas)
    mu = mu_table(scene.tissue_values())
    # Σ μ dx = analytic soft tissue + (what the spine region adds over the soft tissue it replaced)
    zz = origin[2] - spacing * np.arange(rows)
    yy = origin[1] + y_sign * spacing * np.arange(cols)
    fat, muscle, _ = neck_chords(spine, yy[None, :], zz[:, None])
    soft = mu[int(Tissue.FAT)] * fat + mu[int(Tissue.MUSCLE)] * muscle
    extra = (mu[canvas.tissue] - mu[base]).sum(axis=2) * dx
    # Highest-priority structure along each ray; where two vertebrae overlap, the upper one (its
    # inferior endplate is what a Cobb angle is measured on).
    best = (_XR_PRIORITY[canvas.label].astype(np.uint16) * 16 + (15 - canvas.level)).max(axis=2)
    labels = _XR_RANK_LABEL[best // 16]
    levels = np.where(labels > 0, 15 - best % 16, 0).astype(np.uint8)
    noise = float(rng.uniform(0.6, 1.2)) * shift.noise * _noise_factor(difficulty)
    pixel, noise_px, blur_px, scatter_px, factor = spacing, noise, 0.7, 30.0, 1
    if real:
        steps = grid.steps * np.array([[REAL_XR_SPACING_RATIO], [REAL_XR_SPACING_RATIO], [1.0]])
        middle = origin + grid.steps[0] * (rows - 1) / 2.0 + grid.steps[1] * (cols - 1) / 2.0
        start = middle - steps[0] * (REAL_XR_SHAPE[0] - 1) / 2.0 - steps[1] * (REAL_XR_SHAPE[1] - 1) / 2.0
        fine = Grid(start, steps, (*REAL_XR_SHAPE, 1))
        plane = Grid(origin, grid.steps, (rows, cols, 1))
        extra = plane.resample(extra[..., None].astype(np.float32), fine, order=1, mode="constant")[..., 0]
        labels = plane.resample(labels[..., None], fine, order=0, mode="constant")[..., 0]
        levels = plane.resample(levels[..., None], fine, order=0, mode="constant")[..., 0]
        origin, rows, cols = fine.origin, fine.shape[0], fine.shape[1]
        pixel = spacing * REAL_XR_SPACING_RATIO
        zz = origin[2] - pixel * np.arange(rows)
        yy = origin[1] + y_sign * pixel * np.arange(cols)
        fat, muscle, _ = neck_chords(spine, yy[None, :], zz[:, None])
        soft = mu[int(Tissue.FAT)] * fat + mu[int(Tissue.MUSCLE)] * muscle
        # a fifth of the spacing: 1/25 of the photons per pixel; the broad blurs keep their size in mm
        noise_px, blur_px, scatter_px = noise / REAL_XR_SPACING_RATIO, 1.0, 30.0 / REAL_XR_SPACING_RATIO
        factor = int(round(1.0 / REAL_XR_SPACING_RATIO))
    path = soft + extra
    image = render_xr(
        path.astype(np.float32),
        rng,
        noise_px,
        scatter=float(rng.uniform(0.15, 0.4)),
        blur_px=blur_px,
        equalise_px=20.0 / pixel,
        contrast=shift.contrast,
        scatter_px=scatter_px,
        broad_factor=factor,
    )
    if protocol is not None:
        image = protocol.filter(image, pixel)
    labels[(labels == Label.BACKGROUND) & ((fat + muscle) > 0)] = Label.SOFT_TISSUE
    return RenderedSeries(
        role=SeriesRole.XR,
        values=image[None],
        origin=np.array([0.0, 0.0, 0.0]),
        row_direction=np.array([0.0, y_sign, 0.0]),
        column_direction=np.array([0.0, 0.0, -1.0]),
        pixel_spacing=(pixel, pixel),
        slice_spacing=0.0,
        slice_thickness=0.0,
        labels=labels,
        levels=levels,
        acquisition={
            "magnification": magnification,
            "facing": facing,
            "kvp": float(rng.choice([70.0, 75.0, 80.0])),
            "sid_mm": 1800.0,
            "monochrome1": bool(rng.random() < 0.3),
            "projection_origin": origin.tolist(),
        },
    )
