"""The DICOM node's durable parts on real files and SQLite: the spool (received instances grouped by study, due
after the quiet period, kept across a reopen) and the outbox (results per destination, retried with backoff)."""

from __future__ import annotations

import time

import pytest

from cspine.config import DicomNodeConfig, IngestLimits
from cspine.dicomnet.outbox import RETRY_FIRST_S, RETRY_MAX_S, Outbox, retry_delay
from cspine.dicomnet.spool import Spool, StudyMismatchError, name_of
from cspine.errors import NotDicomError, StudyTooLargeError
from support.dicom import PATIENT_ID, PATIENT_NAME, ct_series
from support.tokens import ANALYST_TOKEN


def test_an_instance_is_on_disk_and_in_the_index_when_store_returns_and_a_reopened_spool_has_it(tmp_path):
    built = ct_series(3)
    spool = Spool(tmp_path)
    first = spool.store(built.files[0][1], "127.0.0.1")
    second = spool.store(built.files[1][1], "127.0.0.1")
    assert first.new_study and not second.new_study and first.study_uid == built.study_uid
    spool.close()
    names = sorted(p.name for p in (tmp_path / "instances").rglob("*.dcm"))
    assert len(names) == 2 and all(PATIENT_ID not in n and built.study_uid not in n for n in names)
    reopened = Spool(tmp_path)
    last, peer, instances = reopened.begin(built.study_uid)
    assert peer == "127.0.0.1" and sorted(data for _, data in instances) == sorted(d for _, d in built.files[:2])
    assert all(PATIENT_NAME not in label for label, _ in instances)  # labels say "received instance N"


def test_a_study_is_due_after_the_quiet_period_or_at_once_when_triggered(tmp_path):
    spool = Spool(tmp_path)
    built = ct_series(2)
    for _, data in built.files:
        spool.store(data, "peer")
    now = time.time()
    assert spool.due(now, quiet_s=5) == []
    assert spool.due(now + 6, quiet_s=5) == [built.study_uid]
    assert 0 < spool.next_due(5) - now <= 5.1
    assert spool.trigger(built.study_uid) and spool.due(now, quiet_s=5) == [built.study_uid]
    assert not spool.trigger("1.2.3.4")  # nothing of it here


def test_an_analysed_study_is_due_again_only_when_a_new_instance_arrives_and_purge_removes_it(tmp_path):
    spool = Spool(tmp_path)
    built = ct_series(3)
    spool.store(built.files[0][1], "peer")
    upto, _, _ = spool.begin(built.study_uid)
    spool.finish(built.study_uid, upto)
    assert spool.due(time.time() + 100, quiet_s=1) == [] and spool.pending() == 0
    spool.store(built.files[1][1], "peer")  # a late instance: the study again, with both
    _, _, instances = spool.begin(built.study_uid)
    assert spool.due(time.time() + 100, quiet_s=1) == [built.study_uid] and len(instances) == 2
    spool.finish(built.study_uid, spool.begin(built.study_uid)[0])
    assert spool.purge(time.time() + 10, retain_s=5) == 2
    assert not list((tmp_path / "instances").rglob("*.dcm")) and not spool.trigger(built.study_uid)


def test_a_deferred_study_waits_for_its_time(tmp_path):
    spool = Spool(tmp_path)
    built = ct_series(1)
    spool.store(built.files[0][1], "peer")
    now = time.time()
    spool.defer(built.study_uid, now + 30)
    assert spool.due(now + 10, quiet_s=1) == [] and spool.due(now + 31, quiet_s=1) == [built.study_uid]


def test_the_spool_refuses_what_is_not_dicom_what_passes_the_limits_and_another_study_s_instance(tmp_path):
    built = ct_series(3)
    spool = Spool(tmp_path, IngestLimits(max_instances=2))
    with pytest.raises(NotDicomError, match="part 1: not a DICOM Part-10 file"):
        spool.store(b"%PDF-1.4 not dicom", "peer", "part 1")
    spool.store(built.files[0][1], "peer")
    spool.store(built.files[0][1], "peer")  # the same instance again replaces it
    spool.store(built.files[1][1], "peer")
    with pytest.raises(StudyTooLargeError, match="more than the limit of 2 instances"):
        spool.store(built.files[2][1], "peer")
    small = Spool(tmp_path / "small", IngestLimits(max_study_bytes=len(built.files[0][1]) + 10))
    small.store(built.files[0][1], "peer")
    with pytest.raises(StudyTooLargeError, match="larger than the limit"):
        small.store(built.files[1][1], "peer")
    with pytest.raises(StudyMismatchError, match="another study"):
        spool.store(ct_series(1).files[0][1], "peer", "part 2", study=built.study_uid)
    assert len(list((tmp_path / "instances" / name_of(built.study_uid)).glob("*.dcm"))) == 2


def test_the_outbox_keeps_each_object_per_destination_until_delivered_and_backs_off_on_failure(tmp_path):
    outbox = Outbox(tmp_path)
    assert outbox.put("1.2.3", [("SEG", "1.2.3.1", b"seg"), ("SR", "1.2.3.2", b"sr")], ["pacs", "web"]) == 4
    now = time.time()
    due = outbox.due(now, ["pacs"])
    assert [(i.kind, i.destination) for i in due] == [("SEG", "pacs"), ("SR", "pacs")]
    retry_at = outbox.failed(due[0], "pacs did not answer", now)
    assert retry_at == pytest.approx(now + RETRY_FIRST_S)
    assert [i.kind for i in outbox.due(now, ["pacs"])] == ["SR"]
    outbox.close()
    reopened = Outbox(tmp_path)  # a restart keeps everything
    assert reopened.depth() == {"pacs": 2, "web": 2}
    for item in reopened.due(now, ["pacs", "web"]):
        reopened.delivered(item)
    assert reopened.depth() == {"pacs": 1} and len(list((tmp_path / "outbox").glob("*.dcm"))) == 1
    [seg] = reopened.due(retry_at, ["pacs"])
    reopened.delivered(seg)
    assert reopened.depth() == {} and not list((tmp_path / "outbox").glob("*.dcm"))
    assert [retry_delay(n) for n in (1, 2, 3)] == [RETRY_FIRST_S, 2 * RETRY_FIRST_S, 4 * RETRY_FIRST_S]
    assert retry_delay(40) == RETRY_MAX_S


def test_destinations_parse_and_hide_their_password():
    config = DicomNodeConfig(
        destinations=("pacs=dimse://ORTHANC@127.0.0.1:4242", "web=https://cspine:s3cret@pacs.example/dicom-web")
    )
    pacs, web = config.parsed_destinations
    assert (pacs.kind, pacs.dimse, web.kind) == ("dimse", ("ORTHANC", "127.0.0.1", 4242), "stow")
    assert web.shown == "https://cspine@pacs.example/dicom-web" and "s3cret" not in repr(config)
    for bad, message in (
        ("pacs", "NAME=URL"),
        ("pacs=dimse://127.0.0.1:4242", "dimse://AE_TITLE@HOST:PORT"),
        ("pacs=ftp://host", "must start with"),
    ):
        with pytest.raises(ValueError, match=message):
            DicomNodeConfig(destinations=(bad,))
    with pytest.raises(ValueError, match="names must differ"):
        DicomNodeConfig(destinations=("a=dimse://X@h:1", "a=dimse://Y@h:2"))
    with pytest.raises(ValueError, match="addresses or networks"):
        DicomNodeConfig(allowed_peers=("not-an-address",))


class StowThread:
    """The STOW-RS receiver alone (no analysis) on its own event loop thread, on a free port."""

    def __init__(self, root, limits=IngestLimits()) -> None:
        import asyncio
        import threading

        from cspine.dicomnet.stow import StowReceiver
        from support.tokens import TOKENS

        self.spool = Spool(root, limits)
        self.received, self.triggered = [], []
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.receiver = StowReceiver(
            self.spool, TOKENS, limits, lambda r, *rest: self.received.append(r), self.triggered.append
        )
        port = asyncio.run_coroutine_threadsafe(self.receiver.start("127.0.0.1", 0), self.loop).result(10)
        self.url = f"http://127.0.0.1:{port}/studies"

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.receiver.stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.spool.close()


def _post(url, parts, token=ANALYST_TOKEN, **headers):
    import requests

    from cspine.bench.peers import multipart_related

    body, content_type = multipart_related(parts)
    headers = {"Content-Type": content_type, **headers}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(url, data=body, headers=headers, timeout=30)


def test_stow_rs_answers_with_the_status_codes_integrators_expect(tmp_path):
    import requests

    built = ct_series(3)
    stow = StowThread(tmp_path, IngestLimits(max_study_bytes=3 * len(built.files[0][1]) + 100))
    try:
        ok = _post(stow.url, [data for _, data in built.files[:2]])
        assert ok.status_code == 200 and ok.headers["Content-Type"].startswith("application/dicom+json")
        assert [item["00081155"]["Value"][0] for item in ok.json()["00081199"]["Value"]] == [
            pydicom_uid(data) for _, data in built.files[:2]
        ]
        assert len(stow.received) == 2 and stow.received[0].study_uid == built.study_uid
        assert _post(stow.url, [built.files[2][1]], token=None).status_code == 401
        unknown = _post(stow.url, [built.files[2][1]], token="not-a-token-anyone-issued")
        assert unknown.status_code == 401 and unknown.headers["WWW-Authenticate"] == "Bearer"
        assert _post(stow.url, [b"this is a PDF, not DICOM"]).status_code == 400
        mixed = _post(stow.url, [b"not DICOM", built.files[2][1]])
        assert mixed.status_code == 202
        assert [item["00081197"]["Value"] for item in mixed.json()["00081198"]["Value"]] == [[0xC000]]
        too_big = _post(stow.url, [ct_series(2, rows=64, cols=64).files[0][1]] * 3)
        assert too_big.status_code == 413 and "limit" in too_big.json()["error"]
        plain = requests.post(
            stow.url,
            data=b"x",
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {ANALYST_TOKEN}"},
            timeout=10,
        )
        assert plain.status_code == 415
        other = _post(f"{stow.url}/1.2.826.0.1.3680043.10.424242.1", [ct_series(1).files[0][1]])
        assert other.status_code == 400  # every part belongs to another study than the URL's
        assert _post(f"{stow.url}/{built.study_uid}/complete", []).status_code == 202
        assert stow.triggered == [built.study_uid] and stow.spool.due(0, quiet_s=3600) == [built.study_uid]
        assert _post(f"{stow.url}/1.2.3.4/complete", []).status_code == 404
    finally:
        stow.close()


def pydicom_uid(data: bytes) -> str:
    import io

    import pydicom

    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def test_a_newer_analysis_of_a_study_replaces_the_results_an_older_one_still_has_waiting(tmp_path):
    outbox = Outbox(tmp_path)
    outbox.put("1.2.3", [("SEG", "1.2.3.1", b"old seg"), ("SR", "1.2.3.2", b"old sr")], ["pacs"])
    outbox.put("1.2.9", [("SR", "1.2.9.2", b"another study")], ["pacs"])
    outbox.put("1.2.3", [("SR", "1.2.3.3", b"new sr")], ["pacs"])
    waiting = outbox.due(time.time(), ["pacs"])
    assert sorted((i.study_uid, i.sop_uid) for i in waiting) == [("1.2.3", "1.2.3.3"), ("1.2.9", "1.2.9.2")]
    assert sorted(p.read_bytes() for p in (tmp_path / "outbox").glob("*.dcm")) == [b"another study", b"new sr"]
