"""Fast adaptation of prototypes beyond class means, on embeddings only (numpy, milliseconds on a CPU).

The classifier is the shipped ``proto_classify``: ``p(c | e) = softmax_c(-scale · ||e - w_c||²)``. Every method here
returns new prototypes ``w`` [K, D] for it, so serving is unchanged whichever is chosen:

- ``class_means``: the plain prototypes (Prototypical Networks).
- ``fitted``: a few gradient steps of cross-entropy on the support cases, prototypes as the parameters,
  started from the class means and held near them by an L2 pull (the light head that Proto-MAML initialises
  from the prototypes; here the head *is* the prototypes, so it stays one ``proto_classify`` call). Support-set
  change time, no query needed.
- ``transductive``: soft k-means refinement with the unlabelled queries (their class probabilities as
  weights), a few iterations; for batch evaluation of a site's studies, not for one study at a time.

``pooling_weights`` fits, beside the prototypes, the weight each modality's class evidence gets when the
modalities are fused (log-linear pooling, analysis/fusion.py), on the site's cases held out of the prototypes
that classify them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from cspine.inference.specs import EMBEDDING_DIM

POOLING_PULL = 0.01  # the L2 pull of pooling_weights toward the weights it starts from


def softmax_probabilities(embeddings: np.ndarray, prototypes: np.ndarray, scale: float) -> np.ndarray:
    """[N, K] probabilities of the prototype classifier (the ONNX ``proto_classify``'s formula)."""
    d2 = ((embeddings[:, None, :] - prototypes[None, :, :]) ** 2).sum(-1)
    logits = -scale * d2
    logits -= logits.max(1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(1, keepdims=True)


def class_means(embeddings: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    """[K, D] mean embedding per class (every class must have a support case)."""
    return np.stack([embeddings[labels == c].mean(0) for c in range(classes)]).astype(np.float32)


def fitted(
    embeddings: np.ndarray,
    labels: np.ndarray,
    start: np.ndarray,
    scale: float,
    steps: int = 30,
    learning_rate: float = 0.02,
    pull: float = 1.0,
) -> np.ndarray:
    """Prototypes moved from ``start`` by ``steps`` of gradient descent on the support cross-entropy plus
    ``pull`` · ||w - start||² / 2 (closed-form gradients; 3 classes × 20 cases × 64 dimensions take ~1 ms)."""
    w = start.astype(np.float64).copy()
    onehot = np.eye(len(start))[labels]
    e = embeddings.astype(np.float64)
    for _ in range(steps):
        p = softmax_probabilities(e, w, scale)
        # d CE / d w_c = mean_q (p_qc - y_qc) · 2 · scale · (e_q - w_c)
        residual = (p - onehot)[:, :, None] * (e[:, None, :] - w[None, :, :])
        gradient = 2.0 * scale * residual.mean(0) + pull * (w - start)
        w -= learning_rate * gradient
    return w.astype(np.float32)


def transductive(
    prototypes: np.ndarray,
    support: np.ndarray,
    labels: np.ndarray,
    queries: np.ndarray,
    scale: float,
    iterations: int = 3,
) -> np.ndarray:
    """Prototypes refined with the queries: each iteration a prototype is the mean of its support cases and of
    every query weighted by its current probability of that class (soft k-means)."""
    onehot = np.eye(len(prototypes))[labels]
    w = prototypes.astype(np.float64)
    for _ in range(iterations):
        p = softmax_probabilities(queries, w, scale)
        total = onehot.T @ support + p.T @ queries
        w = total / (onehot.sum(0) + p.sum(0))[:, None]
    return w.astype(np.float32)


def pooling_weights(
    held_out: np.ndarray, labels: np.ndarray, start: np.ndarray, pull: float = POOLING_PULL
) -> np.ndarray:
    """Per-modality weights ``w`` ≥ 0 of log-linear pooling, ``softmax(Σ_m w_m · log p_m)``, that minimise the
    cross-entropy of cases whose [n, modalities, K] log-probabilities ``held_out`` came from prototypes made
    without them (0 where a case lacks a modality), plus ``pull`` · ||w − start||² (L-BFGS-B, weights ≤ 5)."""
    rows = np.arange(len(labels))

    def loss(w: np.ndarray) -> float:
        z = np.tensordot(held_out, w, axes=([1], [0]))
        z = z - z.max(1, keepdims=True)
        nll = np.log(np.exp(z).sum(1)) - z[rows, labels]
        return float(nll.mean() + pull * np.sum((w - start) ** 2))

    result = minimize(loss, start, method="L-BFGS-B", bounds=[(0.0, 5.0)] * len(start))
    return np.asarray(result.x)


def expected_calibration_error(probabilities: np.ndarray, truth: np.ndarray, bins: int = 10) -> float:
    """ECE: the occupancy-weighted gap between confidence and accuracy over equal-width confidence bins."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == truth
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:], strict=True):
        inside = (confidence > low) & (confidence <= high)
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(error)


def calibrated_ece(probabilities: np.ndarray, rng: np.random.Generator, draws: int = 200) -> float:
    """The mean ECE that a perfectly calibrated classifier with these predictions' confidences would show on as
    many predictions: each one right with probability its confidence, drawn independently ``draws`` times. It is
    the floor an ECE measured on this many predictions sits on (a lower one where predictions share queries)."""
    confidence = probabilities.max(1)
    predicted = probabilities.argmax(1)
    errors = []
    for _ in range(draws):
        right = rng.random(len(confidence)) < confidence
        errors.append(expected_calibration_error(probabilities, np.where(right, predicted, -1)))
    return float(np.mean(errors))


def balanced_accuracy(predicted: np.ndarray, truth: np.ndarray, classes: int) -> float:
    """Mean per-class recall over the classes present in ``truth``."""
    recalls = [float((predicted[truth == c] == c).mean()) for c in range(classes) if (truth == c).any()]
    return float(np.mean(recalls))


def classifier_scale(classify: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
    """The scale ``s`` of a classifier ``softmax(-s · d²)``, read from one call: with prototypes at squared
    distances 0 and 1, the log-ratio of the two probabilities is ``s``."""
    embedding = np.zeros((1, EMBEDDING_DIM), np.float32)
    prototypes = np.zeros((2, EMBEDDING_DIM), np.float32)
    prototypes[1, 0] = 1.0
    p = classify(embedding, prototypes)[0]
    return float(np.log(p[0] / p[1]))


def exported_scale(model: Path) -> float:
    """The learned scale of the exported ``proto_classify`` ONNX model (model_repository/proto_classify/1)."""
    from cspine.inference.runner import onnx_session

    session = onnx_session(model)
    return classifier_scale(lambda e, p: session.run(None, {"embedding": e, "prototypes": p})[0])
