"""The DICOM peers of cspine.bench.peers (for the DICOM node's tests and `cspine bench dicomnet`), proven against each
other on 127.0.0.1: a throwaway Orthanc answers C-ECHO, takes a storescu study (CT, Segmentation, Comprehensive 3D
SR, Enhanced SR), C-STOREs it to a harness storescp, takes a STOW-RS POST, keeps its studies across a restart; what
it does with a re-sent SOP instance; start failures and cleanup."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom import uid as dicom_uid

from cspine.bench.peers import Orthanc, StoreScp, echoscu, multipart_related, storescu
from support import dicom as b

CALLING = "CSPINE_TEST"


def _object(sop_class_uid: str, modality: str, study_uid: str) -> bytes:
    """A small instance of ``sop_class_uid`` (identity and SOP common modules only: what C-STORE negotiates)."""
    ds = b.base_dataset(
        sop_class_uid=sop_class_uid, modality=modality, study_uid=study_uid, series_uid=dicom_uid.generate_uid()
    )
    return b.encode(ds)


def _write(directory: Path, files: list[tuple[str, bytes]]) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in files:
        (path := directory / name).write_bytes(data)
        paths.append(path)
    return paths


def _sop_uid(data: bytes | Path) -> str:
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    return str(pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID)


def _with_description(data: bytes, description: str) -> bytes:
    ds = b.dataset_of(data)
    ds.SeriesDescription = description
    return b.encode(ds)


def _description(pacs: Orthanc, orthanc_id: str) -> str:
    return pacs.rest("GET", f"/instances/{orthanc_id}/tags?simplify").json()["SeriesDescription"]


def test_orthanc_takes_a_storescu_study_and_c_stores_it_to_a_storescp(tmp_path):
    ct = b.ct_series(2, rows=8, cols=8)
    files = [
        *ct.files,
        ("seg.dcm", _object(dicom_uid.SegmentationStorage, "SEG", ct.study_uid)),
        ("sr3d.dcm", _object(dicom_uid.Comprehensive3DSRStorage, "SR", ct.study_uid)),
        ("esr.dcm", _object(dicom_uid.EnhancedSRStorage, "SR", ct.study_uid)),
    ]
    sent = {_sop_uid(data) for _, data in files}
    with StoreScp("RESULTS_SCP") as scp, Orthanc(modalities={"OUT": scp.modality}) as pacs:
        echo = echoscu("127.0.0.1", pacs.dicom_port, pacs.aet, CALLING)
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert echoscu("127.0.0.1", pacs.dicom_port, "NOT_ORTHANC", CALLING).returncode != 0  # called AET checked
        assert echoscu("127.0.0.1", scp.port, scp.aet, CALLING).returncode == 0

        stored = storescu("127.0.0.1", pacs.dicom_port, pacs.aet, CALLING, _write(tmp_path / "in", files))
        assert stored.returncode == 0, stored.stdout + stored.stderr
        assert {_sop_uid(data) for data in pacs.study_instances(ct.study_uid)} == sent
        assert pacs.study_instances("1.2.3.4.5") == []
        with pytest.raises(RuntimeError, match="HTTP 404"):
            pacs.store_to("NOT_DECLARED", pacs.studies()[ct.study_uid])

        answer = pacs.store_to("OUT", pacs.studies()[ct.study_uid])
        assert answer["InstancesCount"] == len(files), answer
        received = scp.wait_for(len(files))
        assert {_sop_uid(path) for path in received} == sent
        assert {(r.calling_aet, r.called_aet) for r in scp.received()} == {("ORTHANC", "RESULTS_SCP")}
        assert all(path.parent == scp.out_dir for path in received)
        with pytest.raises(TimeoutError, match=f"received {len(files)} of {len(files) + 1}"):
            scp.wait_for(len(files) + 1, timeout=0.2)


def test_a_stow_rs_post_to_the_dicomweb_url_is_stored():
    ct = b.ct_series(1, rows=8, cols=8)
    (_, data), sop_uid = ct.files[0], _sop_uid(ct.files[0][1])
    with Orthanc() as pacs:
        assert pacs.dicomweb_url == f"http://127.0.0.1:{pacs.http_port}/dicom-web"
        body, content_type = multipart_related([data])
        assert content_type.startswith('multipart/related; type="application/dicom"; boundary=')
        response = requests.post(
            f"{pacs.dicomweb_url}/studies",
            data=body,
            headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert not answer.get("00081198", {}).get("Value")  # FailedSOPSequence: absent or empty
        assert [item["00081155"]["Value"][0] for item in answer["00081199"]["Value"]] == [sop_uid]
        assert [_sop_uid(d) for d in pacs.study_instances(ct.study_uid)] == [sop_uid]
        qido = pacs.rest("GET", f"/dicom-web/studies?StudyInstanceUID={ct.study_uid}").json()
        assert qido[0]["0020000D"]["Value"] == [ct.study_uid]


def test_restart_keeps_the_stored_study_ports_and_modalities():
    ct = b.ct_series(1, rows=8, cols=8)
    with Orthanc(modalities={"PEER": ["PEER", "127.0.0.1", 1]}) as pacs:
        pacs.upload(ct.files[0][1])
        pacs.add_modality("LATER", "LATER", "127.0.0.1", 2)
        ports, pid = (pacs.http_port, pacs.dicom_port), pacs.process.pid
        pacs.restart()
        assert pacs.process.pid != pid and pacs.running
        assert (pacs.http_port, pacs.dicom_port) == ports
        assert list(pacs.studies()) == [ct.study_uid]
        assert [_sop_uid(d) for d in pacs.study_instances(ct.study_uid)] == [_sop_uid(ct.files[0][1])]
        assert sorted(pacs.rest("GET", "/modalities").json()) == ["LATER", "PEER"]
        assert echoscu("127.0.0.1", pacs.dicom_port, pacs.aet, CALLING).returncode == 0


@pytest.mark.parametrize("overwrite", [False, True], ids=["keep-first", "overwrite"])
def test_a_re_sent_sop_instance_is_reported_stored_and_kept_or_replaced(tmp_path, overwrite):
    """The behaviour Orthanc's docstring describes, by REST, C-STORE and STOW-RS."""
    ct = b.ct_series(1, rows=8, cols=8)
    first = ct.files[0][1]
    with Orthanc(overwrite_instances=overwrite) as pacs:
        orthanc_id = pacs.upload(first)["ID"]

        again = pacs.upload(_with_description(first, "BY REST"))
        assert (again["ID"], again["Status"]) == (orthanc_id, "Success" if overwrite else "AlreadyStored")
        assert _description(pacs, orthanc_id) == ("BY REST" if overwrite else "AX CT BONE")

        (path := tmp_path / "again.dcm").write_bytes(_with_description(first, "BY C-STORE"))
        stored = storescu("127.0.0.1", pacs.dicom_port, pacs.aet, CALLING, [path])
        assert stored.returncode == 0 and "Received Store Response (Success)" in stored.stderr, stored.stderr
        assert _description(pacs, orthanc_id) == ("BY C-STORE" if overwrite else "AX CT BONE")

        response = pacs.stow([_with_description(first, "BY STOW")])
        assert response.status_code == 200 and not response.json().get("00081198", {}).get("Value"), response.text
        assert _description(pacs, orthanc_id) == ("BY STOW" if overwrite else "AX CT BONE")
        assert pacs.rest("GET", "/instances").json() == [orthanc_id]

        other_patient = b.dataset_of(first)
        other_patient.PatientID = "ANOTHER-PATIENT"
        assert pacs.upload(b.encode(other_patient))["ID"] != orthanc_id  # another instance, same SOP UID
        assert len(pacs.rest("POST", "/tools/lookup", data=_sop_uid(first)).json()) == 2


def test_peers_clean_up_and_a_failed_start_names_orthanc_s_log():
    with Orthanc() as pacs, StoreScp() as scp:
        roots, processes = (pacs.root, scp.root), (pacs.process, scp.process)
    assert all(p.poll() is not None for p in processes)
    assert not any(root.exists() for root in roots)

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        pacs = Orthanc(config={"HttpPort": taken.getsockname()[1]})
        with pytest.raises(RuntimeError, match="(?s)Orthanc exited.*orthanc.log"), pacs:
            pass
        assert not pacs.root.exists() and pacs.process.poll() is not None


def test_the_receive_bench_measures_every_way_in_on_the_same_study(phantom_cases, tmp_path, monkeypatch):
    """`cspine bench dicomnet`'s receiving half, one round on one SYNTHETIC series: each path ran and kept every
    instance (the bench checks what each one stored), and the ratios are the rates' ratios."""
    from cspine.bench.dicomnet import bench_receive

    monkeypatch.setenv("TCP_NODELAY", "1")
    files = next(iter(phantom_cases.values())).files("ct")[:10]
    result = bench_receive(files, tmp_path, repeats=1)
    rate = result["instances_per_s"]
    paths = {"dcmtk", "cspine_c_store", "cspine_stow", "pynetdicom_keeping_nothing", "spool_alone", "orthanc"}
    assert set(rate) == paths
    assert all(value > 0 for value in rate.values())
    assert result["c_store_vs_dcmtk"] == round(rate["cspine_c_store"] / rate["dcmtk"], 2)
    assert result["spool_ms_per_instance"] == pytest.approx(1000 / rate["spool_alone"], rel=0.05)
