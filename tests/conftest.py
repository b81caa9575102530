"""Shared fixtures, and the markers that split the suite into what needs which service.

Fixtures: ``phantom_cases`` (a small SYNTHETIC cohort made once per session by the real generator;
``mismatched_study`` mixes two of its cases into one study whose radiograph lesion lies elsewhere), ``triton``
(a real local tritonserver), ``gateway`` (a real in-process gateway on it, one per module) and ``postgres`` (a
throwaway PostgreSQL 15 cluster). The harnesses behind them, and those tests import (DICOM builders, tokens,
channels, helm), are in tests/support/.

Markers are applied here, not test by test: MARKERS names, for each, the session fixtures whose users get it
(through any fixture that depends on them) and the modules, tests or module fixtures that start the thing
themselves. Subsets (-m takes any expression of them):

    make test-fast                 ruff, then -m "not triton and not postgres and not helm and not chromium and
                                   not pacs and not slow": no service, no helm, no browser, no PACS, no long
                                   generation (~1 min)
    pytest -m "not triton"         everything that runs without a tritonserver
    pytest -m postgres             only what starts PostgreSQL
    make test                      all of it (~15 min)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cspine.inference.local_triton import LocalTriton, TritonPorts, default_repository
from support.phantom import PhantomCase, mixed_study, write_cohort
from support.postgres import PostgresCluster

HERE = Path(__file__).resolve().parent

# marker → what gets it: a bare name is a fixture of this file (its users and their dependents); "module.py" a
# whole module (relative to tests/); "module.py::name" a test of it or a fixture of it (and its users);
# "module.py::fixture[param]" the tests that fixture's parametrization gives that param. Every marker here is
# declared in pyproject.toml ([tool.pytest.ini_options] markers; --strict-markers fails on one that is not).
MARKERS: dict[str, tuple[str, ...]] = {
    "triton": (
        "triton",
        "test_triton.py::test_a_model_that_does_not_load_is_named_with_triton_s_reason",
        "test_triton.py::test_cspine_triton_start_serves_until_sigterm_then_stops_cleanly",
        "test_gateway.py::test_triton_stopped_mid_run_gives_unavailable_flips_health_and_recovers",
        "test_triton_recovery.py",  # `cspine serve` with its own supervised Triton
        "test_gpu_prep.py::test_prepare_then_run_on_cpu_serves_gpu_torch_and_writes_figures_for_every_setting",
        "test_cohort.py::test_a_running_service_switches_version_sets_and_rolls_back_without_a_restart_or_a_failed_request",
        "test_cohort.py::test_a_version_set_triton_cannot_load_is_not_switched_to",
        "test_cohort.py::test_a_version_s_calibration_is_refitted_on_the_cohort_s_train_studies_through_the_pipeline",
        "test_cohort.py::test_evaluate_models_on_a_cohort_puts_the_candidate_beside_the_served_version",
        "faults/test_fault_triton.py",
    ),
    "postgres": (
        "postgres",
        "test_store.py::url[postgresql]",  # asks for `postgres` by getfixturevalue
        "faults/test_fault_store.py",  # a cluster of its own, stopped and started
        "faults/test_fault_store_calls.py",
    ),
    "helm": (  # the chart rendered by helm, and checked with node's CRD validators and promtool (`make tools`)
        "test_helm.py",
        "test_alerts.py",
        "test_k8s.py::test_names_selectors_and_metrics_match_what_the_chart_renders",
    ),
    "chromium": ("test_clinical.py::test_headless_chromium_renders_the_report_as_a_non_blank_page",),
    "pacs": ("test_dicompeers.py", "test_dicomnet_peers.py"),  # Orthanc, dcmtk
    "slow": (  # model training, SYNTHETIC cohorts and studies generated for seconds each
        "phantom_cases",
        "test_models.py",
        "test_dicom_outputs.py::test_seg_and_sr_pass_dciodvfy_without_errors",  # phantom_cases by getfixturevalue
        "test_competence.py::corpora",
        "test_ood_corpus.py::synthetic",
        "test_ingest_fuzz_corpus.py::test_the_fuzz_worker_runs_inputs_through_ingest",
        "test_phantom.py::test_every_subtype_places_a_lesion_of_its_class",
        "test_phantom.py::test_cli_phantom_writes_a_cohort_with_truth_and_manifest",
        "test_real_size.py",  # a 3072 × 2614 radiograph and a 512² × 305 CT
        "test_pipeline.py::test_a_service_cut_bank_is_cut_from_studies_of_its_subtype_and_cached",
        "test_cohort.py::labelled",  # a SYNTHETIC labelled cohort of two cases, SEG and boxes included
        "test_gpu_prep.py::reference",  # SYNTHETIC phantom inputs for the GPU run, and the rehearsal of it
    ),
}


def _places(item: pytest.Item) -> set[str]:
    """The names MARKERS may give ``item`` by: its fixtures, module, test name, module fixtures and params."""
    path = Path(item.path).resolve()
    if not path.is_relative_to(HERE):
        return set()
    module = path.relative_to(HERE).as_posix()
    fixtures = list(getattr(item, "fixturenames", ()))
    params = getattr(getattr(item, "callspec", None), "params", {})
    return {
        *fixtures,
        module,
        f"{module}::{getattr(item, 'originalname', item.name)}",
        *(f"{module}::{name}" for name in fixtures),
        *(f"{module}::{name}[{value}]" for name, value in params.items()),
    }


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        places = _places(item)
        for marker, wanted in MARKERS.items():
            if places.intersection(wanted):
                item.add_marker(marker)


@pytest.fixture(scope="session")
def phantom_cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, PhantomCase]:
    """The SYNTHETIC cohort of support.phantom, one case of each class and one tumor-free, by case id."""
    return write_cohort(tmp_path_factory.mktemp("phantom"))


@pytest.fixture(scope="session")
def mismatched_study(phantom_cases, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The benign case's CT and MR (its lesion at C3) with the malignant case's radiograph (at C4), as one study."""
    return mixed_study(phantom_cases["benign"], phantom_cases["malignant"], tmp_path_factory.mktemp("mismatched"))


@pytest.fixture(scope="session")
def triton():
    """One real tritonserver (the bundled binary, CPU, Python backend) over the shipped model repository."""
    with LocalTriton(default_repository(), TritonPorts.free()) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(triton):
    """A real gateway in this process on the session's Triton (support.server.GatewayThread)."""
    from support.server import GatewayThread  # the gateway's imports cost 1.6 s; only its users pay them

    server = GatewayThread(triton.grpc_url)
    yield server
    server.close()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL 15 cluster on 127.0.0.1 (trust auth); yields a function making a fresh database."""
    with PostgresCluster() as cluster:
        yield cluster.new_database
