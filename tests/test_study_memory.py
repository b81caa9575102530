"""A study's memory is bounded by its limits whatever its size on the wire: the analysis is planned on the
model grids before anything is allocated (cspine/budget.py) and refused as RESOURCE_EXHAUSTED beyond
``max_study_model_bytes``; ingest counts every frame as at least 64 × 64 voxels. Amplifying uploads (1 × 1-pixel
multi-frame CTs of 1,000 and 20,000 frames, 2 and 21 KB) go to a real ``cspine serve`` whose peak RSS is read."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cspine.budget import model_bytes_per_voxel, plan_study
from cspine.config import IngestLimits
from cspine.dicom.ingest import ingest, ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import Modality, Series, SeriesRole, Volume
from cspine.errors import StudyTooLargeError
from cspine.ops.embedded import EmbeddedServer
from cspine.phantom.scanner import REAL_CT_SIZE, REAL_XR_SHAPE
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from support import dicom as b
from support.tokens import served_metadata

GiB = 1024**3
DEFAULT = IngestLimits()


def one_pixel_multiframe(frames: int, spacing: str = "3.0") -> bytes:
    """A classic multi-frame CT of ``frames`` 1 × 1-pixel 8-bit frames ``spacing`` mm apart (~1 byte a frame)."""
    ds = b.dataset_of(b.ct_series(1, rows=1, cols=1, bits_allocated=8, bits_stored=8).files[0][1])
    b.set_pixels(ds, np.zeros((frames, 1, 1), np.int64), signed=False, bits_allocated=8)
    ds.NumberOfFrames = frames
    ds.SpacingBetweenSlices = spacing
    return b.encode(ds)


def geometry(modality: Modality, slices: int, rows: int, cols: int, pixel_mm: float, slice_mm: float) -> Series:
    """A series with a volume of that geometry and no voxel memory (the plan reads geometry only)."""
    volume = Volume(
        voxels=np.broadcast_to(np.float32(0.0), (slices, rows, cols)),
        origin=np.zeros(3),
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        pixel_spacing=(pixel_mm, pixel_mm),
        slice_offsets=np.arange(slices) * slice_mm,
        slice_thickness=slice_mm,
        projection=modality is Modality.XR,
    )
    dicom = {Modality.CT: "CT", Modality.MR: "MR", Modality.XR: "DX"}[modality]
    return Series("1.2.3.4", dicom, modality, "1.2.3", series_number=2, volume=volume)


# --------------------------------------------------------------------------------------------------------
# The plan, with real figures


def test_bytes_per_model_voxel_count_the_context_channels():
    assert model_bytes_per_voxel(Modality.CT) == 8 + 12 * 5 + 16 == 84  # 3 channels
    assert model_bytes_per_voxel(Modality.MR) == model_bytes_per_voxel(Modality.XR) == 8 + 4 * 5 + 16 == 44


def test_a_600_slice_512_ct_is_planned_on_its_model_grid_and_fits_the_default_limit():
    thin = plan_study({SeriesRole.CT: geometry(Modality.CT, 600, 512, 512, 0.33, 0.5)}, seg=True)
    thick = plan_study({SeriesRole.CT: geometry(Modality.CT, 600, 512, 512, 0.33, 2.0)}, seg=True)
    # 0.5 mm slices: 2 mm slabs of 4, 150 model slices; the grid reaches ceil(159 / 0.33) + 7 = 489 source pixels
    assert thin.series[0].slices == 150
    assert thin.analysis_bytes == 150 * 160 * 160 * 84 + 600 * 489 * 489 * 4 == 896_450_400
    assert thin.seg_bytes == 600 * 512 * 512 * 6 + 600 * 6 * 8192 == 973_209_600  # the SEG is the larger
    assert thin.bytes == 973_209_600
    # 2 mm slices: one model slice each
    assert thick.series[0].slices == 600
    assert thick.bytes == 600 * 160 * 160 * 84 + 600 * 489 * 489 * 4 == 1_864_130_400
    assert thick.bytes < DEFAULT.max_study_model_bytes == 3 * GiB
    thick.check(DEFAULT.max_study_model_bytes)


def test_real_size_ct_and_radiograph_fit_the_default_limit():
    chosen = {
        SeriesRole.CT: geometry(Modality.CT, 309, REAL_CT_SIZE, REAL_CT_SIZE, 0.33, 0.5),
        SeriesRole.XR: geometry(Modality.XR, 1, *REAL_XR_SHAPE, 0.1, 0.0),
    }
    plan = plan_study(chosen, seg=True)
    ct, xr = plan.series
    assert (ct.slices, xr.slices) == (78, 1)
    # 2 mm slabs of the 0.5 mm slices; the radiograph's 256 pixels at 0.75 mm reach 1,913 + 7 of its 0.1 mm ones
    assert ct.analysis_bytes == 78 * 160 * 160 * 84 + 309 * 489 * 489 * 4 == 463_284_756
    assert xr.analysis_bytes == 256 * 256 * 44 + 1920 * 1920 * 4 == 17_629_184
    # the CT's SEG, written after both analyses, takes more than they do together
    assert plan.analysis_bytes == ct.analysis_bytes + xr.analysis_bytes
    assert plan.bytes == ct.seg_bytes == 309 * 512 * 512 * 6 + 309 * 6 * 8192 == 501_202_944
    plan.check(DEFAULT.max_study_model_bytes)


def test_the_phantom_cohort_fits_the_default_limit_with_its_seg(phantom_cases):
    for name, case in phantom_cases.items():
        study = ingest_paths([case.path / folder for folder in ("ct", "mr", "xr")])
        plan = plan_study(select_series(study).chosen, seg=True)
        assert 0.1e9 < plan.bytes < 0.5e9, (name, plan.bytes)
        assert {s.modality for s in plan.series} == {Modality.CT, Modality.MR, Modality.XR}
        plan.check(DEFAULT.max_study_model_bytes)


def test_one_pixel_frames_are_planned_as_whole_model_slices_and_20000_are_refused():
    def plan(frames):
        return plan_study(select_series(ingest([("mf.dcm", one_pixel_multiframe(frames))])).chosen)

    thousand, many = plan(1000), plan(20000)
    assert thousand.bytes == 1000 * 160 * 160 * 84 + 1000 * 4 == 2_150_404_000  # under 3 GiB: analysable
    assert many.bytes == 20000 * (160 * 160 * 84 + 4) == 43_008_080_000
    thousand.check(DEFAULT.max_study_model_bytes)
    message = (
        r"the study's analysis would allocate 43008080000 bytes, more than the limit of 3221225472 "
        r"\(max_study_model_bytes\): CT series 2 \(ct\): 20000 model-grid slice\(s\) of 160×160 × 3 channel\(s\)"
    )
    with pytest.raises(StudyTooLargeError, match=message):
        many.check(DEFAULT.max_study_model_bytes)


def test_the_model_byte_limit_is_read_from_the_environment_and_must_be_positive():
    assert IngestLimits.from_env({"CSPINE_MAX_STUDY_MODEL_BYTES": "1000"}).max_study_model_bytes == 1000
    with pytest.raises(ValueError, match="max_study_model_bytes must be a positive integer"):
        IngestLimits(max_study_model_bytes=0)


def test_ingest_counts_a_frame_as_at_least_64_by_64_voxels():
    data = one_pixel_multiframe(20000)
    assert ingest([("mf.dcm", data)]).series[0].volume.shape == (20000, 1, 1)
    with pytest.raises(StudyTooLargeError, match=r"20000 frame\(s\) of 1×1 here; a frame counts as at least 4096"):
        ingest([("mf.dcm", data)], IngestLimits(max_study_voxels=20000 * 4096 - 1))


def test_ingest_running_out_of_memory_is_not_blamed_on_the_instance(monkeypatch):
    from cspine.dicom import ingest as ingest_module

    def exhausted(*_):
        raise MemoryError

    monkeypatch.setattr(ingest_module, "read_image", exhausted)
    with pytest.raises(MemoryError):  # INTERNAL at the gateway, never INVALID_ARGUMENT naming the instance
        ingest([("mf.dcm", one_pixel_multiframe(3))])


# --------------------------------------------------------------------------------------------------------
# A real gateway process


@pytest.fixture(scope="module")
def serve(triton, tmp_path_factory):
    """``cspine serve`` with the default limits, on the session's Triton."""
    root = tmp_path_factory.mktemp("serve-memory")
    with EmbeddedServer(root / "data", root / "serve.log", ["--triton-url", triton.grpc_url]) as server:
        server.metadata = served_metadata(root / "data")
        yield server


def peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM), in bytes."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def send(server, data: bytes) -> tuple[grpc.StatusCode, str]:
    upload = iter([pb.StudyUpload(dicom_instance=data)])
    with grpc.insecure_channel(server.address) as channel:
        try:
            pb_grpc.SpineAnalysisStub(channel).AnalyzeStudy(upload, metadata=server.metadata, timeout=300)
        except grpc.RpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""


def study_bound(data: bytes, frames: int) -> int:
    """What the limits let this upload cost: its bytes, its voxels as float32 (each frame 64 × 64 at least) and
    its analysis as planned with the default limits (0 when refused before the analysis)."""
    plan = plan_study(select_series(ingest([("mf.dcm", data)])).chosen)
    planned = plan.bytes if plan.bytes <= DEFAULT.max_study_model_bytes else 0
    return len(data) + 4 * 4096 * frames + planned


def test_one_pixel_frame_uploads_cost_the_gateway_no_more_than_their_plan(serve):
    with grpc.insecure_channel(serve.address) as channel:
        stub = pb_grpc.SpineAnalysisStub(channel)
        info = stub.GetServiceInfo(pb.GetServiceInfoRequest(), metadata=serve.metadata, timeout=30)
    assert info.limits.max_study_model_bytes == DEFAULT.max_study_model_bytes == 3 * GiB
    pid = serve.process.pid
    baseline = peak_rss(pid)
    # 20,000 frames (21 KB): 43 GB planned, refused before anything is resampled (it was a MemoryError at 5 GB)
    many = one_pixel_multiframe(20000)
    code, details = send(serve, many)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    assert "would allocate 43008080000 bytes, more than the limit of 3221225472" in details
    assert "CT series 2 (ct): 20000 model-grid slice(s)" in details
    refused = peak_rss(pid) - baseline
    assert refused < study_bound(many, 20000) and refused < 100 * 2**20
    # 1,000 frames (2 KB): 2.15 GB planned, within the limit, so analysed (no anatomy: not assessable)
    thousand = one_pixel_multiframe(1000)
    code, details = send(serve, thousand)
    assert code == grpc.StatusCode.OK, details
    analysed = peak_rss(pid) - baseline
    assert 0.5e9 < analysed < study_bound(thousand, 1000)
    assert serve.process.poll() is None
