"""Open-set threshold calibration: pure numpy, checked on constructed scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedbell.calibration import (
    calibrate_threshold,
    false_accept_rate,
    false_reject_rate,
    stranger_scores,
)


def softmax_rows(best: np.ndarray, classes: int = 4) -> np.ndarray:
    """Rows whose max is `best`, the rest spread evenly."""
    rest = (1.0 - best) / (classes - 1)
    rows = np.repeat(rest[:, None], classes, axis=1)
    rows[:, 0] = best
    return rows


def test_threshold_meets_target_far_on_strangers() -> None:
    rng = np.random.default_rng(0)
    known = softmax_rows(rng.uniform(0.7, 1.0, 200))
    unknown = softmax_rows(rng.uniform(0.3, 0.9, 1000))
    for target in (0.0, 0.01, 0.05, 0.2):
        threshold = calibrate_threshold(known, target, unknown)
        assert false_accept_rate(unknown, threshold) <= target
        # The lowest such threshold: a hair lower admits one stranger too many.
        assert false_accept_rate(unknown, threshold - 1e-6) > target or threshold == 0.0
    assert false_reject_rate(known, calibrate_threshold(known, 0.05, unknown)) < 0.5


def test_proxy_removes_own_class_and_renormalises() -> None:
    probabilities = np.array([[0.8, 0.15, 0.05], [0.1, 0.1, 0.8], [1.0, 0.0, 0.0]])
    scores = stranger_scores(probabilities)
    assert scores == pytest.approx([0.75, 0.5, 0.5])
    assert stranger_scores(probabilities, labels=[1, 2, 0]) == pytest.approx([0.8 / 0.85, 0.5, 0.5])
    threshold = calibrate_threshold(probabilities, 0.0)
    assert threshold > scores.max()


@pytest.mark.parametrize(
    ("known", "far", "match"),
    [
        (np.zeros((0, 3)), 0.1, "non-empty"),
        (np.array([0.5, 0.5]), 0.1, "samples, classes"),
        (np.array([[0.5, np.nan]]), 0.1, "finite"),
        (np.array([[1.5, -0.5]]), 0.1, "within"),
        (np.array([[0.5, 0.5]]), 1.0, "target_far"),
    ],
)
def test_bad_input_is_a_clear_error(known: np.ndarray, far: float, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        calibrate_threshold(known, far)
