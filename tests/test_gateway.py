"""The gRPC gateway over a real socket, on a real local Triton: a full study round trip and every
bad-input path over the wire; each gets the right status code and a message naming the problem, and the
server keeps serving afterwards."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import grpc
import pydicom
import pytest

from cspine.config import IngestLimits
from cspine.domain import MEASURED_LEVELS
from cspine.gateway.interceptors import RequestIdFilter
from cspine.gateway.logs import JsonFormatter
from cspine.gateway.tokens import Role, find_client_token
from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import analysis_pb2_grpc as pb_grpc
from support import dicom as b
from support.server import NOT_SERVING, SERVING, GatewayThread, Held, channel_to, files_of, free_port, upload, wait_for


def refused(stub, messages, code, match, timeout=60):
    with pytest.raises(grpc.RpcError) as caught:
        stub.AnalyzeStudy(iter(messages), timeout=timeout)
    assert caught.value.code() == code, caught.value.details()
    assert match in caught.value.details()
    return caught.value.details()


def still_serving(gateway):
    assert gateway.stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10).labels
    assert gateway.service.in_flight == 0


# ------------------------------------------------------------------------------------------------------
# A full study


@pytest.fixture(scope="module")
def full_round_trip(gateway, phantom_cases):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        case = phantom_cases["malignant"]
        options = pb.AnalysisOptions(return_dicom_seg=True, return_dicom_sr=True)
        metadata = (("x-request-id", "test-full-0001"),)
        result, call = gateway.stub.AnalyzeStudy.with_call(
            upload(files_of(case), options), metadata=metadata, timeout=120
        )
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    return case, result, call, stream.getvalue()


def test_a_full_study_round_trip_matches_the_phantom_truth(full_round_trip):
    case, result, call, _ = full_round_trip
    assert result.study_instance_uid == case.truth["study_instance_uid"]
    assert [m.modality for m in result.modalities] == [pb.CT, pb.MR, pb.XR]
    assert sum(p.probability for p in result.fused.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert set(result.fused.classified_from) <= {pb.CT, pb.MR, pb.XR} and len(result.fused.classified_from) >= 1
    assert all(list(m.assessment.classified_from) == [m.modality] for m in result.modalities)
    assert result.fused.status == pb.ASSESSED and all(m.assessment.status == pb.ASSESSED for m in result.modalities)
    assert all(0 < m.ood.score < m.ood.threshold for m in result.modalities) and result.disclosure.trained_on
    assert result.fused.tumor_detected
    ct = result.modalities[0]
    assert ct.lesions[0].vertebral_level == case.truth["tumor"]["primary_level"]
    assert ct.lesions[0].HasField("volume_ml") and not ct.lesions[0].HasField("area_mm2")
    close = 0
    for level in result.spine.levels:
        truth = case.truth["levels"][level.level]["canal_area_mm2"]
        close += abs(level.canal_area_mm2 - truth) <= 0.15 * truth
    assert [m.level for m in result.spine.levels] == list(MEASURED_LEVELS) and close >= 5
    assert result.spine.cobb_source == pb.XR and result.spine.HasField("cobb_angle_deg")
    assert result.dicom_seg[128:132] == b"DICM" and result.dicom_sr[128:132] == b"DICM"
    assert result.request_id == "test-full-0001"
    assert ("x-request-id", "test-full-0001") in tuple(call.initial_metadata())
    assert result.stage_seconds["total"] > 0


def test_metrics_count_the_study_its_stages_and_triton_calls(gateway, full_round_trip):
    value = gateway.metrics.registry.get_sample_value
    assert value("cspine_requests_total", {"rpc": "AnalyzeStudy", "code": "OK"}) >= 1
    assert value("cspine_request_seconds_count", {"rpc": "AnalyzeStudy"}) >= 1
    for stage in ("preprocess", "segment", "measure", "classify", "fuse"):
        assert value("cspine_stage_seconds_count", {"stage": stage}) >= 1, stage
    for model in ("seg_ct", "seg_mr", "seg_xr", "lesion_classify"):
        assert value("cspine_triton_request_seconds_count", {"model": model}) >= 1, model
    assert value("cspine_received_bytes_total") > 1e6
    assert value("cspine_studies_in_flight") == 0


def test_logs_are_structured_carry_the_request_id_and_name_no_patient(full_round_trip):
    case, _, _, logs = full_round_trip
    entries = [json.loads(line) for line in logs.splitlines() if line.strip()]
    assert any(e["request_id"] == "test-full-0001" for e in entries)
    header = pydicom.dcmread(files_of(case)[0], stop_before_pixels=True)
    for value in (str(header.PatientName), str(header.PatientID), str(header.PatientName).split("^")[-1]):
        assert value not in logs


def test_service_info_names_models_prototypes_and_limits(gateway):
    info = gateway.stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
    assert list(info.labels) == ["benign", "borderline", "malignant"]
    assert {m.name for m in info.models} == {"seg_ct", "seg_mr", "seg_xr", "lesion_embed", "proto_classify"}
    assert info.prototype_set_version.startswith("default-") and info.synthetic_support_set
    assert info.limits.max_instances == IngestLimits().max_instances and info.limits.max_studies_in_flight == 2
    assert info.limits.max_frame_bytes == IngestLimits().max_frame_bytes
    assert (info.limits.upload_deadline_s, info.limits.idle_timeout_s) == (600.0, 30.0)  # GatewayConfig defaults
    assert "SYNTHETIC" in info.disclosure.trained_on and "not for clinical use" in info.disclosure.intended_use


def test_a_study_cspine_cannot_assess_is_a_result_that_says_why_not_an_error(gateway, phantom_cases):
    one_slice = phantom_cases["malignant"].files("ct")[40:41]  # a single slice through a tumor: no volume
    result = gateway.stub.AnalyzeStudy(upload(one_slice, pb.AnalysisOptions(return_dicom_sr=True)), timeout=60)
    (ct,) = result.modalities
    assert ct.assessment.status == pb.NOT_ASSESSABLE and not ct.lesions and not ct.HasField("ood")
    assert [(r.code, r.layer) for r in ct.assessment.reasons] == [
        ("too_few_slices", "input"),
        ("insufficient_coverage", "input"),
    ]
    fused = result.fused
    assert fused.status == pb.NOT_ASSESSABLE and not fused.tumor_detected and not fused.HasField("detection_score")
    assert [r.code for r in fused.reasons] == ["no_assessable_modality"] and not fused.probabilities
    assert fused.status_message.startswith("not assessable: no modality of the study could be assessed")
    assert "not_assessable" in [n.code for n in result.notices] and result.dicom_sr
    assert "SYNTHETIC" in result.disclosure.trained_on
    still_serving(gateway)


def test_health_is_serving_and_reflection_lists_the_api(gateway):
    assert wait_for(lambda: gateway.status() == SERVING)
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(gateway.channel)
    answer = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answer.list_services_response.service}
    assert {"cspine.v1.SpineAnalysis", "grpc.health.v1.Health"} <= names


# ------------------------------------------------------------------------------------------------------
# Bad input over the wire


def test_an_empty_stream_is_invalid(gateway):
    refused(gateway.stub, [], grpc.StatusCode.INVALID_ARGUMENT, "the upload holds no DICOM instance")
    still_serving(gateway)


def test_garbage_bytes_are_invalid_naming_the_instance(gateway):
    messages = [pb.StudyUpload(dicom_instance=b"\x00garbage" * 50)]
    refused(gateway.stub, messages, grpc.StatusCode.INVALID_ARGUMENT, "instance #1: not a DICOM Part-10 file")
    still_serving(gateway)


def test_a_truncated_instance_is_invalid(gateway):
    data = b.ct_series(2).files
    messages = [pb.StudyUpload(dicom_instance=data[0][1]), pb.StudyUpload(dicom_instance=data[1][1][:-100])]
    refused(gateway.stub, messages, grpc.StatusCode.INVALID_ARGUMENT, "instance #2: the pixel data ends after")
    still_serving(gateway)


def test_chunks_out_of_order_are_invalid(gateway):
    data = b.ct_series(1).files[0][1]
    messages = [
        pb.StudyUpload(chunk=pb.DicomChunk(instance_index=0, offset=0, data=data[:100])),
        pb.StudyUpload(chunk=pb.DicomChunk(instance_index=0, offset=200, data=data[200:], last=True)),
    ]
    refused(gateway.stub, messages, grpc.StatusCode.INVALID_ARGUMENT, "chunks out of order, expected offset 100")
    unfinished = [pb.StudyUpload(chunk=pb.DicomChunk(instance_index=0, offset=0, data=data[:100]))]
    refused(gateway.stub, unfinished, grpc.StatusCode.INVALID_ARGUMENT, "chunked instance 0 is incomplete")
    late = [pb.StudyUpload(dicom_instance=data), pb.StudyUpload(options=pb.AnalysisOptions())]
    refused(gateway.stub, late, grpc.StatusCode.INVALID_ARGUMENT, "AnalysisOptions may only be the first message")
    still_serving(gateway)


def test_chunked_instances_are_reassembled(gateway, phantom_cases):
    paths = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
    data = paths[0].read_bytes()
    step = 32 * 1024
    messages = [
        pb.StudyUpload(
            chunk=pb.DicomChunk(instance_index=0, offset=o, data=data[o : o + step], last=o + step >= len(data))
        )
        for o in range(0, len(data), step)
    ]
    result = gateway.stub.AnalyzeStudy(iter(messages), timeout=60)
    assert [m.modality for m in result.modalities] == [pb.XR]
    assert len(messages) > 3


def test_an_unknown_modality_in_the_options_is_invalid_not_internal(gateway, phantom_cases):
    options = pb.AnalysisOptions(modalities=[pb.CT, 7])
    refused(
        gateway.stub,
        upload(files_of(phantom_cases["benign"])[:1], options),
        grpc.StatusCode.INVALID_ARGUMENT,
        "AnalysisOptions.modalities holds 7, which is no Modality of this API",
    )
    still_serving(gateway)


def test_two_studies_in_one_stream_are_invalid(gateway):
    first, second = b.ct_series(1).files[0][1], b.ct_series(1).files[0][1]
    messages = [pb.StudyUpload(dicom_instance=first), pb.StudyUpload(dicom_instance=second)]
    refused(gateway.stub, messages, grpc.StatusCode.INVALID_ARGUMENT, "instance #2")
    still_serving(gateway)


def test_an_oversize_study_is_refused_with_resource_exhausted(triton):
    small = GatewayThread(triton.grpc_url, limits=IngestLimits(max_instances=3, max_study_bytes=10_000))
    try:
        files = [pb.StudyUpload(dicom_instance=f[1]) for f in b.ct_series(4).files]
        refused(small.stub, files, grpc.StatusCode.RESOURCE_EXHAUSTED, "more than the limit of 3 instances")
        big = [pb.StudyUpload(dicom_instance=b"x" * 6000), pb.StudyUpload(dicom_instance=b"x" * 6000)]
        refused(small.stub, big, grpc.StatusCode.RESOURCE_EXHAUSTED, "larger than the limit of 10000 bytes")
        still_serving(small)
    finally:
        small.close()


def test_too_many_concurrent_studies_are_refused_and_a_cancelled_upload_frees_its_place(triton, phantom_cases):
    one = GatewayThread(triton.grpc_url, in_flight=1)
    try:
        held = Held(files_of(phantom_cases["benign"])[0].read_bytes())
        future = one.stub.AnalyzeStudy.future(iter(held), timeout=60)
        assert wait_for(lambda: one.service.in_flight == 1)
        refused(one.stub, [pb.StudyUpload(dicom_instance=b"x")], grpc.StatusCode.RESOURCE_EXHAUSTED, "its limit")
        future.cancel()  # the client goes away mid-upload
        held.release.set()
        assert wait_for(lambda: one.service.in_flight == 0), "a cancelled upload must release its place"
        xr = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
        assert one.stub.AnalyzeStudy(upload(xr), timeout=60).modalities
        counts = one.metrics.registry.get_sample_value(
            "cspine_requests_total", {"rpc": "AnalyzeStudy", "code": "RESOURCE_EXHAUSTED"}
        )
        assert counts == 1.0
    finally:
        one.close()


def test_a_study_waits_in_the_bounded_queue_for_a_free_slot_and_one_beyond_it_is_refused(triton, phantom_cases):
    one = GatewayThread(triton.grpc_url, in_flight=1, queued=1)
    value = one.metrics.registry.get_sample_value
    xr = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
    try:
        held = Held(xr[0].read_bytes())
        first = one.stub.AnalyzeStudy.future(iter(held), timeout=60)
        assert wait_for(lambda: one.service.in_flight == 1)
        second = one.stub.AnalyzeStudy.future(upload(xr), timeout=60)  # waits: the only slot is taken
        assert wait_for(lambda: one.service.queued == 1) and value("cspine_studies_queued") == 1
        start = time.monotonic()
        refused(one.stub, [pb.StudyUpload(dicom_instance=b"x")], grpc.StatusCode.RESOURCE_EXHAUSTED, "1 wait")
        assert time.monotonic() - start < 2.0  # refused at once, not queued
        assert not second.done()
        held.release.set()  # the first study's upload ends: it is analysed, then the queued one
        assert first.result().modalities[0].modality == pb.XR
        assert second.result().modalities[0].modality == pb.XR
        assert one.service.queued == 0 and value("cspine_studies_queued") == 0
        info = one.stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
        assert (info.limits.max_studies_in_flight, info.limits.max_queued_studies) == (1, 1)
    finally:
        one.close()


def test_a_queued_client_that_cancels_leaves_the_queue(triton, phantom_cases):
    one = GatewayThread(triton.grpc_url, in_flight=1, queued=1)
    xr = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
    try:
        held = Held(xr[0].read_bytes())
        first = one.stub.AnalyzeStudy.future(iter(held), timeout=60)
        assert wait_for(lambda: one.service.in_flight == 1)
        waiting = one.stub.AnalyzeStudy.future(upload(xr), timeout=60)
        assert wait_for(lambda: one.service.queued == 1)
        waiting.cancel()
        assert wait_for(lambda: one.service.queued == 0), "a cancelled wait must leave the queue"
        held.release.set()
        assert first.result().modalities
        assert one.stub.AnalyzeStudy(upload(xr), timeout=60).modalities  # the slot is free again
    finally:
        one.close()


def test_an_expired_deadline_gives_deadline_exceeded_and_frees_the_service(gateway, phantom_cases):
    refused(
        gateway.stub,
        list(upload(files_of(phantom_cases["benign"]))),
        grpc.StatusCode.DEADLINE_EXCEEDED,
        "",
        timeout=0.8,
    )
    assert wait_for(lambda: gateway.service.in_flight == 0, timeout=30)
    still_serving(gateway)


# ------------------------------------------------------------------------------------------------------
# Triton going away and coming back; SIGTERM


@pytest.mark.slow
def test_triton_stopped_mid_run_gives_unavailable_flips_health_and_recovers(phantom_cases):
    ports = TritonPorts.free()
    triton = LocalTriton(default_repository(), ports).start()
    server = GatewayThread(triton.grpc_url, health_interval_s=0.3)
    xr = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
    try:
        assert wait_for(lambda: server.status() == SERVING)
        assert server.stub.AnalyzeStudy(upload(xr), timeout=60).modalities
        triton.stop()
        assert wait_for(lambda: server.status() == NOT_SERVING), "health must flip when Triton is gone"
        refused(server.stub, list(upload(xr)), grpc.StatusCode.UNAVAILABLE, "Triton")
        triton = LocalTriton(default_repository(), ports).start()
        assert wait_for(lambda: server.status() == SERVING, timeout=30), "health must recover with Triton"
        assert server.stub.AnalyzeStudy(upload(xr), timeout=60).modalities
    finally:
        server.close()
        triton.stop()


def test_sigterm_drains_the_study_in_flight_then_exits(triton, phantom_cases, tmp_path):
    port = free_port()
    env = {**os.environ, "CSPINE_DATA_DIR": str(tmp_path)}
    command = [sys.executable, "-m", "cspine", "serve", "--triton-url", triton.grpc_url, "--port", str(port)]
    process = subprocess.Popen([*command, "--metrics-port", "0", "--grace", "60"], env=env, stderr=subprocess.PIPE)
    try:
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(plain).result(timeout=60)
        plain.close()
        channel = channel_to(f"127.0.0.1:{port}", find_client_token(tmp_path, Role.ANALYST))
        stub = pb_grpc.SpineAnalysisStub(channel)
        future = stub.AnalyzeStudy.future(upload(files_of(phantom_cases["benign"])), timeout=120)
        time.sleep(1.0)  # the study is being analysed
        process.send_signal(signal.SIGTERM)
        result = future.result()
        assert result.fused.probabilities, "the study in flight finishes during the drain"
        assert process.wait(timeout=60) == 0
        channel.close()
    finally:
        if process.poll() is None:
            process.kill()
        logs = process.stderr.read().decode()
    assert "draining: 1 studies in flight" in logs and "stopped" in logs
