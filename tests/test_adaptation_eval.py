"""The adaptation evaluation's smoke version: the shipped lesion embedding and prototype classifier (ONNX
Runtime) on a small bank of SYNTHETIC ROIs whose classes differ in brightness, through every method and shot
count, in the JSON shape `cspine evaluate adaptation --json` prints. The full run is the command."""

from __future__ import annotations

import numpy as np
import pytest

from cspine.evaluation.adaptation import METHODS, classifier_scale, evaluate_adaptation
from cspine.fewshot.prototypes import SupportSet
from cspine.inference.local_triton import default_repository
from cspine.modeling.data import LesionBank
from cspine.modeling.evaluate import onnx_embed
from cspine.modeling.recipes import ARTIFACTS, load_baseline_artifact, model_path, proto_classifier


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


def test_the_evaluation_runs_every_method_and_shot_count_in_the_issue_s_json_shape(models):
    embed, classify = models
    baseline = load_baseline_artifact(ARTIFACTS / "baseline.pt")
    result = evaluate_adaptation(
        {"toy": bank(32, 0)},
        SupportSet.load(),
        embed,
        classify,
        baseline,
        {"toy": 6},
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
    # The toy classes are plain to see once the site's own cases are in: 20 of them per class beat none.
    assert figures["plain"]["20"]["balanced_accuracy"] > figures["plain"]["0"]["balanced_accuracy"]
    assert 0.0 <= result["new_class_recall"]["toy"] <= 1.0
    assert set(result["fused_vs_best_single"]["toy"]) == {"fused", "best_single"}
    assert result["shipped_method"] == "plain" and "ground-truth ROIs" in result["measured_on"]
