"""Phantom → DICOM → ingest gives back the phantom: voxel values within rescale precision, spacing,
positions and directions; the file order does not matter; selection picks every role."""

from __future__ import annotations

import random

import numpy as np
import pytest

from cspine.dicom.ingest import ingest, ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality, Orientation, SeriesRole
from cspine.phantom.writer import CT_STORAGE, mr_scale


def _only_volume(study):
    [series] = study.image_series()
    return series, series.volume


@pytest.mark.parametrize("name", ["benign", "malignant", "none"])
def test_ct_round_trip_gives_back_hu_spacing_and_positions(phantom_cases, name):
    case = phantom_cases[name]
    rendered = case.case.series[SeriesRole.CT]
    series, volume = _only_volume(ingest_paths([case.path / "ct"]))
    assert series.modality is Modality.CT and series.orientation is Orientation.AXIAL
    assert volume.shape == rendered.values.shape
    signed, bits, intercept, slope = CT_STORAGE[case.case.ct_storage]
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    representable = (rendered.values > intercept + slope * lo) & (rendered.values < intercept + slope * hi)
    error = np.abs(volume.voxels - rendered.values)[representable]
    assert error.max() <= slope / 2 + 1e-3
    assert np.allclose(volume.origin, rendered.origin, atol=1e-3)
    assert volume.pixel_spacing == pytest.approx(rendered.pixel_spacing, abs=1e-5)
    assert np.allclose(volume.slice_offsets, np.arange(volume.shape[0]) * rendered.slice_spacing, atol=1e-3)
    assert np.allclose(volume.row_direction, rendered.row_direction)
    assert np.allclose(volume.column_direction, rendered.column_direction)
    assert volume.slice_thickness == pytest.approx(rendered.slice_thickness)


def test_shuffled_files_give_the_same_volume(phantom_cases):
    case = phantom_cases["malignant"]
    files = case.files("ct") + case.files("mr_t1")
    items = [(str(p), p.read_bytes()) for p in files]
    reference = ingest(items)
    random.Random(4).shuffle(items)
    shuffled = ingest(items)
    for a, b in zip(reference.image_series(), shuffled.image_series(), strict=True):
        assert a.series_instance_uid == b.series_instance_uid
        assert np.array_equal(a.volume.voxels, b.volume.voxels)
        assert np.array_equal(a.volume.slice_offsets, b.volume.slice_offsets)
        assert [r.sop_instance_uid for r in a.instances] == [r.sop_instance_uid for r in b.instances]


@pytest.mark.parametrize("role", [SeriesRole.MR_T1, SeriesRole.MR_T2])
def test_mr_round_trip_gives_back_signal_and_sagittal_geometry(phantom_cases, role):
    case = phantom_cases["borderline"]
    rendered = case.case.series[role]
    study = ingest_paths(case.files(role.value))
    series, volume = _only_volume(study)
    assert series.orientation is Orientation.SAGITTAL
    bits = case.case.mr_bits[role]
    expected = rendered.values * mr_scale(rendered.values, bits)
    unclipped = expected < 2**bits - 1
    assert np.abs(volume.voxels - expected)[unclipped].max() <= 0.5 + 1e-3
    assert np.allclose(volume.origin, rendered.origin, atol=1e-3)
    assert np.allclose(volume.slice_offsets, np.arange(volume.shape[0]) * rendered.slice_spacing, atol=1e-3)
    assert np.allclose(volume.slice_direction, [-1.0, 0.0, 0.0])
    assert series.echo_time_ms == pytest.approx(rendered.acquisition["te"], abs=1e-3)


def test_radiograph_round_trip_gives_back_the_image_and_patient_plane_spacing(phantom_cases):
    for case in phantom_cases.values():
        rendered = case.case.series[SeriesRole.XR]
        series, volume = _only_volume(ingest_paths(case.files("xr")))
        assert series.modality is Modality.XR and volume.projection
        assert volume.pixel_spacing == pytest.approx(rendered.pixel_spacing, abs=1e-5)
        image = rendered.values[0]
        lo, hi = np.percentile(image, [0.5, 99.8])
        expected = np.clip(np.rint((image - lo) / (hi - lo) * 4095), 0, 4095)
        # MONOCHROME1 comes back inverted: bone is bright whatever the file's photometric interpretation.
        assert np.array_equal(volume.voxels[0], expected.astype(np.float32))
        facing = rendered.acquisition["facing"]
        assert np.allclose(volume.row_direction, [0.0, -1.0 if facing == "A" else 1.0, 0.0])
        assert np.allclose(volume.column_direction, [0.0, 0.0, -1.0])


def test_a_whole_phantom_study_fills_every_role_without_notices(phantom_cases):
    case = phantom_cases["benign"]
    study = ingest_paths([case.path / folder for folder in ("ct", "mr", "xr")])
    assert study.study_instance_uid == case.truth["study_instance_uid"]
    selection = select_series(study)
    chosen = {role: s.series_instance_uid for role, s in selection.chosen.items()}
    assert chosen == {
        SeriesRole.CT: case.truth["series"]["ct"]["series_instance_uid"],
        SeriesRole.MR_T1: case.truth["series"]["mr_t1"]["series_instance_uid"],
        SeriesRole.MR_T2: case.truth["series"]["mr_t2"]["series_instance_uid"],
        SeriesRole.XR: case.truth["series"]["xr"]["series_instance_uid"],
    }
    assert study.notices == [] and selection.notices == []
