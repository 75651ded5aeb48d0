"""Choosing the open-set threshold: below it, a face is "unknown".

The aggregator calls `calibrate_threshold` on held-out predictions when it
publishes a TFLite artifact; the doorbell applies the threshold it receives.
Pure numpy, so both sides can use it without TensorFlow.

A false accept is a stranger named as a resident: the max softmax
probability of a face nobody enrolled reaching the threshold. When held-out
strangers are available their scores are used directly. Without them, each
known face stands in for a stranger by removing its own class and
renormalising the rest: "how sure would the model be about this person if
they had never been enrolled" — a leave-one-class-out proxy.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Probabilities = npt.NDArray[np.floating]

MIN_THRESHOLD = 0.0
MAX_THRESHOLD = 1.0


def _check_probabilities(name: str, probabilities: npt.ArrayLike) -> npt.NDArray[np.float64]:
    array = np.asarray(probabilities, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] < 2:
        raise ValueError(
            f"{name}: expected a non-empty [samples, classes>=2] array, got shape {array.shape}"
        )
    if not np.all(np.isfinite(array)) or array.min() < 0.0 or array.max() > 1.0 + 1e-6:
        raise ValueError(f"{name}: probabilities must be finite and within [0, 1]")
    return array


def stranger_scores(
    probabilities_known: npt.ArrayLike, labels: npt.ArrayLike | None = None
) -> npt.NDArray[np.float64]:
    """Proxy stranger confidences: each known face with its own class removed.

    `labels` are the true class indices; without them the predicted class is
    removed, which is the same thing for correctly classified faces.
    """
    known = _check_probabilities("probabilities_known", probabilities_known)
    rows = np.arange(known.shape[0])
    own = np.argmax(known, axis=1) if labels is None else np.asarray(labels, dtype=np.int64)
    if own.shape != (known.shape[0],) or own.min() < 0 or own.max() >= known.shape[1]:
        raise ValueError(
            f"labels: expected {known.shape[0]} class indices in [0, {known.shape[1]})"
        )
    rest = known.copy()
    rest[rows, own] = 0.0
    remaining = rest.sum(axis=1)
    # A face the model gave 100 % to its own class says nothing about strangers;
    # spreading evenly is the least confident (safest) reading of it.
    uniform = 1.0 / (known.shape[1] - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        scores = np.where(remaining > 1e-12, rest.max(axis=1) / remaining, uniform)
    return np.asarray(scores, dtype=np.float64)


def threshold_for_far(scores: npt.ArrayLike, target_far: float) -> float:
    """The lowest threshold at which at most `target_far` of `scores` reach it."""
    values = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    allowed = int(np.floor(target_far * values.size + 1e-9))
    if allowed >= values.size:
        return MIN_THRESHOLD
    # Just above the (allowed+1)-th highest score: that one and all below it fail.
    return float(min(MAX_THRESHOLD, np.nextafter(values[allowed], np.inf)))


def calibrate_threshold(
    probabilities_known: npt.ArrayLike,
    target_far: float,
    probabilities_unknown: npt.ArrayLike | None = None,
    *,
    labels: npt.ArrayLike | None = None,
) -> float:
    """The confidence threshold giving at most `target_far` false accepts.

    probabilities_known: softmax outputs [n, classes] on held-out enrolled faces.
    probabilities_unknown: softmax outputs on held-out faces of people not in
    the label set; when absent, the leave-one-class-out proxy is used.
    labels: optional true classes of the known faces (for the proxy).
    """
    if not 0.0 <= target_far < 1.0:
        raise ValueError(f"target_far must be in [0, 1), got {target_far}")
    if probabilities_unknown is not None:
        _check_probabilities("probabilities_known", probabilities_known)
        unknown = _check_probabilities("probabilities_unknown", probabilities_unknown)
        scores = unknown.max(axis=1)
    else:
        scores = stranger_scores(probabilities_known, labels)
    return threshold_for_far(scores, target_far)


def false_accept_rate(probabilities_unknown: npt.ArrayLike, threshold: float) -> float:
    """Share of strangers whose best class reaches `threshold`."""
    unknown = _check_probabilities("probabilities_unknown", probabilities_unknown)
    return float(np.mean(unknown.max(axis=1) >= threshold))


def false_reject_rate(probabilities_known: npt.ArrayLike, threshold: float) -> float:
    """Share of enrolled faces whose best class stays below `threshold`."""
    known = _check_probabilities("probabilities_known", probabilities_known)
    return float(np.mean(known.max(axis=1) < threshold))
