"""Competence: what cspine can assess, layer by layer, on REAL out-of-domain files from installed packages,
SYNTHETIC out-of-domain studies and in-domain SYNTHETIC phantom studies (docs/competence.md)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from cspine.analysis.competence import (
    CompetenceReference,
    FeatureReference,
    anatomy_reasons,
    input_verdicts,
    lognormal_threshold,
    whitening,
)
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import CompetenceLayer, Modality, ReasonCode, Volume
from cspine.evaluation.ood_corpus import real_ood_studies, synthetic_ood_studies
from cspine.inference.local_triton import default_repository
from cspine.modeling.data import model_labels
from cspine.v1 import analysis_pb2 as pb
from support.pipeline import analyse


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("ood")
    return real_ood_studies(root / "real"), synthetic_ood_studies(root / "synthetic", seed=9700)


# -- layer 1: input checks, before any model runs ------------------------------------------------------------

INPUT_CODES = {c for c in ReasonCode if c.layer is CompetenceLayer.INPUT}


def test_every_real_file_expected_to_fail_an_input_check_fails_it_with_that_reason(corpora):
    real, _ = corpora
    checked = 0
    for study in real:
        expected = ReasonCode(study.expected) if study.expected in {c.value for c in ReasonCode} else None
        if expected not in INPUT_CODES:
            continue
        ingested = ingest_paths(list(study.files))
        verdicts = input_verdicts(ingested, select_series(ingested))
        codes = {r.code for v in verdicts.values() for r in v.reasons}
        assert not any(v.assessable for v in verdicts.values()), study.name
        assert expected in codes, (study.name, codes)
        checked += 1
    assert checked >= 12


def test_the_phantom_passes_the_input_checks_and_a_single_slice_of_it_does_not(phantom_cases):
    case = phantom_cases["benign"]
    study = ingest_paths([case.path / f for f in ("ct", "mr", "xr")])
    verdicts = input_verdicts(study, select_series(study))
    assert {m: v.assessable for m, v in verdicts.items()} == {Modality.CT: True, Modality.MR: True, Modality.XR: True}
    one = ingest_paths(case.files("ct")[40:41])
    (verdict,) = input_verdicts(one, select_series(one)).values()
    assert [r.code for r in verdict.reasons] == [ReasonCode.TOO_FEW_SLICES, ReasonCode.INSUFFICIENT_COVERAGE]
    assert verdict.reasons[0].message == "CT: 1 slice(s); at least 12 are needed for a volume"


# -- layer 2: anatomy, on label maps --------------------------------------------------------------------------


def _truth_labels(case, modality: Modality, role: str, series: str) -> tuple[np.ndarray, Volume]:
    volume = ingest_paths([case.path / series]).image_series()[0].volume
    labels = model_labels(modality, case.labels[f"{role}_labels"], case.labels[f"{role}_levels"])
    return labels.reshape(volume.shape), volume


@pytest.mark.parametrize(("modality", "role"), [(Modality.CT, "ct"), (Modality.XR, "xr")])
def test_the_phantom_s_true_anatomy_is_plausible_and_without_its_spine_it_is_not(phantom_cases, modality, role):
    labels, volume = _truth_labels(phantom_cases["none"], modality, role, role)
    assert anatomy_reasons(modality, labels, volume, levels_named=6) == []
    no_spine = np.where(labels == 0, 0, np.uint8(1) if modality is Modality.XR else np.uint8(0))
    codes = [r.code for r in anatomy_reasons(modality, no_spine, volume, levels_named=0)]
    assert ReasonCode.NO_VERTEBRAL_COLUMN in codes and ReasonCode.NO_DISCS in codes


def test_radiograph_levels_out_of_order_cannot_be_assigned(phantom_cases):
    labels, volume = _truth_labels(phantom_cases["none"], Modality.XR, "xr", "xr")
    swapped = labels.copy()
    swapped[labels == 1], swapped[labels == 6] = 6, 1  # C2 and C7 exchanged
    codes = [r.code for r in anatomy_reasons(Modality.XR, swapped, volume, levels_named=6)]
    assert codes == [ReasonCode.LEVELS_UNASSIGNABLE]


# -- layer 3: distribution ------------------------------------------------------------------------------------


def test_the_ood_score_is_about_one_in_distribution_and_grows_with_the_shift():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(4000, 8)) @ np.diag([1, 2, 3, 4, 5, 6, 7, 8])
    mean, whiten = whitening(train)
    reference = FeatureReference(mean, whiten, 1.5, 0.999, "test")
    inside = train[:50] + 0.0
    assert reference.score(inside) == pytest.approx(1.0, abs=0.15)
    assert reference.score(inside + 3 * np.diag([1, 2, 3, 4, 5, 6, 7, 8]).sum(axis=0)) > 3.0
    scores = np.exp(rng.normal(0.0, 0.2, size=20000))
    threshold = lognormal_threshold(scores, 0.99)
    assert np.mean(scores <= threshold) == pytest.approx(0.99, abs=0.003)


def test_the_shipped_reference_matches_the_shipped_segmentation_models():
    from cspine.analysis.competence import model_sha256

    reference = CompetenceReference.load(default_repository())
    assert set(reference.references) == set(Modality)
    for modality, fitted in reference.references.items():
        assert reference.model_sha256[modality] == model_sha256(default_repository(), modality), modality
        assert fitted.pass_rate == 0.9999 and 1.0 < fitted.threshold < 2.0 and "SYNTHETIC" in fitted.fitted_on
    disclosure = reference.disclosure
    assert "SYNTHETIC" in disclosure.trained_on and "not for clinical use" in disclosure.intended_use


# -- the whole pipeline ---------------------------------------------------------------------------------------


def test_no_real_or_synthetic_out_of_domain_study_gets_a_tumor_call(triton, corpora):
    real, synthetic = corpora
    for study in real + synthetic:
        analysis = analyse(triton, ingest_paths(list(study.files)))
        assert not analysis.fused.assessed and not analysis.fused.tumor_detected, study.name
        assert analysis.fused.detection_score is None and not analysis.fused.probabilities
        assert [r.code for r in analysis.fused.reasons] == [ReasonCode.NO_ASSESSABLE_MODALITY]
        assert all(not m.lesions and m.assessment.reasons for m in analysis.modalities), study.name
        assert analysis.spine.cobb_angle_deg is None and analysis.spine.opll is None
        assert all(level.canal_area_mm2 is None and level.disc_height_mm is None for level in analysis.spine.levels)
        codes = {r.code.value for m in analysis.modalities for r in m.assessment.reasons}
        if study.expected != ReasonCode.NO_ASSESSABLE_MODALITY.value:
            assert study.expected in codes, (study.name, codes)


def test_the_cat_radiograph_relabelled_lateral_is_stopped_by_the_models_own_layers(triton, corpora):
    real, _ = corpora
    (cat,) = [s for s in real if s.name == "dx-cat-thorax-as-lateral"]
    (xr,) = analyse(triton, ingest_paths(list(cat.files))).modalities
    assert xr.ood is not None and xr.ood.score > 3 * xr.ood.threshold
    assert {r.code.layer for r in xr.assessment.reasons} == {CompetenceLayer.ANATOMY, CompetenceLayer.DISTRIBUTION}


def test_every_modality_failing_inside_cspine_is_a_server_fault_not_the_caller_s(triton, phantom_cases, monkeypatch):
    """A bug in a stage (here: the spine measurement raising) must not be reported as bad input."""
    from cspine import pipeline
    from cspine.errors import AnalysisFailedError, InvalidInputError
    from cspine.gateway.interceptors import status_of

    def broken(*_):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(pipeline, "measure_spine", broken)
    study = ingest_paths([phantom_cases["benign"].path / f for f in ("ct", "xr")])
    with pytest.raises(AnalysisFailedError, match="CT could not be analysed: an internal error") as caught:
        analyse(triton, study)
    assert not isinstance(caught.value, InvalidInputError)
    assert status_of(caught.value) == grpc.StatusCode.INTERNAL


def test_the_proto_documents_every_reason_and_notice_code():
    from pathlib import Path

    from cspine.domain import NoticeCode

    proto = (Path(__file__).parents[1] / "protos" / "cspine" / "v1" / "analysis.proto").read_text()
    docs = (Path(__file__).parents[1] / "docs" / "competence.md").read_text()
    for code in [*ReasonCode, *NoticeCode]:
        assert code.value in proto, code
    for code in ReasonCode:
        assert f"`{code.value}`" in docs, code
    assert pb.NOT_ASSESSABLE != pb.ASSESSED
