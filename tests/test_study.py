"""`cspine evaluate study` end to end through a real server (gateway, local Triton, SQLite store) on a
small SYNTHETIC cohort; an interrupted run resumes and gives the same report."""

from __future__ import annotations

import json
import shutil

import pytest

from cspine.evaluation.clinical import summarise
from cspine.evaluation.clinical_report import write_report
from cspine.evaluation.study import Server, StudyRun, read_cohort, run_study, split_support
from cspine.fewshot.prototypes import SupportSet
from cspine.fewshot.store import SupportStore
from cspine.phantom.generate import PhantomOptions, generate_case
from support.server import GatewayThread
from support.tokens import CURATOR_TOKEN


@pytest.fixture(scope="module")
def cohort(phantom_cases, tmp_path_factory):
    """The session's four phantom studies (support candidates first by name) and three cheap radiograph-only
    studies to analyse."""
    root = tmp_path_factory.mktemp("cohort")
    for name, case in phantom_cases.items():
        shutil.copytree(case.path, root / f"a-{name}")
    for index, tumor in enumerate(("malignant", "benign", "borderline")):
        generate_case(root / f"b-{tumor}", f"b-{tumor}", 4242, index, PhantomOptions(modalities=("xr",), tumor=tumor))
    return root


def serve(triton, tmp_path):
    store = SupportStore(f"sqlite:///{tmp_path / 'support.db'}")
    store.migrate()
    store.seed_defaults(SupportSet.load())
    return store, GatewayThread(triton.grpc_url, store=store)


class Interrupted(Exception):
    pass


def test_the_cohort_format_is_read_and_split_into_support_and_analysis(cohort):
    cases = read_cohort(cohort)
    assert len(cases) == 7 and all(c.synthetic for c in cases)
    support, rest = split_support(cases, 1)
    assert {k: [c.case_id for c in v] for k, v in support.items()} == {
        "benign": ["a-benign"],
        "borderline": ["a-borderline"],
        "malignant": ["a-malignant"],
    }
    assert [c.case_id for c in rest] == ["a-none", "b-benign", "b-borderline", "b-malignant"]
    (cohort / "stray").mkdir()
    with pytest.raises(ValueError, match="stray: no reference.json"):
        read_cohort(cohort)
    (cohort / "stray").rmdir()


def test_a_study_run_through_the_api_reports_and_resumes_to_the_same_figures(cohort, triton, tmp_path):
    reports = {}
    for name, interrupt_after in (("straight", None), ("interrupted", 5)):
        store, server = serve(triton, tmp_path / name)
        try:
            target = Server(server.address, CURATOR_TOKEN, CURATOR_TOKEN)
            cases = read_cohort(cohort)
            out = tmp_path / name / "report"
            if interrupt_after is not None:
                steps = []

                def stop(steps=steps, limit=interrupt_after):
                    steps.append(1)
                    if len(steps) == limit:
                        raise Interrupted

                with pytest.raises(Interrupted):
                    run_study(cases, target, StudyRun(out), 1, progress=False, on_step=stop)
                assert len(StudyRun(out).records) == interrupt_after
            records = run_study(cases, target, StudyRun(out), 1, progress=False)
        finally:
            server.close()
            store.close()
        metrics = summarise(records, synthetic=True, n_boot=50)
        paths = write_report(metrics, records, out, title="test cohort", synthetic=True)
        reports[name] = (metrics, records, paths)
    (a, records_a, paths), (b, records_b, _) = reports["straight"], reports["interrupted"]
    # 4 studies × 4 modality runs at the full support, 4 × "all" at support 0
    assert len(records_a) == len(records_b) == 20
    key = lambda r: (r["case"], r["modalities"], r["support_per_class"])  # noqa: E731
    assert sorted(map(key, records_a)) == sorted(map(key, records_b))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    assert {"accuracy", "per_class", "ece", "detection", "by_modalities"} <= set(a)
    assert set(a["by_modalities"]) == {"all", "ct", "mr", "xr"}
    assert a["detection"]["specificity"]["value"] in (0.0, 1.0)  # one tumor-free study
    assert paths["report"].read_text().count("data:image/png;base64") >= 3
    assert len(paths["predictions"].read_text().splitlines()) == 21
