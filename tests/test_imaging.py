"""Preprocessing: the model grid maps back onto the source grid, 2.5D stacks hold the right neighbours,
ROI planes come out in canonical patient orientation whatever the acquisition, normalisation is robust."""

from __future__ import annotations

import numpy as np
import pytest

from cspine.domain import Modality, SeriesRole, Volume
from cspine.imaging.normalize import ct_normalise, mr_normalise, xr_normalise
from cspine.imaging.roi import lesion_roi, sample_plane
from cspine.imaging.sampling import patient_to_index
from cspine.imaging.seg_input import seg_grid, seg_inputs, stack_context, to_grid, to_source
from cspine.inference.specs import SEG_GEOMETRY


def _volume(
    voxels: np.ndarray, row=(1.0, 0, 0), column=(0, 1.0, 0), spacing=(0.5, 0.5), step=2.0, origin=(-40.0, -30.0, 100.0)
) -> Volume:
    return Volume(
        voxels=voxels.astype(np.float32),
        origin=np.array(origin),
        row_direction=np.array(row, dtype=float),
        column_direction=np.array(column, dtype=float),
        pixel_spacing=spacing,
        slice_offsets=np.arange(voxels.shape[0]) * step,
    )


def test_patient_to_index_inverts_index_to_patient_with_irregular_slices():
    volume = _volume(np.zeros((4, 10, 12)))
    volume.slice_offsets = np.array([0.0, 2.0, 5.0, 6.0])
    kij = np.array([[0.0, 3.0, 4.0], [2.5, 1.0, 7.0], [3.0, 9.0, 11.0]])
    assert np.allclose(patient_to_index(volume, volume.index_to_patient(kij)), kij)


def test_labels_resampled_to_the_model_grid_come_back_onto_the_source_grid():
    labels = np.zeros((3, 300, 280), dtype=np.uint8)
    labels[:, 100:180, 90:200] = 2
    labels[1, 140:150, 120:130] = 5
    volume = _volume(np.where(labels > 0, 300.0, 0.0), spacing=(0.6, 0.6))
    grid = seg_grid(Modality.CT, volume)
    back = to_source(to_grid(labels, grid, order=0, fill=0), grid)
    # at 1 mm model pixels against 0.6 mm source pixels, only boundary pixels may differ
    assert back.shape == labels.shape
    assert np.mean(back == labels) > 0.99
    assert (back[1, 142:148, 122:128] == 5).all()


def test_thin_ct_slices_are_averaged_in_slabs_placed_at_their_mean_position_and_map_back():
    voxels = np.zeros((10, 300, 300))
    voxels[:, 100:200, 100:200] = 300.0
    voxels[4:8, 140:160, 140:160] = 1300.0  # 2 mm of dense bone: exactly the second 2 mm slab
    volume = _volume(voxels, spacing=(0.3, 0.3), step=0.5)
    grid = seg_grid(Modality.CT, volume)
    assert grid.slab == 4 and grid.shape == (3, SEG_GEOMETRY[Modality.CT].size, SEG_GEOMETRY[Modality.CT].size)
    inputs, _ = seg_inputs(Modality.CT, volume)
    centre = SEG_GEOMETRY[Modality.CT].size // 2
    assert inputs.shape[0] == 3 and inputs[1, 1, centre, centre] == pytest.approx(1.3, abs=1e-3)
    assert inputs[0, 1, centre, centre] == pytest.approx(0.3, abs=1e-3)  # slices 0 … 3
    assert inputs[0, 2, centre, centre] == pytest.approx(1.3, abs=1e-3)  # its context: the next slab
    on_grid = grid.volume(volume, np.zeros(grid.shape, dtype=np.uint8))
    positions = volume.index_to_patient(np.column_stack([np.arange(10), np.full(10, 150.0), np.full(10, 150.0)]))
    mean_of_second_slab = positions[4:8].mean(axis=0)
    found = on_grid.index_to_patient(
        np.array([[1.0, (150.0 - grid.row0) / grid.step_rows, (150.0 - grid.col0) / grid.step_cols]])
    )
    assert np.allclose(found[0], mean_of_second_slab, atol=1e-6)
    labels = np.zeros(volume.shape, dtype=np.uint8)
    labels[4:8, 120:180, 120:180] = 4
    back = to_source(to_grid(labels, grid, order=0, fill=0), grid)
    assert back.shape == labels.shape and np.mean(back == labels) > 0.99


def test_ct_model_grid_is_centred_on_the_body_not_the_field_of_view():
    voxels = np.full((4, 256, 256), -1000.0)
    voxels[:, 150:230, 30:110] = 40.0  # the body lies off-centre
    grid = seg_grid(Modality.CT, _volume(voxels))
    centre_row = grid.row0 + (grid.size - 1) / 2 * grid.step_rows
    centre_col = grid.col0 + (grid.size - 1) / 2 * grid.step_cols
    assert centre_row == pytest.approx(189.5, abs=0.5) and centre_col == pytest.approx(69.5, abs=0.5)


def test_seg_inputs_stack_each_slice_with_its_neighbours():
    voxels = np.stack([np.full((200, 200), 100.0 * k) for k in range(5)])
    inputs, _ = seg_inputs(Modality.CT, _volume(voxels))
    g = SEG_GEOMETRY[Modality.CT]
    assert inputs.shape == (5, 3, g.size, g.size)
    centre = (g.size // 2, g.size // 2)
    assert [float(inputs[0, c][centre]) for c in range(3)] == pytest.approx([0.0, 0.0, 0.1])  # edge repeated
    assert [float(inputs[3, c][centre]) for c in range(3)] == pytest.approx([0.2, 0.3, 0.4])
    assert stack_context(np.arange(3.0)[:, None, None], 0).shape == (3, 1, 1, 1)


def test_roi_planes_have_canonical_orientation_for_axial_and_sagittal_acquisitions():
    """A value that grows toward the patient's left and toward the head reads the same in the sagittal
    ROI plane of an axial and of a sagittal acquisition."""

    def field(points: np.ndarray) -> np.ndarray:
        return points[..., 1] * 1.0 + points[..., 2] * 10.0  # posterior + 10 × superior

    def filled(volume: Volume) -> Volume:
        k, i, j = np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij")
        points = volume.index_to_patient(np.stack([k, i, j], -1).reshape(-1, 3)).reshape(*volume.shape, 3)
        volume.voxels = field(points).astype(np.float32)
        return volume

    axial = filled(_volume(np.zeros((60, 160, 160)), step=1.0))
    # slices from x = 10 toward the patient's right, rows from z = 160 down
    sagittal = filled(
        _volume(np.zeros((30, 160, 160)), row=(0, 1.0, 0), column=(0, 0, -1.0), step=1.0, origin=(10.0, -30.0, 160.0))
    )
    centre = np.array([0.0, 10.0, 125.0])
    for volume in (axial, sagittal):
        plane = sample_plane(volume, centre, "sagittal", size=16)
        assert plane[0, 0] > plane[-1, 0]  # rows run toward the feet
        assert plane[0, -1] > plane[0, 0]  # columns run toward posterior
        assert plane[8, 8] == pytest.approx(field(centre + np.array([0.0, 0.5, -0.5])), abs=1e-3)


def test_lesion_roi_shapes_and_missing_mr_contrast_is_zeros():
    volume = _volume(np.random.default_rng(0).normal(300, 50, (40, 120, 120)), step=1.0)
    centre = volume.index_to_patient(np.array([[20.0, 60.0, 60.0]]))[0]
    ct = lesion_roi(Modality.CT, {SeriesRole.CT: volume}, centre)
    assert ct.shape == (3, 64, 64) and ct.dtype == np.float32
    mr = lesion_roi(Modality.MR, {SeriesRole.MR_T2: volume}, centre)
    assert not mr[0].any() and mr[1].any() and mr[2].any()


def test_normalisation_is_robust_to_scanner_units():
    assert ct_normalise(np.array([-3000.0, 0.0, 5000.0])).tolist() == [-1.0, 0.0, 2.0]
    signal = np.random.default_rng(1).gamma(2.0, 100.0, 10_000)
    assert np.allclose(mr_normalise(signal), mr_normalise(signal * 7.5), atol=1e-6)
    image = np.random.default_rng(2).normal(2000, 300, (64, 64))
    assert np.allclose(xr_normalise(image), xr_normalise(image * 0.5 + 100), atol=1e-5)
    assert not mr_normalise(np.zeros(10)).any()
