"""The DICOM node in-process on a real gateway (real Triton, real AnalysisService): C-ECHO and C-STORE with
pynetdicom as the PACS, STOW-RS over HTTP, results sent by C-STORE to a pynetdicom storage SCP, and what holds
across a restart. Studies are SYNTHETIC phantom cases and pydicom-written files; Orthanc and dcmtk as peers are
in test_dicomnet_peers.py."""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
import requests
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from cspine.bench.peers import multipart_related
from cspine.config import DicomNodeConfig
from cspine.dicomnet.node import DicomNode
from support.dicom import PATIENT_ID, PATIENT_NAME, ct_series
from support.server import GatewayThread, files_of, free_port, wait_for
from support.tokens import ANALYST_TOKEN, TOKENS

CALLING = "TESTPACS"


class Destination:
    """A storage SCP standing in for the PACS that takes results (pynetdicom): the data sets it received."""

    def __init__(self, ae_title: str = "RESULTS") -> None:
        self.ae_title = ae_title
        self.port = free_port()
        self.received: list[pydicom.Dataset] = []
        self.server = None

    def start(self) -> Destination:
        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts

        def on_store(event):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.received.append(ds)
            return 0x0000

        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    @property
    def url(self) -> str:
        return f"out=dimse://{self.ae_title}@127.0.0.1:{self.port}"


def c_store(port: int, paths_or_bytes, calling: str = CALLING) -> list[int]:
    """Send files with pynetdicom as the PACS would; the C-STORE statuses."""
    datasets = [pydicom.dcmread(io.BytesIO(p) if isinstance(p, bytes) else p) for p in paths_or_bytes]
    ae = AE(ae_title=calling)
    for sop_class in {ds.SOPClassUID for ds in datasets}:
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def gateway(triton):
    gateway = GatewayThread(triton.grpc_url, in_flight=2, queued=4)
    yield gateway
    gateway.close()


def start_node(gateway: GatewayThread, data_dir: Path, **config) -> DicomNode:
    settings = {"port": 0, "dicomweb_port": 0, "allowed_aes": (CALLING,), "quiet_s": 0.5, **config}
    node = DicomNode(gateway.service, DicomNodeConfig(**settings), "127.0.0.1", data_dir, gateway.metrics, TOKENS)
    return gateway.call(node.start())


def metric(gateway: GatewayThread, name: str, **labels) -> float:
    return gateway.metrics.registry.get_sample_value(name, labels) or 0.0


def test_c_echo_then_a_study_over_c_store_gives_its_seg_and_sr_in_the_same_study_at_the_destination(
    gateway, phantom_cases, tmp_path, caplog
):
    destination = Destination().start()
    node = start_node(gateway, tmp_path, destinations=(destination.url,))
    try:
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="CSPINE")
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
        case = phantom_cases["malignant"]
        paths = [p for p in files_of(case) if "/ct/" not in str(p)]  # MR and radiograph: seconds, not a minute
        with caplog.at_level(logging.INFO, logger="cspine.audit"):
            assert set(c_store(node.dimse_port, paths)) == {0x0000}
            assert wait_for(lambda: len(destination.received) == 2, timeout=120), "no SEG and SR arrived"
        seg, sr = sorted(destination.received, key=lambda ds: ds.Modality != "SEG")
        study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
        assert (
            seg.Modality == "SEG" and sr.Modality == "SR" and {seg.StudyInstanceUID, sr.StudyInstanceUID} == {study_uid}
        )
        assert hd.seg.Segmentation.from_dataset(seg).number_of_segments > 0
        report = hd.sr.srread(io.BytesIO(_bytes(sr)))
        assert report.StudyInstanceUID == study_uid
        assert metric(gateway, "cspine_dicom_instances_received_total", via="dimse") >= len(paths)
        assert metric(gateway, "cspine_dicom_deliveries_total", destination="out", outcome="delivered") >= 2
        assert gateway.metrics.registry.get_sample_value("cspine_dicom_outbox_depth") == 0
        events = [r.audit["event"] for r in caplog.records if hasattr(r, "audit")]
        assert {"received", "analysed", "delivered"} <= set(events)
        logged = "\n".join(r.getMessage() for r in caplog.records)
        assert study_uid in logged and PATIENT_NAME.split("^")[0] not in logged and PATIENT_ID not in logged
    finally:
        gateway.call(node.stop())
        destination.stop()


def test_an_unknown_calling_ae_title_is_rejected_at_association_time(gateway, tmp_path):
    node = start_node(gateway, tmp_path)
    try:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="CSPINE")
        assert assoc.is_rejected and not assoc.is_established
        assert metric(gateway, "cspine_dicom_associations_total", outcome="rejected") >= 1
    finally:
        gateway.call(node.stop())


def test_a_peer_outside_the_allowed_networks_gets_no_association(gateway, tmp_path):
    node = start_node(gateway, tmp_path, allowed_peers=("10.0.0.0/8",))
    try:
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.dimse_port, ae_title="CSPINE")
        assert not assoc.is_established
        assert metric(gateway, "cspine_dicom_associations_total", outcome="refused") >= 1
    finally:
        gateway.call(node.stop())


def test_a_study_that_cannot_be_analysed_gets_an_sr_that_says_why(gateway, tmp_path):
    """A lone 16 × 12 CT slice: ingest takes it, nothing in it can be assessed; the PACS gets an SR, not silence."""
    destination = Destination().start()
    node = start_node(gateway, tmp_path, destinations=(destination.url,))
    try:
        built = ct_series(1)
        assert c_store(node.dimse_port, [built.files[0][1]]) == [0x0000]
        assert wait_for(lambda: len(destination.received) >= 1, timeout=60)
        [sr] = [ds for ds in destination.received if ds.Modality == "SR"]
        assert sr.StudyInstanceUID == built.study_uid
        text = json.dumps(sr.to_json_dict())
        assert "not" in text.lower() and ("assess" in text.lower() or "analys" in text.lower())
    finally:
        gateway.call(node.stop())
        destination.stop()


def test_stow_rs_stores_a_study_and_its_complete_trigger_analyses_it_at_once(gateway, phantom_cases, tmp_path):
    destination = Destination().start()
    node = start_node(gateway, tmp_path, destinations=(destination.url,), quiet_s=3600)  # only the trigger
    try:
        paths = phantom_cases["benign"].files("xr")
        body, content_type = multipart_related([p.read_bytes() for p in paths])
        url = f"http://127.0.0.1:{node.dicomweb_port}/studies"
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {ANALYST_TOKEN}"}
        answer = requests.post(url, data=body, headers=headers, timeout=30)
        assert answer.status_code == 200, answer.text
        stored = answer.json()["00081199"]["Value"]
        assert len(stored) == len(paths)
        study_uid = pydicom.dcmread(paths[0]).StudyInstanceUID
        time.sleep(1.0)
        assert destination.received == []  # the quiet period is an hour: nothing until the trigger
        auth = {"Authorization": f"Bearer {ANALYST_TOKEN}"}
        assert requests.post(f"{url}/{study_uid}/complete", headers=auth, timeout=10).status_code == 202
        assert wait_for(lambda: len(destination.received) == 2, timeout=120)
        assert requests.post(f"{url}/1.2.3.4/complete", headers=auth, timeout=10).status_code == 404
    finally:
        gateway.call(node.stop())
        destination.stop()


def test_results_wait_in_the_outbox_while_the_destination_is_down_and_arrive_after_a_node_restart(
    gateway, phantom_cases, tmp_path
):
    destination = Destination()  # not started: connection refused
    node = start_node(gateway, tmp_path, destinations=(destination.url,))
    paths = phantom_cases["none"].files("xr")
    try:
        assert set(c_store(node.dimse_port, paths)) == {0x0000}
        assert wait_for(lambda: metric(gateway, "cspine_dicom_studies_total", outcome="analysed") >= 1, timeout=120)
        assert wait_for(
            lambda: metric(gateway, "cspine_dicom_deliveries_total", destination="out", outcome="failed") >= 2
        )
        assert sum(node.outbox.depth().values()) == 2
    finally:
        gateway.call(node.stop())
    destination.start()
    restarted = start_node(gateway, tmp_path, destinations=(destination.url,))
    try:
        assert wait_for(lambda: len(destination.received) == 2, timeout=30), "the outbox was not delivered"
        assert {ds.StudyInstanceUID for ds in destination.received} == {pydicom.dcmread(paths[0]).StudyInstanceUID}
    finally:
        gateway.call(restarted.stop())
        destination.stop()


def test_a_study_half_received_before_a_restart_is_analysed_with_every_instance_after_it(gateway, tmp_path):
    built = ct_series(4)
    node = start_node(gateway, tmp_path, quiet_s=3600)
    try:
        assert c_store(node.dimse_port, [data for _, data in built.files[:2]]) == [0x0000, 0x0000]
    finally:
        gateway.call(node.stop())
    restarted = start_node(gateway, tmp_path, quiet_s=0.5)
    try:
        assert c_store(restarted.dimse_port, [data for _, data in built.files[2:]]) == [0x0000, 0x0000]
        _, _, instances = restarted.spool.begin(built.study_uid)
        assert len(instances) == 4
        assert wait_for(lambda: restarted.spool.pending() == 0, timeout=60)
    finally:
        gateway.call(restarted.stop())


def test_c_store_of_what_passes_the_study_limit_is_refused_with_out_of_resources(triton, tmp_path):
    from cspine.config import IngestLimits

    small = GatewayThread(triton.grpc_url, limits=IngestLimits(max_instances=2))
    node = start_node(small, tmp_path)
    try:
        built = ct_series(3)
        assert c_store(node.dimse_port, [data for _, data in built.files]) == [0x0000, 0x0000, 0xA700]
    finally:
        small.call(node.stop())
        small.close()


def _content_items(ds: pydicom.Dataset):
    """Every content item of an SR document tree."""
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content_items(item)


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_dicom_tls_with_client_certificates_on_both_ports(gateway, tmp_path):
    import ssl

    from cspine.dicomnet.node import tls_context
    from support.tls import make_pki

    pki = make_pki(tmp_path / "pki")
    tls = tls_context(pki["server_cert"], pki["server_key"], pki["ca"])
    config = DicomNodeConfig(port=0, dicomweb_port=0, allowed_aes=(CALLING,), quiet_s=3600, tls=True)
    node = gateway.call(DicomNode(gateway.service, config, "127.0.0.1", tmp_path, gateway.metrics, TOKENS, tls).start())
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        client.load_cert_chain(pki["client_cert"], pki["client_key"])
        ae = AE(ae_title=CALLING)
        ae.add_requested_context(Verification)
        secure = ae.associate("127.0.0.1", node.dimse_port, ae_title="CSPINE", tls_args=(client, "localhost"))
        assert secure.is_established and secure.send_c_echo().Status == 0x0000
        secure.release()
        plain = ae.associate("127.0.0.1", node.dimse_port, ae_title="CSPINE")
        assert not plain.is_established  # no TLS: no association
        no_certificate = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
        refused = ae.associate("127.0.0.1", node.dimse_port, ae_title="CSPINE", tls_args=(no_certificate, "localhost"))
        assert not refused.is_established  # a client without a certificate the CA signed
        built = ct_series(1)
        body, content_type = multipart_related([built.files[0][1]])
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {ANALYST_TOKEN}"}
        answer = requests.post(
            f"https://localhost:{node.dicomweb_port}/studies",
            data=body,
            headers=headers,
            verify=str(pki["ca"]),
            cert=(str(pki["client_cert"]), str(pki["client_key"])),
            timeout=30,
        )
        assert answer.status_code == 200
    finally:
        gateway.call(node.stop())


def test_a_study_ingest_refuses_gets_the_not_analysed_sr_with_the_reason(gateway, tmp_path):
    """A CT slice whose pixel data is cut short: stored (it is a data set), refused by ingest, and the PACS gets
    an SR titled "Study not analysed by cspine" that says why."""
    destination = Destination().start()
    node = start_node(gateway, tmp_path, destinations=(destination.url,))
    try:
        ds = pydicom.dcmread(io.BytesIO(ct_series(1).files[0][1]))
        ds.PixelData = ds.PixelData[:100]
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        assert c_store(node.dimse_port, [buffer.getvalue()]) == [0x0000]
        assert wait_for(lambda: len(destination.received) == 1, timeout=60)
        [sr] = destination.received
        assert sr.Modality == "SR" and sr.StudyInstanceUID == ds.StudyInstanceUID
        text = json.dumps(sr.to_json_dict())
        assert "Study not analysed by cspine" in text and "pixel data" in text.lower()
        reasons = [item.TextValue for item in _content_items(sr) if "TextValue" in item]
        assert reasons and all(PATIENT_NAME not in r and PATIENT_ID not in r for r in reasons)
        assert metric(gateway, "cspine_dicom_studies_total", outcome="not_analysed") >= 1
    finally:
        gateway.call(node.stop())
        destination.stop()
