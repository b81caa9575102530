"""Real matrix sizes (a 3072 × 2614 radiograph, a 512² × 305-slice CT) go through preprocessing and the
measure path on the bounded model grid and give the measurements the phantom-size study of the same
SYNTHETIC case gives. The phantom's own label maps stand in for the segmentation models (resampled onto the
model grid the way the models' output lies there), so the test needs no Triton and checks the geometry:
model grid, slabs, measurement volume and patient millimetres. Timings are `cspine bench pipeline --matrix
real`'s, not asserted here."""

from __future__ import annotations

import numpy as np
import pytest

from cspine.analysis.lesions import clean_grid_labels, measure_lesions
from cspine.analysis.spine import measure_spine
from cspine.domain import MEASURED_LEVELS, Modality, SeriesRole
from cspine.imaging.seg_input import SourceLabelMaps, seg_inputs, to_grid
from cspine.inference.specs import SEG_GEOMETRY, SEG_LABELS
from cspine.modeling.data import model_labels
from cspine.phantom.generate import PhantomOptions, build_case
from cspine.phantom.scanner import REAL_CT_SIZE, REAL_XR_SHAPE, acquire_ct, acquire_xr
from cspine.phantom.truth import spine_truth

SEED, INDEX = 23, 0


def _measure(modality, rendered):
    """The pipeline's measure path on the model grid of ``rendered``, with its truth labels as the model's."""
    volume = rendered.as_volume()
    structure, levels = rendered.labels, rendered.levels
    if modality is Modality.XR:
        structure, levels = structure[None], levels[None]
    truth = model_labels(modality, structure, levels)
    inputs, grid = seg_inputs(modality, volume)
    labels = clean_grid_labels(modality, to_grid(truth, grid, order=0, fill=0), grid, volume)
    on_grid = grid.volume(volume, labels)
    spine = measure_spine(modality, labels, on_grid, volume)
    tumor = SEG_LABELS[modality].index("tumor")
    lesions = measure_lesions(labels == tumor, on_grid, spine.frame, "uid")
    role = SeriesRole.CT if modality is Modality.CT else SeriesRole.XR
    source = SourceLabelMaps({role: (labels, grid)})[role]
    return {
        "volume": volume,
        "inputs": inputs,
        "on_grid": on_grid,
        "source_labels": source,
        "truth": truth,
        "levels": spine.levels,
        "cobb": spine.cobb_angle_deg,
        "opll": spine.opll,
        "lesion": lesions[0],
    }


@pytest.fixture(scope="module")
def measured():
    """One SYNTHETIC case (a malignant tumor, OPLL) measured from its phantom-size and its real-size CT and
    radiograph; the real series are acquired from the same scene with the same random streams."""
    case = build_case("real", SEED, INDEX, PhantomOptions(modalities=("ct", "xr"), tumor="malignant", opll="yes"))
    _, ct_ss, _, xr_ss, _ = np.random.SeedSequence([SEED, INDEX]).spawn(5)
    options = case.options
    real = {
        Modality.CT: acquire_ct(case.scene, np.random.default_rng(ct_ss), options.shift, options.difficulty, real=True),
        Modality.XR: acquire_xr(case.scene, np.random.default_rng(xr_ss), options.shift, options.difficulty, real=True),
    }
    phantom = {Modality.CT: case.series[SeriesRole.CT], Modality.XR: case.series[SeriesRole.XR]}
    out = {}
    for size, series in (("phantom", phantom), ("real", real)):
        out[size] = {m: _measure(m, rendered) | {"rendered": rendered} for m, rendered in series.items()}
    return case, out, spine_truth(case.scene)


def test_real_size_series_have_real_matrices_and_measure_on_a_bounded_grid(measured):
    _, out, _ = measured
    ct, xr = out["real"][Modality.CT], out["real"][Modality.XR]
    assert ct["volume"].shape[1:] == (REAL_CT_SIZE, REAL_CT_SIZE) and ct["volume"].shape[0] >= 300
    assert ct["volume"].slice_spacing == pytest.approx(0.5)
    assert xr["volume"].shape == (1, *REAL_XR_SHAPE) and xr["volume"].pixel_spacing[0] < 0.15
    size = SEG_GEOMETRY[Modality.CT].size
    # the CT's 0.5 mm slices are segmented and measured as 2 mm slabs on the 160² model grid: 40× fewer voxels
    assert ct["on_grid"].shape == (-(-ct["volume"].shape[0] // 4), size, size)
    assert ct["on_grid"].slice_spacing == pytest.approx(2.0)
    assert ct["inputs"].shape[0] == ct["on_grid"].shape[0]
    assert ct["on_grid"].voxels.size * 40 < ct["volume"].voxels.size
    assert xr["on_grid"].shape == (1, SEG_GEOMETRY[Modality.XR].size, SEG_GEOMETRY[Modality.XR].size)
    assert xr["on_grid"].pixel_spacing == (SEG_GEOMETRY[Modality.XR].spacing_mm,) * 2
    # the source-grid label map (DICOM SEG) is made on demand, on the source series' grid
    assert ct["source_labels"].shape == ct["volume"].shape
    tumor = SEG_LABELS[Modality.CT].index("tumor")
    source_tumor = (ct["source_labels"] == tumor).sum() * np.prod(ct["volume"].spacing)
    truth_tumor = (ct["truth"] == tumor).sum() * np.prod(ct["volume"].spacing)
    assert source_tumor == pytest.approx(truth_tumor, rel=0.15)


def test_real_size_ct_measures_as_the_phantom_size_ct(measured):
    case, out, _ = measured
    small, real = out["phantom"][Modality.CT], out["real"][Modality.CT]
    a, b = small["lesion"], real["lesion"]
    # tolerances: about one model voxel (1 mm in-plane, 1.5–2.5 mm slices) on sizes and positions
    assert b.vertebral_level == a.vertebral_level == case.lesion["primary_level"]
    assert b.volume_ml == pytest.approx(a.volume_ml, rel=0.10)
    assert b.max_diameter_mm == pytest.approx(a.max_diameter_mm, abs=2.0)
    assert np.linalg.norm(np.subtract(b.centre_mm, a.centre_mm)) < 1.5
    assert np.linalg.norm(np.subtract(b.centre_mm, case.lesion["centre_mm"])) < 2.0  # patient mm, not pixels
    for level in MEASURED_LEVELS:
        assert real["levels"][level].canal_area_mm2 == pytest.approx(small["levels"][level].canal_area_mm2, rel=0.05)
    assert real["opll"].present == small["opll"].present


def test_real_size_radiograph_measures_as_the_phantom_size_radiograph(measured):
    _, out, truth = measured
    small, real = out["phantom"][Modality.XR], out["real"][Modality.XR]
    # the Cobb angle's edge lines move with single pixels of the two bodies' outlines: within 2° of each
    # other, and within the 4° of the truth the method keeps on the phantom's own labels (test_analysis.py)
    assert real["cobb"] == pytest.approx(small["cobb"], abs=2.0)
    assert real["cobb"] == pytest.approx(truth["cobb_angle_c2_c7_deg"], abs=4.0)
    for level in MEASURED_LEVELS:
        found = small["levels"].get(level)
        if found is not None and found.disc_height_mm is not None:
            assert real["levels"][level].disc_height_mm == pytest.approx(found.disc_height_mm, abs=0.5), level
    a, b = small["lesion"], real["lesion"]
    assert b.vertebral_level == a.vertebral_level
    assert b.area_mm2 == pytest.approx(a.area_mm2, rel=0.10)
    # a radiograph's points lie in its own image plane: the same patient point once its origin is added
    patient = {
        size: np.add(lesion.centre_mm, out[size][Modality.XR]["rendered"].acquisition["projection_origin"])
        for size, lesion in (("phantom", a), ("real", b))
    }
    assert np.linalg.norm(patient["real"][1:] - patient["phantom"][1:]) < 1.0
