"""Lesion regions of interest for the embedding network: three 64 × 64 planes at 1 mm through the
lesion centre, in canonical patient orientations whatever the acquisition plane.

- CT: axial, coronal and sagittal planes of the CT volume.
- MR: sagittal T1, sagittal T2 and axial T2 (a missing contrast leaves zeros).
- Radiograph: the image plane (the lateral view is a sagittal projection), then zeros.

Planes are drawn with anterior or superior up-left as a radiologist reads them: axial columns run
toward the patient's left and rows toward posterior; sagittal columns toward posterior, rows toward the
feet; coronal columns toward the left, rows toward the feet. CT keeps absolute HU (fixed window); MR and
radiographs are normalised within the region, since their units are arbitrary.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cspine.domain import Modality, SeriesRole, Volume
from cspine.imaging.normalize import ct_normalise, mr_normalise, xr_normalise
from cspine.imaging.sampling import sample
from cspine.inference.specs import MODALITY_ORDER, ROI_CHANNELS, ROI_SIZE, ROI_SPACING_MM

_X, _Y, _Z = np.eye(3)
PLANES = {  # plane: (column direction, row direction) in patient space
    "axial": (_X, _Y),
    "coronal": (_X, -_Z),
    "sagittal": (_Y, -_Z),
}


def sample_plane(
    volume: Volume,
    centre_mm: np.ndarray,
    plane: str,
    size: int = ROI_SIZE,
    spacing_mm: float = ROI_SPACING_MM,
    cval: float = 0.0,
    mode: str = "constant",
) -> np.ndarray:
    """A ``size`` × ``size`` plane of ``volume`` at ``spacing_mm``, centred on ``centre_mm`` (patient)."""
    u, v = PLANES[plane]
    offsets = (np.arange(size) - (size - 1) / 2.0) * spacing_mm
    points = np.asarray(centre_mm, dtype=float) + offsets[:, None, None] * v + offsets[None, :, None] * u
    return sample(volume, points, order=1, cval=cval, mode=mode).astype(np.float32)


def _ct(volumes: Mapping[SeriesRole, Volume], centre: np.ndarray) -> list[np.ndarray]:
    ct = volumes[SeriesRole.CT]
    return [ct_normalise(sample_plane(ct, centre, p, cval=-1000.0)) for p in ("axial", "coronal", "sagittal")]


def _mr(volumes: Mapping[SeriesRole, Volume], centre: np.ndarray) -> list[np.ndarray]:
    blank = np.zeros((ROI_SIZE, ROI_SIZE), dtype=np.float32)
    t1, t2 = volumes.get(SeriesRole.MR_T1), volumes.get(SeriesRole.MR_T2)
    planes = [sample_plane(t1, centre, "sagittal") if t1 is not None else None]
    planes += [sample_plane(t2, centre, p) if t2 is not None else None for p in ("sagittal", "axial")]
    reference = {0: planes[0], 1: planes[1], 2: planes[1]}
    return [blank if p is None else mr_normalise(p, reference[i]) for i, p in enumerate(planes)]


def _xr(volumes: Mapping[SeriesRole, Volume], centre: np.ndarray) -> list[np.ndarray]:
    xr = volumes[SeriesRole.XR]
    image = sample_plane(xr, centre, "sagittal", mode="nearest")
    blank = np.zeros_like(image)
    return [xr_normalise(image), blank, blank]


_BUILDERS = {Modality.CT: _ct, Modality.MR: _mr, Modality.XR: _xr}


def lesion_roi(modality: Modality, volumes: Mapping[SeriesRole, Volume], centre_mm: np.ndarray) -> np.ndarray:
    """The [3, 64, 64] float32 region of interest of one modality around a lesion centre (patient mm;
    for a radiograph, in the radiograph volume's own nominal geometry)."""
    planes = _BUILDERS[modality](volumes, np.asarray(centre_mm, dtype=float))
    roi = np.stack(planes).astype(np.float32)
    assert roi.shape == (ROI_CHANNELS, ROI_SIZE, ROI_SIZE)
    return roi


def modality_one_hot(modality: Modality) -> np.ndarray:
    one_hot = np.zeros(len(MODALITY_ORDER), dtype=np.float32)
    one_hot[MODALITY_ORDER.index(modality)] = 1.0
    return one_hot
