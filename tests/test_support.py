"""Few-shot adaptation as a service, end to end: the SupportSet API over a real socket, a real local Triton
and a real store (SQLite file; PostgreSQL shared by two replicas)."""

from __future__ import annotations

import asyncio
import time
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health, health_pb2

from cspine.client import channel_credentials
from cspine.fewshot.prototypes import SITE_CASES_TO_REPLACE, SupportSet
from cspine.fewshot.store import SupportStore
from cspine.gateway.auth import server_credentials
from cspine.gateway.metrics import Metrics
from cspine.gateway.server import SERVICE_NAMES, track_health
from cspine.service import Readiness
from cspine.v1 import analysis_pb2 as pb
from cspine.v1 import support_pb2 as spb
from cspine.v1 import support_pb2_grpc as spb_grpc
from support.server import NOT_SERVING, SERVING, GatewayThread, channel_to, files_of, upload, wait_for
from support.tls import make_pki
from support.tokens import ANALYST_TOKEN, CURATOR_TOKEN


def new_store(url: str) -> SupportStore:
    store = SupportStore(url)
    store.migrate()
    store.seed_defaults(SupportSet.load())
    return store


def case_upload(paths, label, reference="pathology report 2026-0042", create_class=False):
    header = spb.CaseHeader(label=label, pathology_reference=reference, note="", create_class=create_class)
    yield spb.CaseUpload(header=header)
    for path in paths:
        yield spb.CaseUpload(dicom_instance=path.read_bytes())


@pytest.fixture(scope="module")
def served(triton, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "support.db"
    store = new_store(f"sqlite:///{path}")
    server = GatewayThread(triton.grpc_url, store=store)
    curator = channel_to(server.address, CURATOR_TOKEN)
    yield server, spb_grpc.SupportSetStub(server.channel), spb_grpc.SupportSetStub(curator), path
    curator.close()
    server.close()
    store.close()


def probabilities(server, paths) -> tuple[dict[str, float], str]:
    result = server.stub.AnalyzeStudy(upload(paths), timeout=120)
    return {p.label: p.probability for p in result.fused.probabilities}, result.prototype_set_version


def test_a_fresh_store_holds_the_synthetic_default_set_as_version_1(served):
    server, analyst, _, _ = served
    info = analyst.GetPrototypeSet(spb.GetPrototypeSetRequest(), timeout=10)
    assert info.version == "v1" and info.cases == len(SupportSet.load().labels) and "SYNTHETIC" in info.created_by
    assert [c.label for c in info.classes] == ["benign", "borderline", "malignant"]
    assert server.stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10).synthetic_support_set


def test_an_analyst_token_cannot_change_the_support_set(served, phantom_cases):
    _, analyst, _, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        analyst.AddCase(case_upload(files_of(phantom_cases["benign"]), "benign"), timeout=60)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED and "analyst" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:
        analyst.RemoveCase(spb.RemoveCaseRequest(case_id=1), timeout=10)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_a_new_case_moves_the_probabilities_of_a_similar_study_toward_its_class(served, phantom_cases):
    server, analyst, curator, _ = served
    paths = files_of(phantom_cases["borderline"])
    before, version_before = probabilities(server, paths)
    start = time.perf_counter()
    case = curator.AddCase(case_upload(paths, "malignant"), timeout=120)
    after, version_after = probabilities(server, paths)
    assert case.label == "malignant" and case.curator.startswith("curator:") and not case.synthetic
    assert case.prototype_set.number == int(version_before[1:]) + 1
    assert version_after == case.prototype_set.version != version_before  # no reload, the next analysis uses it
    assert after["malignant"] > before["malignant"]
    # one site case beside the SYNTHETIC ones weighs 1/K of the malignant prototypes (docs/support.md)
    malignant = {c.label: c for c in case.prototype_set.classes}["malignant"]
    default = SupportSet.load().labels.count("malignant")
    assert (malignant.site_cases, malignant.default_cases, malignant.cases) == (1, default, default + 1)
    assert case.prototype_set.site_cases_to_replace == SITE_CASES_TO_REPLACE
    assert {w.modality: round(w.site_weight, 6) for w in malignant.weights} == {
        m: 1 / SITE_CASES_TO_REPLACE if m in case.modalities else 0.0 for m in (pb.CT, pb.MR, pb.XR)
    }
    value = server.metrics.registry.get_sample_value
    assert value("cspine_prototype_set_info", {"version": version_after}) == 1.0
    assert value("cspine_prototype_set_info", {"version": version_before}) is None
    assert time.perf_counter() - start < 60
    listed = analyst.ListCases(spb.ListCasesRequest(), timeout=10)
    assert listed.cases[-1].case_id == case.case_id and listed.prototype_set.cases == len(SupportSet.load().labels) + 1


def test_a_new_class_appears_in_probabilities_and_goes_with_its_last_case(served, phantom_cases):
    server, analyst, curator, _ = served
    paths = files_of(phantom_cases["benign"])
    with pytest.raises(grpc.RpcError) as caught:
        curator.AddCase(case_upload(paths, "site_special"), timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "unknown class 'site_special'" in (
        caught.value.details()
    )
    case = curator.AddCase(case_upload(paths, "site_special", create_class=True), timeout=120)
    with_class, _ = probabilities(server, paths)
    assert "site_special" in with_class and with_class["site_special"] == max(with_class.values())
    old = case.prototype_set.number
    info = curator.RemoveCase(spb.RemoveCaseRequest(case_id=case.case_id), timeout=10)
    assert "site_special" not in [c.label for c in info.classes] and info.number == old + 1
    without, _ = probabilities(server, paths)
    assert "site_special" not in without
    history = analyst.GetPrototypeSet(spb.GetPrototypeSetRequest(version=old), timeout=10)
    assert "site_special" in [c.label for c in history.classes]  # older versions stay as they were
    (special,) = [c for c in history.classes if c.label == "site_special"]  # no default to shrink toward
    assert (special.site_cases, special.default_cases) == (1, 0) and {w.site_weight for w in special.weights} == {1.0}


def test_a_case_keeps_no_embedding_of_a_modality_whose_lesions_lie_at_other_levels(served, mismatched_study):
    """CT and MR show the lesion at C3, the radiograph (another case's) at C4 and C5: the case learns from CT and
    MR only, as the analysis fuses only them."""
    server, _, curator, _ = served
    result = server.stub.AnalyzeStudy(upload(mismatched_study), timeout=120)
    assert [n.code for n in result.notices].count("lesion_not_matched") == 1
    case = curator.AddCase(case_upload(mismatched_study, "benign"), timeout=120)
    assert list(case.modalities) == [pb.CT, pb.MR]
    curator.RemoveCase(spb.RemoveCaseRequest(case_id=case.case_id), timeout=10)


def test_add_case_refuses_a_case_without_lesion_and_a_study_already_in_the_set(served, phantom_cases):
    _, _, curator, _ = served
    with pytest.raises(grpc.RpcError) as caught:
        curator.AddCase(case_upload(files_of(phantom_cases["none"]), "benign"), timeout=120)
    details = caught.value.details()
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no tumor was detected" in details
    assert "below 0.5" in details  # says which check failed: detection, not a missing embedding
    with pytest.raises(grpc.RpcError) as caught:
        curator.AddCase(case_upload(files_of(phantom_cases["borderline"]), "malignant"), timeout=120)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "already in the current" in (
        caught.value.details()
    )
    header_missing = [spb.CaseUpload(dicom_instance=files_of(phantom_cases["benign"])[0].read_bytes())]
    with pytest.raises(grpc.RpcError) as caught:
        curator.AddCase(iter(header_missing), timeout=60)
    assert "must be a CaseHeader" in caught.value.details()


def test_an_emptied_support_set_is_rebuilt_by_add_case_and_then_classifies(triton, tmp_path, phantom_cases):
    store = new_store(f"sqlite:///{tmp_path / 'support.db'}")
    server = GatewayThread(triton.grpc_url, store=store)
    curator_channel = channel_to(server.address, CURATOR_TOKEN)
    try:
        curator = spb_grpc.SupportSetStub(curator_channel)
        for case in curator.ListCases(spb.ListCasesRequest(), timeout=10).cases:
            curator.RemoveCase(spb.RemoveCaseRequest(case_id=case.case_id), timeout=10)
        empty = curator.GetPrototypeSet(spb.GetPrototypeSetRequest(), timeout=10)
        assert empty.cases == 0 and not empty.classes and not empty.modalities
        info = server.stub.GetServiceInfo(pb.GetServiceInfoRequest(), timeout=10)
        assert not info.synthetic_support_set  # an emptied set is no longer the SYNTHETIC default
        # With no prototypes an analysis still detects, and gives no class probabilities.
        result = server.stub.AnalyzeStudy(upload(files_of(phantom_cases["malignant"])), timeout=120)
        assert result.fused.tumor_detected and not result.fused.probabilities

        paths = files_of(phantom_cases["benign"])
        case = curator.AddCase(case_upload(paths, "benign", create_class=True), timeout=120)
        assert case.label == "benign" and not case.synthetic and case.modalities
        assert case.prototype_set.number == empty.number + 1
        rebuilt = curator.GetPrototypeSet(spb.GetPrototypeSetRequest(), timeout=10)
        assert rebuilt.number == empty.number + 1 and rebuilt.cases == 1
        assert [(c.label, c.cases) for c in rebuilt.classes] == [("benign", 1)]
        assert set(rebuilt.modalities) == set(case.modalities)
        listed = curator.ListCases(spb.ListCasesRequest(), timeout=10)
        assert [c.case_id for c in listed.cases] == [case.case_id]

        after, version = probabilities(server, files_of(phantom_cases["malignant"]))
        assert version == rebuilt.version and after == pytest.approx({"benign": 1.0})
    finally:
        curator_channel.close()
        server.close()
        store.close()


def test_a_restart_keeps_every_case_and_version(served, triton):
    server, analyst, _, path = served
    current = analyst.GetPrototypeSet(spb.GetPrototypeSetRequest(), timeout=10)
    store = SupportStore(f"sqlite:///{path}")
    again = GatewayThread(triton.grpc_url, store=store)
    try:
        stub = spb_grpc.SupportSetStub(again.channel)
        assert stub.GetPrototypeSet(spb.GetPrototypeSetRequest(), timeout=10) == current
    finally:
        again.close()
        store.close()


def test_replicas_sharing_postgresql_see_each_others_changes_within_the_poll_interval(triton, postgres, phantom_cases):
    url = postgres()
    stores = [new_store(url), SupportStore(url)]
    replicas = [GatewayThread(triton.grpc_url, store=s) for s in stores]
    watcher = replicas[1].loop.call_soon_threadsafe  # the replica polls its store every 0.5 s
    tasks = []
    watcher(lambda: tasks.append(asyncio.ensure_future(replicas[1].service.watch_store(0.5))))
    try:
        curator = channel_to(replicas[0].address, CURATOR_TOKEN)
        case = spb_grpc.SupportSetStub(curator).AddCase(
            case_upload(files_of(phantom_cases["malignant"]), "malignant"), timeout=120
        )
        start = time.perf_counter()
        assert wait_for(lambda: replicas[1].service.prototypes.version == case.prototype_set.version, timeout=5)
        assert time.perf_counter() - start < 1.5
        xr = [p for p in files_of(phantom_cases["benign"]) if "/xr/" in str(p)]
        assert replicas[1].stub.AnalyzeStudy(upload(xr), timeout=60).prototype_set_version == case.prototype_set.version
        curator.close()
    finally:
        for task in tasks:
            replicas[1].loop.call_soon_threadsafe(task.cancel)
        for replica in replicas:
            replica.close()
        for store in stores:
            store.close()


def test_the_support_command_lists_and_shows_with_a_token_found_in_the_data_dir(served, tmp_path, capsys):
    from cspine.cli import main

    server, _, _, _ = served
    (tmp_path / "tokens").write_text(f"analyst {ANALYST_TOKEN}\n")
    (tmp_path / "tokens").chmod(0o600)
    common = ["--server", server.address, "--data-dir", str(tmp_path)]
    assert main(["support", *common, "list"]) == 0
    listed = capsys.readouterr().out
    assert "prototype set v" in listed and "cspine (SYNTHETIC default)" in listed and "SYNTHETIC" in listed
    assert main(["support", *common, "show", "--version", "1"]) == 0
    assert f"prototype set v1: {len(SupportSet.load().labels)} cases" in capsys.readouterr().out
    assert main(["support", *common, "remove", "1"]) == 2  # only an analyst token is there
    assert "no curator token in" in capsys.readouterr().err
    assert main(["support", *common, "--token", ANALYST_TOKEN, "remove", "1"]) == 2
    assert "PERMISSION_DENIED: role analyst may not call" in capsys.readouterr().err


def test_analyze_and_support_list_reach_a_tls_gateway_with_ca_and_say_what_is_missing_without(
    triton, tmp_path, phantom_cases, capsys
):
    from cspine.cli import main

    pki = make_pki(tmp_path / "pki")
    tls = (server_credentials(pki["server_cert"], pki["server_key"]), channel_credentials(pki["ca"]))
    store = new_store(f"sqlite:///{tmp_path / 'support.db'}")
    server = GatewayThread(triton.grpc_url, store=store, tls=tls)
    xr = str(phantom_cases["benign"].path / "xr")
    common = ["--server", server.address, "--token", ANALYST_TOKEN]
    try:
        assert main(["analyze", xr, *common, "--ca", str(pki["ca"]), "--quiet"]) == 0
        printed = capsys.readouterr().out
        assert "FUSED" in printed and "request id " in printed
        assert main(["support", *common, "--ca", str(pki["ca"]), "list"]) == 0
        assert f"prototype set v1: {len(SupportSet.load().labels)} cases" in capsys.readouterr().out
        for argv in (["analyze", xr, *common, "--quiet"], ["support", *common, "list"]):  # no --ca: plaintext
            assert main(argv) == 2
            error, hint = capsys.readouterr().err.splitlines()
            assert error.startswith("cspine: error: UNAVAILABLE: ")
            assert hint == (
                f"cspine: is a cspine server listening on {server.address}? (--server, env CSPINE_SERVER; "
                "one serving TLS needs --ca, or a grpcs:// address)"
            )
    finally:
        server.close()
        store.close()


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


ANALYSIS, SUPPORT = SERVICE_NAMES


def health_of(server) -> dict[str, int]:
    """The gateway's gRPC health: overall (""), SpineAnalysis and SupportSet."""
    check = server.health.Check
    return {name: check(health_pb2.HealthCheckRequest(service=name), timeout=5).status for name in ("", *SERVICE_NAMES)}


def test_while_only_the_store_is_down_analyses_stay_serving_and_the_support_set_is_not(triton, tmp_path, phantom_cases):
    path = tmp_path / "support.db"
    store = new_store(f"sqlite:///{path}")
    server = GatewayThread(triton.grpc_url, store=store, health_interval_s=0.2)
    value = server.metrics.registry.get_sample_value
    ready = f"http://127.0.0.1:{server.metrics.serve(0, '127.0.0.1')}/ready"  # the chart's readiness probe
    all_serving = {"": SERVING, ANALYSIS: SERVING, SUPPORT: SERVING}
    try:
        assert wait_for(lambda: health_of(server) == all_serving and value("cspine_store_up") == 1)
        assert http_status(ready) == 200
        store.close()
        path.rename(tmp_path / "moved.db")
        path.mkdir()  # SQLite cannot open a directory: the store stops answering
        assert wait_for(lambda: value("cspine_store_up") == 0), "the store gauge must drop"
        assert wait_for(lambda: health_of(server)[SUPPORT] == NOT_SERVING), "SupportSet must say it cannot serve"
        assert health_of(server) == {"": SERVING, ANALYSIS: SERVING, SUPPORT: NOT_SERVING}
        assert value("cspine_triton_ready") == 1 and http_status(ready) == 200  # the pod keeps taking analyses
        result = server.stub.AnalyzeStudy(upload(files_of(phantom_cases["benign"])), timeout=120)
        assert result.prototype_set_version == "v1" and len(result.modalities) == 3  # on the set it holds
        with pytest.raises(grpc.RpcError) as caught:
            spb_grpc.SupportSetStub(server.channel).ListCases(spb.ListCasesRequest(), timeout=10)
        details = caught.value.details()
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details.startswith("the support store is unavailable: ") and "(request " in details
        assert "sqlite" not in details and str(tmp_path) not in details  # never the store's URL
        path.rmdir()
        (tmp_path / "moved.db").rename(path)
        assert wait_for(lambda: health_of(server) == all_serving and value("cspine_store_up") == 1)
        assert http_status(ready) == 200
        assert http_status(ready.replace("/ready", "/metrics")) == 200
    finally:
        server.close()
    assert http_status(ready) == 503  # draining and stopped: no traffic


class _Service:
    """Stands in for AnalysisService in track_health: readiness as the test sets it."""

    def __init__(self) -> None:
        self.readiness = Readiness(triton=True, store=True)

    async def ready(self) -> Readiness:
        return self.readiness


@pytest.mark.parametrize(
    ("triton_up", "store_up", "analyses", "support_set"),
    [
        (True, True, SERVING, SERVING),
        (True, False, SERVING, NOT_SERVING),  # analyses run on the prototype set the replica holds
        (False, True, NOT_SERVING, NOT_SERVING),
        (False, False, NOT_SERVING, NOT_SERVING),
    ],
)
def test_track_health_serves_analyses_while_triton_answers_and_the_support_set_while_the_store_does_too(
    triton_up, store_up, analyses, support_set
):
    async def scenario() -> tuple[dict[str, int], bool]:
        service, servicer, metrics = _Service(), health.aio.HealthServicer(), Metrics()
        service.readiness = Readiness(triton=triton_up, store=store_up)
        tracker = asyncio.create_task(track_health(service, servicer, metrics, interval_s=0.01))
        await asyncio.sleep(0.05)
        tracker.cancel()
        statuses = {}
        for name in ("", *SERVICE_NAMES):
            statuses[name] = (await servicer.Check(health_pb2.HealthCheckRequest(service=name), None)).status
        return statuses, metrics.serving

    statuses, ready = asyncio.run(scenario())
    assert statuses == {"": analyses, ANALYSIS: analyses, SUPPORT: support_set}
    assert ready is (analyses == SERVING)  # /ready, the chart's readiness probe, follows the overall health


def test_a_case_made_by_another_lesion_embedding_is_listed_as_not_in_use():
    from datetime import UTC, datetime

    from cspine.client.decode import format_case
    from cspine.domain import Modality
    from cspine.fewshot.store import Case
    from cspine.gateway.convert import case_to_pb

    made = datetime(2026, 12, 7, 7, 0, tzinfo=UTC)
    in_use = Case(7, "benign", "biopsy 1", "", "dr x", made, False, (Modality.XR,), "0123456789abcdef", True)
    other = Case(8, "benign", "biopsy 2", "", "dr x", made, False, (Modality.CT,), "", False)
    assert (case_to_pb(in_use).embedding, case_to_pb(in_use).other_embedding) == ("0123456789abcdef", False)
    assert format_case(case_to_pb(in_use)).endswith("biopsy 1")
    assert format_case(case_to_pb(other)).endswith("biopsy 2 [not in use: made by embedding of version 1]")
