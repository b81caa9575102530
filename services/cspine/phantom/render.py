"""Turn painted tissues into SYNTHETIC image values: CT in HU, T1-/T2-like MR signal, radiograph log-attenuation.

Each renderer adds what a scanner would: partial-volume blur, texture, noise (Gaussian for CT, Rician for
MR, quantum-like for radiographs), MR coil bias, radiograph scatter. Values are floats; the DICOM writer
quantises them.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from cspine.phantom.anatomy import Spine, Tissue

# tissue: (CT HU, T1 signal, T2 signal); MR signals on a 0–1000 scale before gain.
BASE_TISSUES: dict[Tissue, tuple[float, float, float]] = {
    Tissue.AIR: (-1000.0, 0.0, 0.0),
    Tissue.FAT: (-100.0, 900.0, 680.0),
    Tissue.MUSCLE: (50.0, 380.0, 190.0),
    Tissue.CORTICAL: (1300.0, 40.0, 30.0),
    Tissue.CANCELLOUS: (280.0, 600.0, 380.0),
    Tissue.POSTERIOR_BONE: (750.0, 250.0, 180.0),
    Tissue.DISC_ANNULUS: (90.0, 280.0, 200.0),
    Tissue.DISC_NUCLEUS: (75.0, 300.0, 850.0),
    Tissue.CSF: (8.0, 150.0, 980.0),
    Tissue.CORD: (35.0, 450.0, 470.0),
    Tissue.OPLL: (1100.0, 50.0, 40.0),
    Tissue.EDEMA: (240.0, 300.0, 760.0),
}
# Texture (standard deviation of smooth spatial variation) per tissue: CT HU, MR fraction of the signal.
_TEXTURE = {
    Tissue.CANCELLOUS: (45.0, 0.08),
    Tissue.MUSCLE: (8.0, 0.06),
    Tissue.FAT: (10.0, 0.04),
    Tissue.TUMOR_SOLID: (15.0, 0.08),
    Tissue.EDEMA: (20.0, 0.08),
}

WATER_MU_PER_MM = 0.0195  # linear attenuation of water near 60 keV


def lookup(tissue_values: dict[Tissue, tuple[float, float, float]], channel: int) -> np.ndarray:
    """A 256-entry table tissue code → value for channel 0 (CT), 1 (T1) or 2 (T2)."""
    table = np.zeros(256, dtype=np.float32)
    for t, values in tissue_values.items():
        table[int(t)] = values[channel]
    return table


def _values(tissue: np.ndarray, level: np.ndarray, channel: int, tissue_values: dict, spine: Spine) -> np.ndarray:
    """Per-voxel values with disc degeneration applied (dark, low nucleus on T2)."""
    out = lookup(tissue_values, channel)[tissue]
    nucleus = tissue == Tissue.DISC_NUCLEUS
    if nucleus.any():
        degeneration = np.zeros(256, dtype=np.float32)
        for d in spine.discs:
            degeneration[d.upper.code] = d.degeneration
        g = degeneration[level[nucleus]]
        annulus = tissue_values[Tissue.DISC_ANNULUS][channel]
        out[nucleus] = (1 - g) * out[nucleus] + g * annulus
    return out


def _texture(tissue: np.ndarray, rng: np.random.Generator, channel: int, base: np.ndarray) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(tissue.shape).astype(np.float32), 1.2)
    field /= max(float(field.std()), 1e-6)
    amp = np.zeros(256, dtype=np.float32)
    for t, (ct, mr) in _TEXTURE.items():
        amp[int(t)] = ct if channel == 0 else mr
    amp_vox = amp[tissue]
    return base + field * (amp_vox if channel == 0 else amp_vox * np.abs(base))


def render_ct(
    tissue: np.ndarray,
    level: np.ndarray,
    spine: Spine,
    tissue_values: dict,
    rng: np.random.Generator,
    blur_vox: tuple[float, float, float],
    noise_hu: float,
    contrast: float = 1.0,
) -> np.ndarray:
    """HU volume [k, i, j] from tissue codes; ``blur_vox`` is the partial-volume blur per axis in voxels."""
    hu = _values(tissue, level, 0, tissue_values, spine)
    hu = _texture(tissue, rng, 0, hu)
    hu = ndimage.gaussian_filter(hu, blur_vox)
    noise = ndimage.gaussian_filter(rng.standard_normal(hu.shape).astype(np.float32), (0, 0.6, 0.6))
    hu += noise * (noise_hu / max(float(noise.std()), 1e-6))
    if contrast != 1.0:
        hu = (hu - 40.0) * contrast + 40.0
    return hu


def render_mr(
    tissue_sub: np.ndarray,
    level_sub: np.ndarray,
    spine: Spine,
    tissue_values: dict,
    rng: np.random.Generator,
    channel: int,
    subsamples: int,
    noise: float,
    gain: float,
    contrast: float = 1.0,
) -> np.ndarray:
    """MR signal [k, i, j]; the input has ``subsamples`` sub-slices per slice, averaged for slice thickness."""
    signal = _values(tissue_sub, level_sub, channel, tissue_values, spine)
    signal = _texture(tissue_sub, rng, channel, signal)
    k = signal.shape[0] // subsamples
    signal = signal.reshape(k, subsamples, *signal.shape[1:]).mean(axis=1)
    signal = ndimage.gaussian_filter(signal, (0, 0.5, 0.5))
    if contrast != 1.0:
        mean = float(signal[signal > 50].mean()) if (signal > 50).any() else 0.0
        signal = np.clip((signal - mean) * contrast + mean, 0, None)
    # Coil sensitivity: a smooth multiplicative field, strongest near the posterior (surface coil).
    _, rows, cols = signal.shape
    ii, jj = np.meshgrid(np.linspace(-1, 1, rows), np.linspace(-1, 1, cols), indexing="ij")
    bias = 1.0 + 0.25 * jj * rng.uniform(0.5, 1.0) + 0.1 * ii * rng.normal() + 0.05 * rng.normal() * ii * jj
    signal = signal * bias[None].astype(np.float32)
    n1 = rng.standard_normal(signal.shape).astype(np.float32) * noise
    n2 = rng.standard_normal(signal.shape).astype(np.float32) * noise
    return np.sqrt((signal + n1) ** 2 + n2**2) * gain  # Rician magnitude


def mu_table(tissue_values: dict) -> np.ndarray:
    """Linear attenuation per mm by tissue code, from the CT numbers.

    Above ~100 HU the photoelectric effect of calcium at radiographic energies makes bone attenuate more
    than its CT number alone says: cortical bone ends near 4× water, cancellous near 1.4×."""
    hu = lookup(tissue_values, 0)
    mu = WATER_MU_PER_MM * np.clip(1.0 + hu / 1000.0, 0.0, None)
    mu *= 1.0 + 0.6 * np.clip(hu - 100.0, 0.0, None) / 1000.0
    return mu.astype(np.float32)


def _broad_blur(image: np.ndarray, sigma_px: float, factor: int) -> np.ndarray:
    """A wide Gaussian blur; with ``factor`` > 1 computed on the image reduced by block means of that many
    pixels and interpolated back (a 150-pixel blur of a 3000² detector image costs seconds otherwise)."""
    if factor <= 1:
        return ndimage.gaussian_filter(image, sigma_px)
    rows, cols = image.shape
    padded = np.pad(image, ((0, -rows % factor), (0, -cols % factor)), mode="edge")
    reduced = padded.reshape(padded.shape[0] // factor, factor, -1, factor).mean(axis=(1, 3))
    smooth = ndimage.gaussian_filter(reduced, sigma_px / factor)
    centre = (factor - 1) / 2.0  # block b's mean sits at pixel b * factor + centre
    return ndimage.affine_transform(
        smooth,
        np.full(2, 1.0 / factor),
        offset=np.full(2, -centre / factor),
        output_shape=image.shape,
        order=1,
        mode="nearest",
        prefilter=False,
    ).astype(image.dtype)


def render_xr(
    path: np.ndarray,
    rng: np.random.Generator,
    noise: float,
    scatter: float,
    blur_px: float,
    equalise_px: float,
    contrast: float = 1.0,
    scatter_px: float = 30.0,
    broad_factor: int = 1,
) -> np.ndarray:
    """A processed radiograph ("for presentation") from line integrals Σ μ Δx.

    Scatter and detector blur act on intensities; quantum noise grows where few photons arrive; then, as
    radiograph processing does, a broad unsharp mask compresses the dynamic range (neck vs shoulders) so
    bone detail stays visible. Larger values mean more attenuation (bone bright in MONOCHROME2). The two
    broad blurs (scatter, unsharp mask) run on an image reduced ``broad_factor`` times (real detector sizes).
    """
    primary = np.exp(-path)
    scattered = scatter * _broad_blur(primary, scatter_px, broad_factor)
    intensity = ndimage.gaussian_filter(primary + scattered, blur_px)
    photons = 2.0e4 / max(noise, 1e-3) ** 2
    intensity = intensity + rng.standard_normal(intensity.shape) * np.sqrt(np.clip(intensity, 1e-6, None) / photons)
    image = -np.log(np.clip(intensity, 1e-5, None))
    image = image - 0.75 * _broad_blur(image, equalise_px, broad_factor)
    if contrast != 1.0:
        image = (image - image.mean()) * contrast + image.mean()
    return image.astype(np.float32)
