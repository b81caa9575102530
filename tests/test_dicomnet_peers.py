"""The DICOM node with real peers on loopback: Orthanc (Debian's orthanc, with its DICOMweb plugin) as the
hospital's PACS and dcmtk's echoscu, storescu and storescp; a real Triton; `cspine serve` itself for the
restart. Studies are SYNTHETIC phantom cases; results are read back with highdicom."""

from __future__ import annotations

import io
import time

import highdicom as hd
import pydicom
import pytest

from cspine.bench.peers import Orthanc, StoreScp, echoscu, storescu
from cspine.ops.embedded import EmbeddedServer
from support.server import files_of, free_port, wait_for
from test_dicomnet import gateway, metric, start_node  # noqa: F401 - the module's gateway fixture

pytestmark = pytest.mark.usefixtures("triton")


def results_in(pacs: Orthanc, study_uid: str) -> dict[str, pydicom.Dataset]:
    """The SEG and SR Orthanc holds in the study, by modality."""
    found = {}
    for data in pacs.study_instances(study_uid):
        ds = pydicom.dcmread(io.BytesIO(data))
        if ds.Modality in ("SEG", "SR"):
            found[ds.Modality] = ds
    return found


def test_orthanc_pushes_a_study_and_gets_seg_and_sr_back_into_it_even_after_being_down(
    gateway,  # noqa: F811
    phantom_cases,
    tmp_path,
):
    with Orthanc() as pacs:
        node = start_node(
            gateway,
            tmp_path,
            allowed_aes=("ORTHANC",),
            destinations=(f"pacs=dimse://ORTHANC@127.0.0.1:{pacs.dicom_port}",),
        )
        try:
            pacs.add_modality("cspine", "CSPINE", "127.0.0.1", node.dimse_port)
            paths = [p for p in files_of(phantom_cases["borderline"]) if "/ct/" not in str(p)]
            for path in paths:
                pacs.upload(path)
            study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
            pacs.store_to("cspine", pacs.studies()[study_uid])  # Orthanc's REST /modalities/cspine/store
            assert wait_for(lambda: len(results_in(pacs, study_uid)) == 2, timeout=120), node.outbox.depth()
            results = results_in(pacs, study_uid)
            seg = hd.seg.segread(io.BytesIO(_bytes(results["SEG"])))
            report = hd.sr.srread(io.BytesIO(_bytes(results["SR"])))
            assert seg.number_of_segments > 0 and report.StudyInstanceUID == study_uid
            before = {ds.SOPInstanceUID for ds in results.values()}
            count = len(pacs.study_instances(study_uid))

            # The same study again while Orthanc is down: analysed, held in the outbox, delivered once it is back,
            # with the same SOP Instance UIDs (same models, same prototype set): no duplicates in the study.
            pacs.stop()
            node.spool.trigger(study_uid)
            node.spool.store(paths[0].read_bytes(), "127.0.0.1")  # a late copy of one instance makes it due
            assert wait_for(
                lambda: metric(gateway, "cspine_dicom_deliveries_total", destination="pacs", outcome="failed") >= 1,
                timeout=120,
            )
            pacs.restart()
            assert wait_for(lambda: sum(node.outbox.depth().values()) == 0, timeout=60)
            assert {ds.SOPInstanceUID for ds in results_in(pacs, study_uid).values()} == before
            assert len(pacs.study_instances(study_uid)) == count
        finally:
            gateway.call(node.stop())


def test_stow_rs_destination_delivers_to_orthanc_s_dicomweb(gateway, phantom_cases, tmp_path):  # noqa: F811
    with Orthanc() as pacs:
        node = start_node(gateway, tmp_path, destinations=(f"web={pacs.dicomweb_url}",))
        try:
            paths = phantom_cases["none"].files("xr")
            for path in paths:
                node.spool.store(path.read_bytes(), "127.0.0.1")
            study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
            assert wait_for(lambda: len(results_in(pacs, study_uid)) == 2, timeout=120), node.outbox.depth()
        finally:
            gateway.call(node.stop())


def test_dcmtk_echo_store_and_results_to_storescp_and_an_unknown_ae_refused(
    gateway,  # noqa: F811
    phantom_cases,
    tmp_path,
):
    with StoreScp("RESULTS") as scp:
        node = start_node(
            gateway,
            tmp_path,
            allowed_aes=("STORESCU", "ECHOSCU"),
            destinations=(f"out=dimse://RESULTS@127.0.0.1:{scp.port}",),
        )
        try:
            assert echoscu("127.0.0.1", node.dimse_port, "CSPINE").returncode == 0
            paths = phantom_cases["malignant"].files("xr")
            sent = storescu("127.0.0.1", node.dimse_port, "CSPINE", "STORESCU", paths)
            assert sent.returncode == 0, sent.stderr
            received = scp.wait_for(2, timeout=120)
            modalities = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in received)
            assert modalities == ["SEG", "SR"]
            refused = storescu("127.0.0.1", node.dimse_port, "CSPINE", "INTRUDER", paths)
            assert refused.returncode != 0 and "Rejected" in refused.stdout + refused.stderr
        finally:
            gateway.call(node.stop())


def test_cspine_serve_restarted_with_a_study_half_received_and_results_pending_loses_nothing(
    triton, phantom_cases, tmp_path
):
    dicom_port = free_port()
    paths = phantom_cases["benign"].files("xr") + phantom_cases["benign"].files("mr_t2")
    scp = StoreScp("RESULTS")
    scp_port = free_port()
    common = ["--triton-url", triton.grpc_url, "--dicom-port", str(dicom_port), "--dicom-allowed-aes", "STORESCU"]
    common += ["--dicom-destination", f"out=dimse://RESULTS@127.0.0.1:{scp_port}"]
    data_dir = tmp_path / "data"
    first, rest = paths[:8], paths[8:]  # the radiograph and 7 MR slices, then the other 8
    with EmbeddedServer(data_dir, tmp_path / "serve-1.log", [*common, "--dicom-quiet", "3600"]):
        assert storescu("127.0.0.1", dicom_port, "CSPINE", "STORESCU", first).returncode == 0
    # Restarted: the rest arrives, the study is analysed with every instance, the destination is down.
    with EmbeddedServer(data_dir, tmp_path / "serve-2.log", [*common, "--dicom-quiet", "1"]):
        assert storescu("127.0.0.1", dicom_port, "CSPINE", "STORESCU", rest).returncode == 0
        log = tmp_path / "serve-2.log"
        # An analysis of the 8 instances kept across the restart may start before the rest arrives; the one with
        # all 16 follows and replaces its waiting results (test_dicomnet_store.py checks the replacement).
        whole = f"instances={len(paths)}"
        assert wait_for(lambda: "delivery failed" in log.read_text().partition(whole)[2], timeout=180)
    # Restarted again with the destination up: the pending results are delivered.
    scp.start(port=scp_port)
    try:
        with EmbeddedServer(data_dir, tmp_path / "serve-3.log", [*common, "--dicom-quiet", "1"]):
            received = scp.wait_for(2, timeout=60)
            time.sleep(3)
            assert len(scp.files()) == 2  # the superseded results of the partial analysis are never sent
        study_uid = pydicom.dcmread(first[0]).StudyInstanceUID
        assert {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in received} == {study_uid}
    finally:
        scp.close()


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
