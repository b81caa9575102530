"""fewshot/adapt.py on synthetic Gaussian embeddings (no model): the gradient of the fitted prototypes is the
true one, each method helps where it should, and a support change adapts in well under a second."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cspine.fewshot.adapt import (
    balanced_accuracy,
    class_means,
    expected_calibration_error,
    fitted,
    softmax_probabilities,
    transductive,
)

SCALE = 10.0


def clusters(rng, centres, per_class, spread):
    """Normalised embeddings around ``centres`` (as the shipped embedding is L2-normalised)."""
    points = np.concatenate([c + spread * rng.standard_normal((per_class, centres.shape[1])) for c in centres])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), np.repeat(np.arange(len(centres)), per_class)


def test_the_fitted_prototypes_follow_the_true_gradient_of_their_loss():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 8))
    e, y = clusters(rng, centres, 4, 0.5)
    start = class_means(e, y, 3)

    def loss(w):
        p = softmax_probabilities(e.astype(np.float64), w, SCALE)
        return -np.log(p[np.arange(len(y)), y]).mean() + 0.5 * ((w - start) ** 2).sum()

    one_step = fitted(e, y, start, SCALE, steps=1, learning_rate=1e-3)
    analytic = (start - one_step) / 1e-3
    numeric = np.zeros_like(start, dtype=np.float64)
    for index in np.ndindex(start.shape):
        h = np.zeros_like(start, dtype=np.float64)
        h[index] = 1e-5
        numeric[index] = (loss(start + h) - loss(start - h)) / 2e-5
    assert np.allclose(analytic, numeric, atol=1e-3)


def test_fitting_and_transduction_beat_plain_means_on_overlapping_clusters():
    rng = np.random.default_rng(1)
    plain_accuracy, fitted_accuracy, transductive_accuracy = [], [], []
    for _ in range(40):
        centres = rng.standard_normal((3, 16))
        support, s_labels = clusters(rng, centres, 5, 0.9)
        queries, q_labels = clusters(rng, centres, 30, 0.9)
        means = class_means(support, s_labels, 3)
        for prototypes, out in (
            (means, plain_accuracy),
            (fitted(support, s_labels, means, SCALE), fitted_accuracy),
            (transductive(means, support, s_labels, queries, SCALE), transductive_accuracy),
        ):
            predicted = softmax_probabilities(queries, prototypes, SCALE).argmax(1)
            out.append((predicted == q_labels).mean())
    assert np.mean(transductive_accuracy) > np.mean(plain_accuracy)
    assert np.mean(fitted_accuracy) >= np.mean(plain_accuracy) - 0.01  # never worse by more than noise


def test_a_support_change_adapts_in_well_under_a_second():
    rng = np.random.default_rng(2)
    support, labels = clusters(rng, rng.standard_normal((3, 64)), 20, 0.5)
    start = time.perf_counter()
    fitted(support, labels, class_means(support, labels, 3), SCALE)
    assert time.perf_counter() - start < 1.0


def test_calibration_and_balanced_accuracy():
    truth = np.array([0, 0, 0, 1])
    sure_and_right = np.eye(2)[truth]
    assert expected_calibration_error(sure_and_right, truth) == pytest.approx(0.0)
    half = np.full((4, 2), 0.5)
    half[:, 0] += 1e-6  # always predicts 0 with confidence 0.5: 3 of 4 right
    assert expected_calibration_error(half, truth) == pytest.approx(0.25, abs=1e-4)
    assert balanced_accuracy(np.zeros(4, int), truth, 2) == pytest.approx(0.5)


def test_a_calibrated_answer_s_ece_is_its_sampling_floor_and_a_confident_wrong_one_is_far_above_it():
    """``calibrated_ece``: predictions right as often as they say show only the ECE of sampling on so many
    predictions (small, and smaller with more of them); a measured ECE far above it is miscalibration."""
    from cspine.fewshot.adapt import calibrated_ece

    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.4, 1.0, 2000)
    probabilities = np.stack([confidence, (1 - confidence) / 2, (1 - confidence) / 2], axis=1)
    floor_small = calibrated_ece(probabilities[:100], np.random.default_rng(1))
    floor_large = calibrated_ece(probabilities, np.random.default_rng(1))
    assert 0.0 < floor_large < floor_small < 0.15
    # truth drawn so that these predictions are calibrated: the measured ECE sits near the floor
    truth = np.where(rng.random(2000) < confidence, 0, 1)
    assert expected_calibration_error(probabilities, truth) < 3 * floor_large
    # always wrong at a mean confidence of 0.7: far above it
    assert expected_calibration_error(probabilities, np.ones(2000, int)) > 0.6
