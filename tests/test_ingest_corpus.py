"""Ingest against pydicom's test corpus (pydicom + pydicom-data): every file, alone, either becomes a Study
or is refused with a CspineError — nothing else escapes and nothing hangs — and files that exist in several
encodings decode to the same values."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files

from cspine.dicom.ingest import ingest
from cspine.domain import Modality, Orientation
from cspine.errors import CspineError, TruncatedDicomError

pytestmark = pytest.mark.filterwarnings("ignore")  # the corpus is full of files pydicom warns about


def _corpus() -> list[Path]:
    return sorted(Path(f) for f in get_testdata_files() if os.path.isfile(f))


def _id(path: Path) -> str:
    parts = path.parts
    for anchor in ("test_files", "data"):
        if anchor in parts:
            return "/".join(parts[len(parts) - parts[::-1].index(anchor) :])
    return path.name


CORPUS = _corpus()


def test_the_corpus_is_there():
    assert len(CORPUS) > 200  # pydicom-data installed: compressed, big-endian and odd files


@pytest.mark.timeout(30)
@pytest.mark.parametrize("path", CORPUS, ids=_id)
def test_every_corpus_file_is_ingested_or_refused_with_a_cspine_error(path):
    try:
        study = ingest([(path.name, path.read_bytes())])
    except CspineError as exc:
        assert path.name in str(exc) or "no DICOM instance of a study" in str(exc)
        return
    assert study.series
    for series in study.series:
        if series.volume is not None:
            voxels = series.volume.voxels
            assert voxels.dtype == np.float32 and voxels.ndim == 3 and np.isfinite(voxels).all()
            assert np.all(np.diff(series.volume.slice_offsets) > 0)


def _read(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def _volume(name: str, data: bytes | None = None):
    study = ingest([(name, data if data is not None else _read(name))])
    (series,) = study.series
    assert series.volume is not None, study.notices
    return series


def test_ct_small_gives_an_axial_ct_slice_in_hounsfield_units():
    series = _volume("CT_small.dcm")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert series.modality is Modality.CT and series.orientation is Orientation.AXIAL
    assert series.volume.shape == (1, 128, 128)
    assert series.volume.pixel_spacing == pytest.approx((0.661468, 0.661468))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(series.volume.voxels[0], expected)
    assert (series.volume.voxels.min(), series.volume.voxels.max()) == (-896.0, 1167.0)


@pytest.mark.parametrize(
    "twin",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_mr_small_twins_decode_to_the_uncompressed_values(twin):
    reference = _volume("MR_small.dcm").volume
    volume = _volume(twin).volume
    np.testing.assert_array_equal(volume.voxels, reference.voxels)
    np.testing.assert_array_equal(volume.origin, reference.origin)


@pytest.mark.parametrize(
    "reference, twin, tolerance",
    [
        ("693_UNCR.dcm", "693_J2KR.dcm", 0.0),  # CT, JPEG 2000 lossless
        ("693_UNCI.dcm", "693_J2KI.dcm", 0.0),  # the same pair with the lossy image stored uncompressed
        ("MR2_UNCR.dcm", "MR2_J2KR.dcm", 0.0),  # 1024² MR, JPEG 2000 lossless
    ],
)
def test_jpeg2000_twins_decode_to_the_uncompressed_values(reference, twin, tolerance):
    np.testing.assert_allclose(_volume(twin).volume.voxels, _volume(reference).volume.voxels, atol=tolerance)


def _with_imager_spacing(name: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.ImagerPixelSpacing = [0.1, 0.1]  # these CRs carry PixelSpacing 0\0, which ingest counts as absent
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_monochrome1_cr_twins_decode_and_invert_alike():
    uncompressed = _volume("RG3_UNCR.dcm", _with_imager_spacing("RG3_UNCR.dcm"))
    compressed = _volume("RG3_J2KR.dcm", _with_imager_spacing("RG3_J2KR.dcm"))
    np.testing.assert_array_equal(compressed.volume.voxels, uncompressed.volume.voxels)
    ds = pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    high = (1 << ds.BitsStored) - 1
    np.testing.assert_array_equal(uncompressed.volume.voxels[0], high - ds.pixel_array)
    assert uncompressed.modality is Modality.XR and uncompressed.volume.pixel_spacing == (0.1, 0.1)


def _as_ct(name: str) -> bytes:
    """A corpus image of a modality cspine does not analyse, relabelled as an axial CT slice."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.Modality = "CT"
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [0.5, 0.5]
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name",
    [
        "JPGExtended.dcm",  # JPEG extended, 12-bit
        "JPEG-LL.dcm",  # JPEG lossless, 16-bit signed
        "JPGLosslessP14SV1_1s_1f_8b.dcm",  # JPEG lossless SV1, 8-bit
        "JPEG2000.dcm",
        "JPEGLSNearLossless_16.dcm",
        "bad_sequence.dcm",  # a real CT in JPEG lossless SV1
        "image_dfl.dcm",  # deflated
    ],
)
def test_compressed_corpus_images_decode_as_pydicom_decodes_them(name):
    data = _as_ct(name)
    ds = pydicom.dcmread(io.BytesIO(data))
    if "StudyInstanceUID" not in ds:  # a few corpus files have no study; give them one
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        buffer = io.BytesIO()
        ds.save_as(buffer)
        data = buffer.getvalue()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ds.pixel_array.astype(np.float64)
    expected = expected * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    series = _volume(name, data)
    np.testing.assert_array_equal(series.volume.voxels[0], expected.astype(np.float32))


def test_a_corpus_file_with_short_pixel_data_is_refused_as_truncated():
    with pytest.raises(TruncatedDicomError, match=r"MR_truncated\.dcm: the pixel data ends after 8130 of its 8192"):
        ingest([("MR_truncated.dcm", _read("MR_truncated.dcm"))])
