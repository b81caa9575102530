"""The adaptation evaluation's smoke version: the shipped lesion embedding and prototype classifier (ONNX
Runtime) on a small bank of SYNTHETIC ROIs whose classes differ in brightness, through every method and shot
count, in the JSON shape `cspine evaluate adaptation --json` prints. The full run is the command."""

from __future__ import annotations

import numpy as np
import pytest

from cspine.evaluation.adaptation import METHODS, SitePools, evaluate_adaptation
from cspine.fewshot.adapt import classifier_scale
from cspine.fewshot.prototypes import SHIPPED_METHOD, SupportSet
from cspine.inference.local_triton import default_repository
from cspine.modeling.data import CLASSES, LesionBank
from cspine.modeling.evaluate import _pick_cases, onnx_embed
from cspine.modeling.recipes import ARTIFACTS, load_baseline_artifact, model_path, proto_classifier
from cspine.phantom.generate import PhantomOptions, case_subtype, plan_case
from cspine.phantom.tumors import SUBTYPES, TumorSubtype


def bank(per_class: int, seed: int) -> LesionBank:
    """ROIs [N, 3 modalities, 3, 64, 64]: noise plus a blob whose brightness and size depend on the class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    rois, classes = [], []
    for c in range(3):
        for _ in range(per_class):
            radius = 6 + 5 * c + rng.normal(0, 1)
            blob = ((yy - 32) ** 2 + (xx - 32) ** 2 < radius**2).astype(np.float32) * (0.5 + 0.4 * c)
            roi = blob[None, None] + 0.1 * rng.standard_normal((3, 3, 64, 64)).astype(np.float32)
            rois.append(roi)
            classes.append(c)
    classes_array = np.array(classes)
    return LesionBank(np.stack(rois), subtypes=classes_array * 3, classes=classes_array)


@pytest.fixture(scope="module")
def models():
    repository = default_repository()
    return onnx_embed(model_path(repository, "lesion_embed")), proto_classifier(repository)


def test_the_classifier_scale_is_read_back_from_the_exported_model(models):
    _, classify = models
    scale = classifier_scale(classify)
    e = np.zeros((1, 64), np.float32)
    p = np.zeros((3, 64), np.float32)
    p[1, 0], p[2, 0] = 0.5, 1.0
    expected = np.exp(-scale * np.array([0.0, 0.25, 1.0]))
    assert np.allclose(classify(e, p)[0], expected / expected.sum(), atol=1e-5)


def ring(count: int, seed: int) -> LesionBank:
    """A fourth look for the new class: a bright ring."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    r2 = (yy - 32) ** 2 + (xx - 32) ** 2
    shape = ((r2 > 14**2) & (r2 < 20**2)).astype(np.float32) * 1.5
    rois = np.stack([shape[None, None] + 0.1 * rng.standard_normal((3, 3, 64, 64)) for _ in range(count)])
    return LesionBank(rois.astype(np.float32), subtypes=np.full(count, 9), classes=np.full(count, 2))


def test_the_evaluation_runs_every_method_and_shot_count_in_the_issue_s_json_shape(models):
    embed, classify = models
    baseline = load_baseline_artifact(ARTIFACTS / "baseline.pt")
    result = evaluate_adaptation(
        {"toy": SitePools(bank(36, 0), ring(12, 1), "ring")},
        SupportSet.load(),
        embed,
        classify,
        baseline,
        np.array([0.5, 0.5, 0.5]),
        SHIPPED_METHOD,
        repeats=1,
        finetune_steps=3,
        seed=1,
    )
    figures = result["sites"]["toy"]
    assert set(figures) == set(METHODS)
    assert set(figures["plain"]) == {"0", "1", "5", "10", "20"} and "0" not in figures["baseline"]
    for method in figures.values():
        for values in method.values():
            assert set(values) == {"accuracy", "balanced_accuracy", "ece"}
            assert 0.0 <= values["accuracy"] <= 1.0 and 0.0 <= values["ece"] <= 1.0
    for method in result["details"]["toy"]["methods"].values():
        for values in method.values():
            low, high = values["ece_ci95"]
            assert 0.0 <= low <= high <= 1.0 and 0.0 < values["ece_if_calibrated"] < 0.5
    # The toy classes are plain to see once the site's own cases are in: 20 of them per class beat none.
    assert figures["plain"]["20"]["balanced_accuracy"] > figures["plain"]["0"]["balanced_accuracy"]
    # The ring looks like nothing else: 5 cases make a class that finds most rings. (The toy blobs are far from
    # the default's phantom prototypes too, so many of them fall to the new class: others_taken is no figure here.)
    added = result["details"]["toy"]["new_class"]
    assert added["recall"] == result["new_class_recall"]["toy"] > 0.5 and 0.0 <= added["others_taken"] <= 1.0
    assert set(result["fused_vs_best_single"]["toy"]) == {"fused", "best_single"}
    assert result["shipped_method"] == SHIPPED_METHOD and "ground-truth ROIs" in result["measured_on"]
    by_modality = result["details"]["toy"]["methods"]["plain"]["5"]["by_modality"]
    assert set(by_modality) == {"ct", "mr", "xr"}


def test_a_site_pool_is_class_balanced_and_picked_without_rendering():
    """The pool's cases are chosen by their subtype alone (its first draw), the one plan_case then draws."""
    picked = _pick_cases("community-ct", 9700, 0, 4, "random")
    options = PhantomOptions(site="community-ct")
    classes = [SUBTYPES[case_subtype(9700, i, options)].tumor_class.value for i in picked]
    assert sorted(classes) == sorted(CLASSES * 4)
    assert plan_case("x", 9700, picked[0], options).lesion["subtype"] == case_subtype(9700, picked[0], options).value
    forced = _pick_cases("mr-1p5t", 9701, 0, 3, "hemangioma")
    options = PhantomOptions(site="mr-1p5t", tumor="hemangioma")
    assert len(forced) == 3 and {case_subtype(9701, i, options) for i in forced} == {TumorSubtype.HEMANGIOMA}


def test_where_the_calibration_chose_one_modality_the_evaluation_answers_with_that_modality():
    """``service_answer``: the calibration's weights without an order; with one, all weight on its first
    modality, and pooling with that gives the modality's own probabilities, as the service answers."""
    from cspine.domain import Modality
    from cspine.evaluation.adaptation import _fused, service_answer

    weights = np.array([0.2, 0.3, 0.1])
    assert service_answer(weights, ()) is weights
    answer = service_answer(weights, (Modality.MR, Modality.CT, Modality.XR))
    assert answer.tolist() == [0.0, 1.0, 0.0]
    probabilities = np.random.default_rng(0).dirichlet(np.ones(3), size=(3, 5))  # [modality, lesion, class]
    assert np.allclose(_fused(list(np.log(probabilities)), answer), probabilities[1])
