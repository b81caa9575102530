"""Ingest: Part-10 bytes in any order become a Study whose volumes carry the right values and geometry,
and every unusable instance is refused with a CspineError that names it and says why."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
from pydicom import uid as dicom_uid

from cspine.config import IngestLimits
from cspine.dicom.ingest import StudyBuilder, ingest, ingest_paths
from cspine.domain import Modality, NoticeCode, Orientation
from cspine.errors import (
    CspineError,
    EmptyStudyError,
    FrameTooLargeError,
    InconsistentSeriesError,
    MalformedDicomError,
    MissingPixelDataError,
    MixedStudiesError,
    NotDicomError,
    StudyTooLargeError,
    TruncatedDicomError,
    UndecodablePixelDataError,
)
from support import dicom as b


def shuffled(files, seed=0):
    files = list(files)
    random.Random(seed).shuffle(files)
    return files


def only_series(study):
    assert len(study.series) == 1, [s.dicom_modality for s in study.series]
    return study.series[0]


def codes(study):
    return [n.code for n in study.notices]


def assert_no_phi(text: str) -> None:
    for value in (b.PATIENT_NAME, "Doe", b.PATIENT_ID, b.PATIENT_BIRTH_DATE):
        assert value not in text


# --------------------------------------------------------------------------------------------------------
# Geometry and values


def test_ingest_orders_slices_by_position_not_by_file_order_or_instance_number():
    built = b.ct_series(7, instance_numbers=[5, 3, 7, 1, 2, 6, 4])
    series = only_series(ingest(shuffled(built.files)))
    volume = series.volume
    assert volume.shape == (7, 16, 12)
    np.testing.assert_array_equal(volume.voxels, built.modality_values.astype(np.float32))
    np.testing.assert_allclose(volume.slice_offsets, np.arange(7) * 2.5)
    np.testing.assert_allclose(volume.origin, built.positions[0])
    np.testing.assert_allclose(volume.slice_positions(), built.positions, atol=1e-4)
    np.testing.assert_allclose(volume.row_direction, [1, 0, 0])
    np.testing.assert_allclose(volume.column_direction, [0, 1, 0])
    assert volume.pixel_spacing == (0.7, 0.8)
    assert volume.slice_thickness == 2.5
    assert volume.voxels.dtype == np.float32
    assert series.orientation is Orientation.AXIAL
    assert series.modality is Modality.CT and series.dicom_modality == "CT"
    assert series.series_number == 2 and series.description == "AX CT BONE"
    in_file_order = [b.dataset_of(data).SOPInstanceUID for _, data in built.files]
    assert [ref.sop_instance_uid for ref in series.instances] == in_file_order
    assert [h.SOPInstanceUID for h in series.headers] == in_file_order
    assert all("PixelData" not in h for h in series.headers)
    assert codes(ingest(built.files)) == []


def test_ingest_gives_the_same_volume_for_every_file_order():
    built = b.ct_series(9, offsets=[0, 1, 2, 3, 4, 5, 6, 7, 8])
    first = only_series(ingest(shuffled(built.files, 1))).volume
    second = only_series(ingest(shuffled(built.files, 2))).volume
    np.testing.assert_array_equal(first.voxels, second.voxels)
    np.testing.assert_array_equal(first.slice_offsets, second.slice_offsets)


def test_ingest_orders_slices_along_the_normal_for_descending_positions():
    # Sagittal MR: the normal is −x, so positions along x decrease while offsets increase.
    built = b.mr_series(4)
    volume = only_series(ingest(shuffled(built.files))).volume
    np.testing.assert_allclose(volume.slice_direction, [-1, 0, 0])
    assert np.all(np.diff(volume.slice_positions()[:, 0]) < 0)
    np.testing.assert_array_equal(volume.voxels, built.modality_values.astype(np.float32))


def _tilted_about_x(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return (1.0, 0.0, 0.0, 0.0, c, s)  # rows along x, columns tilted from y toward z


@pytest.mark.parametrize(
    "orientation, expected",
    [
        (b.AXIAL, Orientation.AXIAL),
        (b.SAGITTAL, Orientation.SAGITTAL),
        (b.CORONAL, Orientation.CORONAL),
        (_tilted_about_x(20), Orientation.AXIAL),  # a gantry-tilted axial series is still axial
        (_tilted_about_x(40), Orientation.OBLIQUE),
        (_tilted_about_x(75), Orientation.CORONAL),
    ],
)
def test_orientation_comes_from_the_slice_normal(orientation, expected):
    built = b.ct_series(3, orientation=orientation)
    series = only_series(ingest(built.files))
    assert series.orientation is expected
    np.testing.assert_allclose(series.volume.slice_positions(), built.positions, atol=1e-3)


def test_rescale_slope_and_intercept_come_back_exactly():
    built = b.ct_series(3, slope=0.5, intercept=-1024.25, high=4000)
    voxels = only_series(ingest(built.files)).volume.voxels
    np.testing.assert_array_equal(voxels, (built.stored * 0.5 - 1024.25).astype(np.float32))
    assert voxels.min() == -1024.25 and voxels.max() == built.stored.max() * 0.5 - 1024.25


def test_signed_pixels_keep_their_sign():
    built = b.ct_series(3, signed=True, low=-2000, high=2000, intercept=0.0, bits_stored=16)
    voxels = only_series(ingest(built.files)).volume.voxels
    assert voxels.min() < 0
    np.testing.assert_array_equal(voxels, built.stored.astype(np.float32))


def test_bits_above_bits_stored_are_ignored():
    # 12-bit signed values written without sign extension (-5 as 0x0FFB) and 12-bit unsigned values with
    # garbage in the top nibble must read as their 12-bit meaning.
    signed = b.ct_series(1, signed=True, low=-100, high=100, intercept=0.0, bits_stored=12)
    ds = b.dataset_of(signed.files[0][1])
    stored = signed.stored[0].astype(np.int16)
    ds.PixelData = (stored.view(np.uint16) & 0x0FFF).astype("<u2").tobytes()
    voxels = only_series(ingest([("signed12.dcm", b.encode(ds))])).volume.voxels
    np.testing.assert_array_equal(voxels[0], stored)

    unsigned = b.ct_series(1, high=4095, intercept=0.0, bits_stored=12)
    ds = b.dataset_of(unsigned.files[0][1])
    ds.PixelData = (unsigned.stored[0].astype(np.uint16) | 0xF000).astype("<u2").tobytes()
    voxels = only_series(ingest([("unsigned12.dcm", b.encode(ds))])).volume.voxels
    np.testing.assert_array_equal(voxels[0], unsigned.stored[0])


def test_a_gap_gives_a_missing_slices_notice_and_no_interpolation():
    built = b.ct_series(offsets=[0, 2.5, 5, 12.5, 15, 17.5])
    study = ingest(built.files)
    volume = only_series(study).volume
    assert volume.shape[0] == 6
    np.testing.assert_allclose(volume.slice_offsets, [0, 2.5, 5, 12.5, 15, 17.5])
    (notice,) = [n for n in study.notices if n.code is NoticeCode.MISSING_SLICES]
    assert "2 slice(s) missing" in notice.message
    assert "between slices 2 and 3 (5.0–12.5 mm from the first)" in notice.message
    assert notice.series_instance_uid == built.series_uid
    assert NoticeCode.IRREGULAR_SPACING not in codes(study)


def test_irregular_spacing_gives_a_notice_and_true_offsets():
    built = b.ct_series(offsets=[0, 2.5, 5, 8, 10.5, 13])
    study = ingest(built.files)
    np.testing.assert_allclose(only_series(study).volume.slice_offsets, [0, 2.5, 5, 8, 10.5, 13])
    assert codes(study) == [NoticeCode.IRREGULAR_SPACING]
    assert "3.00 mm" in study.notices[0].message and "median 2.50 mm" in study.notices[0].message


def test_a_repeated_instance_is_dropped_with_a_notice():
    built = b.ct_series(4)
    study = ingest(built.files + [("again.dcm", built.files[2][1])])
    assert only_series(study).volume.shape[0] == 4
    (notice,) = study.notices
    assert notice.code is NoticeCode.DUPLICATE_INSTANCE and "again.dcm" in notice.message


@pytest.mark.parametrize("duplicate_number, kept", [(99, "original"), (0, "duplicate")])
def test_two_instances_at_one_position_keep_the_lowest_instance_number(duplicate_number, kept):
    built = b.ct_series(4)
    other = b.ct_series(
        1,
        offsets=[5.0],
        seed=7,
        study_uid=built.study_uid,
        series_uid=built.series_uid,
        instance_numbers=[duplicate_number],
    )
    study = ingest(shuffled(built.files + other.files))
    volume = only_series(study).volume
    assert volume.shape[0] == 4
    expected = built.modality_values[2] if kept == "original" else other.modality_values[0]
    np.testing.assert_array_equal(volume.voxels[2], expected)
    assert [n.code for n in study.notices] == [NoticeCode.DUPLICATE_INSTANCE]
    assert "lowest InstanceNumber" in study.notices[0].message


def test_monochrome1_is_inverted_over_the_rescaled_stored_range():
    built = b.radiograph(photometric="MONOCHROME1", bits_stored=12, slope=2.0, intercept=10.0)
    voxels = only_series(ingest(built.files)).volume.voxels
    # Stored range [0, 4095] rescales to [10, 8200]; v' = 10 + 8200 − (2 s + 10) = 8200 − 2 s.
    np.testing.assert_array_equal(voxels[0], 8200.0 - 2.0 * built.stored[0])


def test_monochrome2_radiograph_is_not_inverted():
    built = b.radiograph(photometric="MONOCHROME2")
    voxels = only_series(ingest(built.files)).volume.voxels
    np.testing.assert_array_equal(voxels[0], built.stored[0])


def test_lateral_radiograph_geometry_comes_from_imager_spacing_and_patient_orientation():
    built = b.radiograph(imager_pixel_spacing=(0.2, 0.25), magnification=1.25, patient_orientation=("A", "F"))
    series = only_series(ingest(built.files))
    volume = series.volume
    assert series.modality is Modality.XR and series.orientation is Orientation.PROJECTION
    assert series.view_position == "LL"
    assert volume.projection is True and volume.shape == (1, 20, 16)
    assert volume.pixel_spacing == pytest.approx((0.16, 0.2))
    np.testing.assert_array_equal(volume.origin, [0, 0, 0])
    np.testing.assert_allclose(volume.row_direction, [0, -1, 0])
    np.testing.assert_allclose(volume.column_direction, [0, 0, -1])


def test_radiograph_pixel_spacing_wins_and_orientation_defaults_to_nominal():
    built = b.radiograph(pixel_spacing=(0.1, 0.1), imager_pixel_spacing=(0.2, 0.2), patient_orientation=None)
    volume = only_series(ingest(built.files)).volume
    assert volume.pixel_spacing == (0.1, 0.1)
    np.testing.assert_allclose(volume.row_direction, [1, 0, 0])
    np.testing.assert_allclose(volume.column_direction, [0, 0, -1])


def test_imager_spacing_without_magnification_is_used_as_is():
    built = b.radiograph(imager_pixel_spacing=(0.15, 0.15), magnification=None)
    assert only_series(ingest(built.files)).volume.pixel_spacing == pytest.approx((0.15, 0.15))


@pytest.mark.parametrize("modality, for_processing", [("CR", False), ("DX", True)])
def test_cr_and_dx_for_processing_are_radiographs(modality, for_processing):
    built = b.radiograph(modality=modality, for_processing=for_processing)
    series = only_series(ingest(built.files))
    assert series.modality is Modality.XR and series.dicom_modality == modality
    assert series.volume is not None


def test_a_radiograph_series_with_several_images_uses_the_lateral_one():
    study_uid, series_uid = dicom_uid.generate_uid(), dicom_uid.generate_uid()
    frontal = b.radiograph(
        view_position="AP",
        patient_orientation=("L", "F"),
        study_uid=study_uid,
        series_uid=series_uid,
        instance_number=1,
        seed=11,
    )
    lateral = b.radiograph(view_position="LL", study_uid=study_uid, series_uid=series_uid, instance_number=2)
    study = ingest(frontal.files + lateral.files)
    series = only_series(study)
    np.testing.assert_array_equal(series.volume.voxels[0], 4095 - lateral.stored[0])
    assert series.view_position == "LL"
    assert [n.code for n in study.notices] == [NoticeCode.UNSUPPORTED_IMAGE]
    assert "instance number 2 (lateral view) is used" in study.notices[0].message


def test_radiograph_without_any_pixel_spacing_has_no_volume():
    built = b.radiograph(imager_pixel_spacing=None, pixel_spacing=None)
    study = ingest(built.files)
    assert only_series(study).volume is None
    assert "no PixelSpacing or ImagerPixelSpacing" in study.notices[0].message


# --------------------------------------------------------------------------------------------------------
# Transfer syntaxes


def _encodable(syntax):
    """Images each encoder can take: JPEG 2000 needs ≥ 32 pixels a side, GDCM's lossy JPEG 8 bits."""
    if syntax in b.EIGHT_BIT_ONLY:
        return dict(bits_allocated=8, bits_stored=8, low=0, high=255, intercept=0.0)
    return dict(rows=32, cols=36) if "JPEG 2000" in syntax.name else {}


@pytest.mark.parametrize("syntax", list(b.ENCODERS), ids=lambda s: s.name)
def test_every_encodable_transfer_syntax_decodes_to_the_same_values(syntax):
    built = b.ct_series(3, syntax=syntax, **_encodable(syntax))
    study = ingest(shuffled(built.files))
    voxels = only_series(study).volume.voxels
    tolerance = 3.0 if syntax in b.LOSSY else 0.0
    np.testing.assert_allclose(voxels, built.modality_values, atol=tolerance, rtol=0)
    assert only_series(study).headers[0].file_meta.TransferSyntaxUID == syntax
    assert codes(study) == []


@pytest.mark.parametrize(
    "syntax",
    [
        dicom_uid.RLELossless,
        dicom_uid.JPEGLSLossless,
        dicom_uid.JPEG2000Lossless,
        dicom_uid.JPEGLosslessSV1,
        dicom_uid.ExplicitVRBigEndian,
        dicom_uid.DeflatedExplicitVRLittleEndian,
    ],
    ids=lambda s: s.name,
)
def test_signed_pixels_survive_lossless_compression(syntax):
    built = b.ct_series(
        2, rows=32, cols=32, signed=True, low=-1500, high=1500, intercept=0.0, bits_stored=16, syntax=syntax
    )
    np.testing.assert_array_equal(only_series(ingest(built.files)).volume.voxels, built.stored)


def test_a_series_may_mix_transfer_syntaxes():
    native = b.ct_series(6, rows=32, cols=32)
    mixed = []
    for k, (name, data) in enumerate(native.files):
        if k % 2:
            ds = b.dataset_of(data)
            data = b.encode(ds, [dicom_uid.RLELossless, dicom_uid.JPEG2000Lossless][k % 4 // 2])
        mixed.append((name, data))
    np.testing.assert_array_equal(only_series(ingest(shuffled(mixed))).volume.voxels, native.modality_values)


def test_a_deflate_bomb_is_refused_before_it_is_inflated():
    ds = b.dataset_of(b.ct_series(1).files[0][1])
    ds.EncapsulatedDocument = bytes(64 * 1024 * 1024)  # any large OB attribute: 64 MiB of zeros deflate to ~64 KiB
    data = b.encode(ds, dicom_uid.DeflatedExplicitVRLittleEndian)
    assert len(data) < 1024 * 1024
    with pytest.raises(StudyTooLargeError, match=r"instance bomb\.dcm: the deflated data set inflates to more than"):
        ingest([("bomb.dcm", data)], IngestLimits(max_study_bytes=8 * 1024 * 1024))


# --------------------------------------------------------------------------------------------------------
# Multi-frame


def test_enhanced_ct_frames_are_placed_by_their_per_frame_positions():
    built = b.enhanced_series(5, frame_order=[3, 0, 4, 1, 2])
    series = only_series(ingest(built.files))
    volume = series.volume
    assert volume.shape == (5, 10, 12)
    np.testing.assert_array_equal(volume.voxels, (built.stored - 1000.0).astype(np.float32))
    np.testing.assert_allclose(volume.slice_offsets, np.arange(5) * 2.0)
    np.testing.assert_allclose(volume.origin, built.positions[0])
    # Slice k came from the frame that lies at k: frame numbers are 1-based.
    assert [ref.frame_number for ref in series.instances] == [2, 4, 5, 1, 3]
    assert len(series.headers) == 1 and "PixelData" not in series.headers[0]


def test_enhanced_ct_applies_each_frames_rescale():
    slopes = [1.0, 2.0, 0.5, 4.0]
    built = b.enhanced_series(4, frame_order=[2, 0, 3, 1], slopes=slopes, intercept=-10.0)
    voxels = only_series(ingest(built.files)).volume.voxels
    expected = built.stored * built.extra["slice_slopes"][:, None, None] - 10.0
    np.testing.assert_array_equal(voxels, expected.astype(np.float32))


def test_enhanced_mr_reads_echo_and_repetition_time_from_functional_groups():
    built = b.enhanced_series(
        3, modality="MR", orientation=b.SAGITTAL, echo_time=95.0, repetition_time=2800.0, intercept=0.0
    )
    series = only_series(ingest(built.files))
    assert series.orientation is Orientation.SAGITTAL
    assert series.echo_time_ms == 95.0 and series.repetition_time_ms == 2800.0


def test_enhanced_multiframe_without_frame_positions_is_unsupported():
    built = b.enhanced_series(3, per_frame_positions=False)
    study = ingest(built.files)
    assert only_series(study).volume is None
    assert codes(study) == [NoticeCode.UNSUPPORTED_IMAGE]


def _classic_multiframe(spacing_between_slices):
    built = b.ct_series(1)
    ds = b.dataset_of(built.files[0][1])
    stored = b.pattern((3, 16, 12), 0, 2000)
    b.set_pixels(ds, stored, signed=False, bits_stored=12)
    ds.NumberOfFrames = 3
    if spacing_between_slices:
        ds.SpacingBetweenSlices = spacing_between_slices
    return [("classic_mf.dcm", b.encode(ds))], stored, built


def test_classic_multiframe_with_spacing_between_slices_is_a_frame_stack():
    files, stored, built = _classic_multiframe("3.0")
    volume = only_series(ingest(files)).volume
    np.testing.assert_array_equal(volume.voxels, stored - 1024.0)
    np.testing.assert_allclose(volume.slice_offsets, [0, 3, 6])
    np.testing.assert_allclose(volume.origin, built.positions[0])


def test_classic_multiframe_without_geometry_is_unsupported():
    files, _, _ = _classic_multiframe(None)
    study = ingest(files)
    assert only_series(study).volume is None
    assert "multi-frame image without per-frame geometry" in study.notices[0].message


# --------------------------------------------------------------------------------------------------------
# What is skipped


def test_non_image_objects_are_skipped_with_a_notice():
    built = b.ct_series(3)
    study = ingest(built.files + [b.sr_document(study_uid=built.study_uid)])
    ct, sr = study.series
    assert ct.volume is not None and sr.volume is None
    assert sr.modality is None and sr.dicom_modality == "SR"
    (notice,) = study.notices
    assert notice.code is NoticeCode.NOT_AN_IMAGE and notice.series_instance_uid == sr.series_instance_uid
    assert "SR series 90 'REPORT' is not an image" in notice.message


def test_images_of_other_modalities_are_not_analysed():
    built = b.other_modality_image("US")
    study = ingest(built.files)
    series = only_series(study)
    assert series.modality is None and series.volume is None and series.dicom_modality == "US"
    assert codes(study) == [NoticeCode.UNSUPPORTED_IMAGE]
    assert "modality US is not analysed" in study.notices[0].message


def test_colour_images_are_not_analysed():
    built = b.colour_image()
    study = ingest(built.files)
    assert only_series(study).volume is None
    assert "RGB colour images are not analysed" in study.notices[0].message


def test_ingest_paths_reads_folders_recursively_and_skips_a_dicomdir(tmp_path):
    built = b.ct_series(4)
    for n, (name, data) in enumerate(built.files):
        folder = tmp_path / f"sub{n % 2}" / "deeper"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    (tmp_path / "DICOMDIR").write_bytes(b.dicomdir_bytes())
    study = ingest_paths([tmp_path])
    np.testing.assert_array_equal(only_series(study).volume.voxels, built.modality_values)
    (notice,) = study.notices
    assert notice.code is NoticeCode.NOT_AN_IMAGE and "DICOMDIR" in notice.message


def test_ingest_paths_refuses_a_stray_non_dicom_file_by_name(tmp_path):
    for name, data in b.ct_series(2).files:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "README.txt").write_text("not an image")
    with pytest.raises(NotDicomError, match=r"README\.txt: not a DICOM Part-10 file"):
        ingest_paths([tmp_path])


def test_ingest_paths_equals_ingest_of_bytes(tmp_path):
    built = b.ct_series(3, syntax=dicom_uid.JPEGLSLossless)
    paths = []
    for name, data in built.files:
        (tmp_path / name).write_bytes(data)
        paths.append(tmp_path / name)
    from_files = only_series(ingest_paths(paths)).volume.voxels
    from_bytes = only_series(ingest(built.files)).volume.voxels
    np.testing.assert_array_equal(from_files, from_bytes)


def test_a_study_with_several_series_lists_them_by_series_number():
    ct = b.ct_series(3, series_number=7)
    mr = b.mr_series(3, series_number=2, study_uid=ct.study_uid)
    xr = b.radiograph(series_number=4, study_uid=ct.study_uid)
    study = ingest(shuffled(ct.files + mr.files + xr.files))
    assert study.study_instance_uid == ct.study_uid
    assert [s.series_number for s in study.series] == [2, 4, 7]
    assert [s.modality for s in study.series] == [Modality.MR, Modality.XR, Modality.CT]
    assert len(study.image_series()) == 3
    assert study.series[0].echo_time_ms == 100.0 and study.series[0].repetition_time_ms == 3000.0


# --------------------------------------------------------------------------------------------------------
# Refusals


def test_non_dicom_bytes_are_refused_naming_the_instance():
    with pytest.raises(NotDicomError, match=r"^instance junk\.bin: not a DICOM Part-10 file"):
        ingest([("junk.bin", b"hello, this is not DICOM" * 10)])


def test_a_truncated_header_is_refused():
    built = b.ct_series(1)
    data = built.files[0][1]
    inside_uid = data.index(built.study_uid.encode()) + 10
    reason = r"^instance cut\.dcm: the file ends inside attribute StudyInstanceUID"
    with pytest.raises(TruncatedDicomError, match=reason):
        ingest([("cut.dcm", data[:inside_uid])])
    after_uid = data.index(built.study_uid.encode()) + len(built.study_uid) + (len(built.study_uid) % 2) + 3
    with pytest.raises(TruncatedDicomError, match=r"^instance cut\.dcm: the file ends inside the attribute after"):
        ingest([("cut.dcm", data[:after_uid])])


def test_truncated_pixel_data_is_refused():
    data = b.ct_series(1).files[0][1]
    with pytest.raises(TruncatedDicomError, match=r"instance #12: the pixel data ends after \d+ of its 384 bytes"):
        ingest([("#12", data[:-100])])


def test_truncated_encapsulated_pixel_data_is_refused():
    data = b.ct_series(1, syntax=dicom_uid.RLELossless).files[0][1]
    with pytest.raises(TruncatedDicomError, match=r"instance rle\.dcm: the file ends inside the encapsulated"):
        ingest([("rle.dcm", data[:-30])])


def test_an_image_without_pixel_data_is_refused():
    ds = b.dataset_of(b.ct_series(1).files[0][1])
    del ds.PixelData
    with pytest.raises(MissingPixelDataError, match=r"instance nopix\.dcm: an image object without pixel data"):
        ingest([("nopix.dcm", b.encode(ds))])


def test_instances_of_two_studies_are_refused():
    first, second = b.ct_series(2), b.ct_series(2)
    with pytest.raises(MixedStudiesError, match=r"instance other\.dcm: it belongs to another study"):
        ingest(first.files + [("other.dcm", second.files[0][1])])


def test_an_instance_of_another_size_than_its_series_is_refused():
    built = b.ct_series(3)
    odd = b.ct_series(1, rows=20, cols=12, study_uid=built.study_uid, series_uid=built.series_uid, offsets=[10.0])
    with pytest.raises(InconsistentSeriesError, match=r"instance odd\.dcm: 20×12 pixels differ from its series' 16×12"):
        ingest(built.files + [("odd.dcm", odd.files[0][1])])


def test_an_instance_of_another_orientation_than_its_series_is_refused():
    built = b.ct_series(3)
    tilted = b.ct_series(1, orientation=b.CORONAL, study_uid=built.study_uid, series_uid=built.series_uid)
    with pytest.raises(InconsistentSeriesError, match=r"instance tilted\.dcm: its ImageOrientationPatient differs"):
        ingest(built.files + [("tilted.dcm", tilted.files[0][1])])


def test_corrupt_compressed_pixel_data_is_refused_as_undecodable():
    data = bytearray(b.ct_series(1, syntax=dicom_uid.RLELossless).files[0][1])
    header = data.rindex(b"\x02\x00\x00\x00\x40\x00\x00\x00")  # RLE header: 2 segments, first at 64 …
    data[header + 4 : header + 8] = b"\xff\x00\x00\x00"  # … now the first starts inside the second
    reason = r"instance bad-rle\.dcm: the RLE Lossless pixel data cannot be decoded"
    with pytest.raises(UndecodablePixelDataError, match=reason):
        ingest([("bad-rle.dcm", bytes(data))])


def test_a_huge_frame_is_refused_from_the_header_before_any_decoding():
    ds = b.dataset_of(b.ct_series(1).files[0][1])
    ds.Rows = ds.Columns = 60000  # 7.2 GB a frame, with 384 bytes of pixel data
    reason = r"instance huge\.dcm: a 60000×60000 frame .* decodes to 7200000000 bytes"
    with pytest.raises(FrameTooLargeError, match=reason):
        ingest([("huge.dcm", b.encode(ds))])


def test_too_many_frames_for_the_voxel_limit_are_refused_before_decoding():
    ds = b.dataset_of(b.ct_series(1).files[0][1])
    ds.NumberOfFrames = 100000
    with pytest.raises(StudyTooLargeError, match=r"instance frames\.dcm: the study has more than 1000000 voxels"):
        ingest([("frames.dcm", b.encode(ds))], IngestLimits(max_study_voxels=1_000_000))


def test_a_study_over_the_instance_limit_is_refused_at_the_first_instance_too_many():
    built = b.ct_series(3)
    builder = StudyBuilder(IngestLimits(max_instances=2))
    builder.add("a", built.files[0][1])
    builder.add("b", built.files[1][1])
    with pytest.raises(StudyTooLargeError, match=r"instance c: the study has more than 2 instances"):
        builder.add("c", built.files[2][1])


def test_a_study_over_the_byte_limit_is_refused():
    built = b.ct_series(3)
    limit = len(built.files[0][1]) + 10
    with pytest.raises(StudyTooLargeError, match=r"is larger than \d+ bytes"):
        ingest(built.files, IngestLimits(max_study_bytes=limit))


def test_an_instance_without_study_uid_is_refused():
    ds = b.dataset_of(b.ct_series(1).files[0][1])
    del ds.StudyInstanceUID
    with pytest.raises(MalformedDicomError, match=r"instance x\.dcm: StudyInstanceUID is missing"):
        ingest([("x.dcm", b.encode(ds))])


def test_an_unusable_bits_allocated_is_refused():
    ds = b.dataset_of(b.ct_series(1).files[0][1])
    ds.BitsAllocated = 12
    with pytest.raises(MalformedDicomError, match=r"BitsAllocated 12 is not usable"):
        ingest([("x.dcm", b.encode(ds))])


def test_an_upload_with_nothing_of_a_study_is_refused():
    with pytest.raises(EmptyStudyError, match="no DICOM instance of a study"):
        ingest([("DICOMDIR", b.dicomdir_bytes())])
    with pytest.raises(EmptyStudyError):
        ingest([])


def test_a_builder_refuses_at_once_so_a_stream_can_stop_early():
    builder = StudyBuilder()
    with pytest.raises(NotDicomError):
        builder.add("#1", b"garbage")
    assert builder.study_instance_uid is None


def test_refusals_and_logs_never_name_the_patient(caplog):
    caplog.set_level(logging.DEBUG, logger="cspine")
    messages = []
    bad_inputs = [
        [("x", b.ct_series(1).files[0][1][:-50])],
        [("x", b.ct_series(1, syntax=dicom_uid.RLELossless).files[0][1][:-40])],
        b.ct_series(1).files + b.ct_series(1).files,
    ]
    for items in bad_inputs:
        with pytest.raises(CspineError) as caught:
            ingest(items)
        messages.append(str(caught.value))
    ingest(b.ct_series(2).files)
    assert_no_phi("\n".join(messages) + caplog.text)
