"""The analysis pipeline end to end through a real local Triton, on SYNTHETIC phantom studies."""

from __future__ import annotations

import dataclasses
import json

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cspine.analysis.fusion import Calibration, matched_lesions, matched_probabilities, pool
from cspine.cli import main
from cspine.dicom.ingest import ingest, ingest_paths
from cspine.dicom.outputs import read_sr_measurements
from cspine.domain import MEASURED_LEVELS, Modality, NoticeCode, ReasonCode
from cspine.errors import DeadlineExceededError
from cspine.fewshot.prototypes import default_prototypes
from cspine.inference.local_triton import default_repository
from cspine.pipeline import STAGES, AnalysisOptions
from support.dicom import radiograph
from support.pipeline import analyse as run


@pytest.fixture(scope="module")
def full(triton, phantom_cases):
    case = phantom_cases["malignant"]
    study = ingest_paths([case.path / f for f in ("ct", "mr", "xr")])
    return case, run(triton, study, AnalysisOptions(return_dicom_seg=True, return_dicom_sr=True))


def test_full_study_finds_the_tumor_at_its_level_and_fuses_probabilities(full):
    case, analysis = full
    truth = case.truth["tumor"]
    assert [r.modality for r in analysis.modalities] == [Modality.CT, Modality.MR, Modality.XR]
    assert analysis.fused.tumor_detected and analysis.fused.detection_score > 0.5
    assert analysis.fused.assessed
    assert all(r.assessment.assessed and not r.assessment.reasons for r in analysis.modalities)
    assert all(0.0 < r.ood.score < r.ood.threshold for r in analysis.modalities)
    assert sum(p.probability for p in analysis.fused.probabilities) == pytest.approx(1.0, abs=1e-6)
    assert [p.label for p in analysis.fused.probabilities] == ["benign", "borderline", "malignant"]
    assert 0.0 <= analysis.fused.uncertainty <= 1.0
    lesion = analysis.primary_lesion()
    assert lesion.vertebral_level == truth["primary_level"]
    assert lesion.volume_ml > 0.2 and lesion.max_diameter_mm == pytest.approx(truth["max_diameter_mm"], abs=10.0)
    assert lesion.assessment is not None and lesion.embedding.shape == (64,)
    assert np.linalg.norm(np.array(lesion.centre_mm) - truth["centre_mm"]) < 10.0
    assert analysis.prototype_set_version == default_prototypes().version
    assert {m.name for m in analysis.models} == {"seg_ct", "seg_mr", "seg_xr", "lesion_embed", "proto_classify"}
    assert set(STAGES) <= set(analysis.stage_seconds) and analysis.stage_seconds["segment"] > 0


def _pooling() -> Calibration:
    """The shipped calibration, pooling the matched lesions whatever modality order it may have chosen."""
    return dataclasses.replace(Calibration.load(default_repository()), classification_order=())


def test_the_fused_classification_pools_the_lesions_matched_to_the_main_one(triton, full):
    case, _ = full
    analysis = run(triton, ingest_paths([case.path / f for f in ("ct", "mr", "xr")]), calibration=_pooling())
    matched, unmatched = matched_lesions({r.modality: r for r in analysis.modalities})
    assert matched[Modality.CT] is analysis.primary_lesion()
    assert all(n in analysis.notices for n in unmatched)
    expected = pool(matched_probabilities(matched), _pooling().classification_weights)
    assert [p.probability for p in analysis.fused.probabilities] == pytest.approx(list(expected), abs=1e-9)
    assert analysis.fused.classified_from == tuple(m for m in Modality if m in matched)


def test_a_calibration_that_chose_one_modality_gives_that_modality_s_matched_lesion_s_probabilities(
    triton, mismatched_study
):
    """With the order (XR, MR, CT) the mixed study is classified by its MR lesion at C3: the radiograph's lesions
    lie at other levels, so they are not matched and cannot be the answer."""
    order = dataclasses.replace(_pooling(), classification_order=(Modality.XR, Modality.MR, Modality.CT))
    analysis = run(triton, ingest_paths(mismatched_study), calibration=order)
    matched, _ = matched_lesions({r.modality: r for r in analysis.modalities})
    assert set(matched) == {Modality.CT, Modality.MR} and analysis.fused.classified_from == (Modality.MR,)
    expected = matched_probabilities(matched)[Modality.MR]
    assert [p.probability for p in analysis.fused.probabilities] == pytest.approx(list(expected), abs=1e-9)


def test_a_radiograph_whose_lesions_lie_at_other_levels_is_left_out_of_the_fused_classification(
    triton, mismatched_study
):
    """The benign case's CT and MR (lesion at C3) with the malignant case's radiograph: the radiograph's lesions
    are at C4 and C5, so its probabilities are not pooled with the C3 lesion's, and a notice says so."""
    analysis = run(triton, ingest_paths(mismatched_study), calibration=_pooling())
    ct, mr, xr = (analysis.modality(m) for m in (Modality.CT, Modality.MR, Modality.XR))
    assert analysis.primary_lesion() is ct.lesions[0] and ct.lesions[0].vertebral_level == "C3"
    assert xr.assessment.assessed and xr.assessment.probabilities and xr.lesions
    assert all("C3" not in {lesion.vertebral_level, *lesion.levels} for lesion in xr.lesions)
    (notice,) = [n for n in analysis.notices if n.code is NoticeCode.LESION_NOT_MATCHED]
    assert notice.series_instance_uid == xr.lesions[0].series_instance_uid
    assert "XR is left out of the fused classification" in notice.message
    weights = Calibration.load(default_repository()).classification_weights
    mr_lesion = next(x for x in mr.lesions if "C3" in {x.vertebral_level, *x.levels})
    probabilities = matched_probabilities({Modality.CT: ct.lesions[0], Modality.MR: mr_lesion})
    fused = [p.probability for p in analysis.fused.probabilities]
    assert fused == pytest.approx(list(pool(probabilities, weights)), abs=1e-9)
    with_xr = {**probabilities, Modality.XR: np.array([p.probability for p in xr.assessment.probabilities])}
    assert fused != pytest.approx(list(pool(with_xr, weights)), abs=1e-6)


def test_a_prototype_set_s_refitted_fusion_weights_are_the_ones_the_study_is_fused_with(triton, full):
    """A set whose fusion weights were refitted to a site's cases (fewshot/prototypes.py) is fused with them, not
    with the calibration's: all weight on CT makes the fused probabilities CT's own."""
    case, _ = full
    study = ingest_paths([case.path / f for f in ("ct", "mr", "xr")])
    ct_only = dataclasses.replace(
        default_prototypes(), fusion_weights={Modality.CT: 1.0, Modality.MR: 0.0, Modality.XR: 0.0}
    )
    refitted = run(triton, study, prototypes=ct_only, calibration=_pooling())
    ct = next(r for r in refitted.modalities if r.modality == Modality.CT)
    fused = [p.probability for p in refitted.fused.probabilities]
    assert fused == pytest.approx([p.probability for p in ct.assessment.probabilities], abs=1e-6)
    pooled = run(triton, study, calibration=_pooling())
    assert fused != pytest.approx([p.probability for p in pooled.fused.probabilities], abs=1e-3)
    # the site's refitted weights pool the matched lesions, whatever single modality the calibration chose
    chosen = dataclasses.replace(_pooling(), classification_order=(Modality.XR,))
    assert run(triton, study, prototypes=ct_only, calibration=chosen).fused.classified_from == tuple(
        m for m in Modality if m in matched_lesions({r.modality: r for r in refitted.modalities})[0]
    )


def test_full_study_spine_measurements_match_the_phantom_truth(full):
    case, analysis = full
    close = 0
    for level in MEASURED_LEVELS:
        measured, truth = analysis.spine.level(level), case.truth["levels"][level]
        assert measured.canal_source is Modality.CT and measured.cord_source is Modality.MR
        if abs(measured.canal_area_mm2 - truth["canal_area_mm2"]) <= 0.15 * truth["canal_area_mm2"]:
            close += 1
        assert measured.disc_height_mm == pytest.approx(truth["disc_height_mm"], abs=2.5)
    assert close >= 5
    assert analysis.spine.cobb_source is Modality.XR
    # a study's error reaches 16° when the radiograph's segmentation errs (the worst of the evaluation's 120);
    # the evaluation measures the mean (docs/pipeline.md); the method is checked in test_analysis.py
    assert analysis.spine.cobb_angle_deg == pytest.approx(case.truth["cobb_angle_c2_c7_deg"], abs=12.0)
    assert analysis.spine.opll.present == case.truth["opll"]["present"]


def test_full_study_dicom_seg_and_sr_read_back(full):
    case, analysis = full
    seg = hd.seg.segread(pydicom.filebase.DicomBytesIO(analysis.dicom_seg))
    assert seg.StudyInstanceUID == case.truth["study_instance_uid"]
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert "tumor" in " ".join(labels).lower()
    values = read_sr_measurements(analysis.dicom_sr)
    fused = values["Fused assessment"]
    assert fused["Tumor detection score"] == pytest.approx(analysis.fused.detection_score, abs=1e-6)


def test_missing_modalities_are_notices_not_errors(triton, phantom_cases):
    case = phantom_cases["benign"]
    analysis = run(triton, ingest_paths([case.path / "xr"]))
    assert [r.modality for r in analysis.modalities] == [Modality.XR]
    missing = [n.message for n in analysis.notices if n.code is NoticeCode.MISSING_MODALITY]
    assert any("ct" in m for m in missing) and any("mr" in m for m in missing)
    assert analysis.spine.cobb_source is Modality.XR
    assert analysis.spine.opll is None and analysis.spine.level("C4").canal_area_mm2 is None


def test_modalities_can_be_restricted_and_mr_gives_the_alignment_without_a_radiograph(triton, phantom_cases):
    case = phantom_cases["benign"]
    study = ingest_paths([case.path / f for f in ("ct", "mr", "xr")])
    analysis = run(triton, study, AnalysisOptions(modalities=frozenset({Modality.MR})))
    assert [r.modality for r in analysis.modalities] == [Modality.MR]
    assert analysis.spine.cobb_source is Modality.MR
    assert analysis.spine.cobb_angle_deg == pytest.approx(case.truth["cobb_angle_c2_c7_deg"], abs=10.0)
    assert sum(p.probability for p in analysis.fused.probabilities) == pytest.approx(1.0, abs=1e-6)


def test_a_study_with_nothing_cspine_can_analyse_is_not_assessable_and_says_why(triton):
    frontal = radiograph(view_position="AP", patient_orientation=("L", "F"), description="C-SPINE AP")
    analysis = run(triton, ingest(frontal.files))
    (xr,) = analysis.modalities
    assert xr.modality is Modality.XR and not xr.assessment.assessed and xr.ood is None
    assert [r.code for r in xr.assessment.reasons] == [ReasonCode.WRONG_ORIENTATION]
    assert "frontal view (ViewPosition AP)" in xr.assessment.reasons[0].message
    assert not analysis.fused.assessed and analysis.fused.detection_score is None and not analysis.fused.tumor_detected
    assert [r.code for r in analysis.fused.reasons] == [ReasonCode.NO_ASSESSABLE_MODALITY]
    assert analysis.primary_lesion() is None and all(m.canal_area_mm2 is None for m in analysis.spine.levels)
    assert analysis.disclosure is not None and "SYNTHETIC" in analysis.disclosure.trained_on


def test_a_passed_deadline_stops_the_analysis(triton, phantom_cases):
    study = ingest_paths([phantom_cases["benign"].path / "ct"])
    with pytest.raises(DeadlineExceededError):
        run(triton, study, AnalysisOptions(deadline_s=0.001))


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory):
    return tmp_path_factory.mktemp("cohort") / "seed5"


def test_evaluate_pipeline_command_prints_the_figures_the_issue_names(triton, tmp_path, capsys, small_cohort):
    args = ["evaluate", "pipeline", "--cases", "3", "--seed", "5", "--cohort", str(small_cohort)]
    args += ["--triton-url", triton.grpc_url, "--workers", "1", "--quiet", "--json", "--out", str(tmp_path / "out")]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"detection_sensitivity", "detection_specificity", "size_mae_mm", "level_accuracy", "cobb_mae_deg"}
    assert keys | {"canal_area_error_pct", "opll_accuracy", "stage_seconds"} <= set(result)
    assert result["synthetic"] is True and result["studies"] == 3 and result["cobb_measured"] == 3
    assert 0.0 <= result["cobb_mae_deg"] < 30.0 and 0.0 <= result["canal_area_error_pct"] < 30.0
    assert result["stage_seconds"]["segment"] > 0 and result["stage_seconds"]["total"] > 0
    records = json.loads((tmp_path / "out" / "records.json").read_text())
    assert [r["case_id"] for r in records] == ["case-0001", "case-0002", "case-0003"]


def test_evaluate_competence_command_prints_pass_and_catch_rates(triton, capsys, small_cohort):
    args = ["evaluate", "competence", "--cases", "3", "--seed", "5", "--cohort", str(small_cohort)]
    assert main([*args, "--triton-url", triton.grpc_url, "--workers", "1", "--quiet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["in_domain"]["studies"] == 3 and result["in_domain"]["assessable_rate"] == 1.0
    real, synthetic = result["real_out_of_domain"], result["synthetic_out_of_domain"]
    assert real["studies"] == 18 and real["no_tumor_call"] == 1.0 and real["tumor_detected"] == 0
    assert synthetic["no_tumor_call"] == 1.0 and synthetic["caught_by_layer"]["anatomy"] > 0
    assert real["caught_by_layer"]["input"] > 0.5 and real["caught_by_layer"]["distribution"] > 0
    assert result["ood_auroc"]["XR"] == 1.0 and result["ood_auroc_every_series"]["CT"] >= 0.85


def test_service_cut_rois_are_the_ones_the_pipeline_embedded_its_matched_lesions_from(triton, mismatched_study):
    """The bank cut the way the service cuts (evaluation/service_cut.py) takes each modality's ROI about its matched
    lesion: embedded again (lesion_embed in ONNX Runtime) they give the embeddings the pipeline gave those lesions.
    The radiograph, whose lesions lie at other levels than the CT lesion, gives none."""
    from cspine.evaluation.service_cut import matched_rois
    from cspine.inference.runner import onnx_session

    study = ingest_paths(mismatched_study)
    analysis = run(triton, study)
    rois = matched_rois(study, analysis)
    assert np.isnan(rois[2]).all() and np.isfinite(rois[:2]).all()
    matched, _ = matched_lesions({r.modality: r for r in analysis.modalities})
    session = onnx_session(default_repository() / "lesion_embed" / "1" / "model.onnx")
    onehots = np.eye(3, dtype=np.float32)
    for index, modality in enumerate((Modality.CT, Modality.MR)):
        (embedding,) = session.run(None, {"roi": rois[index : index + 1], "modality": onehots[index : index + 1]})[0]
        assert np.allclose(embedding, matched[modality].embedding, atol=1e-4)


def test_a_service_cut_bank_is_cut_from_studies_of_its_subtype_and_cached(triton, tmp_path):
    """Two SYNTHETIC chordoma studies through the pipeline: a malignant row each, with a CT ROI where a tumor was
    detected; asked again, the bank comes from its cache without generating or analysing anything."""
    from cspine.evaluation.service_cut import service_cut_bank
    from cspine.modeling.data import CLASSES
    from cspine.phantom.tumors import TumorSubtype

    made = service_cut_bank(tmp_path, 7, [TumorSubtype.CHORDOMA], 2, progress=False, triton_url=triton.grpc_url)
    assert made.bank.rois.shape == (2, 3, 3, 64, 64)
    assert list(made.bank.classes) == [CLASSES.index("malignant")] * 2
    assert made.detected.all() and made.at_true_level.all()
    assert np.isfinite(made.usable().rois[:, 0]).all() and len(made.usable(true_level_only=True)) == 2
    (cached,) = tmp_path.glob("service-cut/seed7-models-*/chordoma-2.npz")
    cohort = tmp_path / "service-cut" / "cohorts" / "seed7" / "chordoma-2"
    written = {p: p.stat().st_mtime_ns for p in [cached, *cohort.rglob("*")]}
    again = service_cut_bank(tmp_path, 7, [TumorSubtype.CHORDOMA], 2, progress=False, triton_url="127.0.0.1:9")
    assert np.array_equal(again.bank.rois, made.bank.rois, equal_nan=True)
    assert {p: p.stat().st_mtime_ns for p in written} == written


def test_episode_accuracy_counts_only_lesions_with_an_roi_and_scores_a_separating_embedding_at_1():
    from cspine.evaluation.service_cut import episode_accuracy
    from cspine.modeling.data import CLASSES, LesionBank

    rng = np.random.default_rng(0)
    classes = np.repeat(np.arange(3), 6)
    rois = rng.normal(size=(18, 3, 3, 64, 64)).astype(np.float32)
    rois[:, :, 0, 0, 0] = classes[:, None]  # the class, written where the embedding below reads it
    rois[[0, 1, 2, 3, 4], 2] = np.nan  # five benign lesions without a radiograph ROI: one is left
    bank = LesionBank(rois, np.zeros(18, dtype=int), classes)

    def separating(r: np.ndarray, modality: np.ndarray) -> np.ndarray:
        return np.eye(3, dtype=np.float32)[r[:, 0, 0, 0].round().astype(int)] * 10

    def nearest(embedding: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
        d2 = ((embedding[:, None] - prototypes[None]) ** 2).sum(-1)
        return np.exp(-d2) / np.exp(-d2).sum(1, keepdims=True)

    figures = episode_accuracy(bank, separating, nearest, shots=(1, 5), episodes=20)
    assert figures["CT"]["lesions_per_class"] == dict.fromkeys(CLASSES, 6)
    assert figures["CT"]["1"] == figures["CT"]["5"] == {"accuracy": 1.0, "balanced_accuracy": 1.0}
    assert figures["XR"]["lesions_per_class"] == {"benign": 1, "borderline": 6, "malignant": 6}
    assert set(figures["XR"]) == {"lesions_per_class"}  # one benign lesion: no query left for it at k = 1

    def noise(r: np.ndarray, modality: np.ndarray) -> np.ndarray:
        return np.random.default_rng(len(r)).normal(size=(len(r), 8)).astype(np.float32)

    chance = episode_accuracy(bank, noise, nearest, shots=(1,), episodes=200)["CT"]["1"]["balanced_accuracy"]
    assert 0.2 < chance < 0.5
