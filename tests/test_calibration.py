"""Unknown-visitor threshold calibration on similarities: pure numpy, constructed scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedbell.calibration import (
    MAX_THRESHOLD,
    MIN_STRANGERS,
    MIN_THRESHOLD,
    calibrate_threshold,
    stranger_visits,
    threshold_for_far,
)
from fedbell.embedding import normalize


def accepted(scores: np.ndarray, threshold: float) -> float:
    """Share of scores that reach the threshold (a visitor at or above it is named)."""
    return float(np.mean(np.asarray(scores) >= threshold))


def test_threshold_lets_in_at_most_the_target_share_and_is_the_lowest_such() -> None:
    scores = np.arange(100, dtype=np.float64) / 100  # 0.00, 0.01, ..., 0.99
    assert 0.94 < threshold_for_far(scores, 0.05) <= 0.95  # just above the 6th best
    assert accepted(scores, threshold_for_far(scores, 0.05)) == 0.05
    rng = np.random.default_rng(0)
    random = rng.uniform(-0.5, 0.9, 1000)
    for target in (0.0, 0.001, 0.01, 0.05, 0.2, 0.5):
        threshold = threshold_for_far(random, target)
        assert accepted(random, threshold) <= target
        # The lowest such threshold: the next score down would let one too many in.
        below = random[random < threshold].max()
        assert accepted(random, below) > target


def test_zero_target_rejects_every_score_and_ties_are_not_split() -> None:
    scores = np.array([0.2, 0.5, 0.5, 0.5, 0.9])
    threshold = threshold_for_far(scores, 0.0)
    assert threshold > 0.9
    assert accepted(scores, threshold) == 0.0
    # 40 % may pass, but the three tied 0.5s cannot be split: only the 0.9 passes.
    assert accepted(scores, threshold_for_far(scores, 0.4)) == pytest.approx(0.2)
    assert accepted(scores, threshold_for_far(scores, 0.8)) == pytest.approx(0.8)


def test_threshold_stays_a_cosine() -> None:
    assert threshold_for_far(np.full(10, 1.0), 0.0) == MAX_THRESHOLD  # nothing above 1
    # Nearly everyone may pass: only the lowest score fails, by the smallest step.
    assert threshold_for_far(np.array([-1.0, 0.3]), 0.99) == np.nextafter(-1.0, 1.0)
    assert MIN_THRESHOLD < threshold_for_far(np.array([-1.0, 0.3]), 0.99) < 0.3
    assert threshold_for_far(np.array([0.3]), 0.99) == np.nextafter(0.3, 1.0)


@pytest.mark.parametrize(
    ("scores", "target", "match"),
    [
        ([], 0.01, "finite scores"),
        ([0.5, np.nan], 0.01, "finite scores"),
        ([0.5, np.inf], 0.01, "finite scores"),
        ([0.5], 1.0, "target_far"),
        ([0.5], -0.1, "target_far"),
    ],
)
def test_threshold_for_far_refuses_bad_input(
    scores: list[float], target: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        threshold_for_far(np.asarray(scores, dtype=np.float64), target)


def unit_rows(count: int, dim: int = 16, seed: int = 0) -> np.ndarray:
    return normalize(np.random.default_rng(seed).normal(size=(count, dim)))


def test_stranger_visits_is_the_best_match_in_each_pretend_house() -> None:
    strangers = unit_rows(30)
    visits = stranger_visits(strangers, gallery_size=1, galleries_per_probe=4, seed=1)
    assert visits.shape == (30 * 4,)
    similarity = strangers @ strangers.T
    np.fill_diagonal(similarity, -np.inf)
    for probe in range(30):
        mine = visits[probe * 4 : (probe + 1) * 4]
        # One-person houses: each score is the probe's similarity to some *other* stranger.
        for score in mine:
            assert np.isclose(similarity[probe], score, atol=1e-6).any()
        assert mine.max() <= similarity[probe].max() + 1e-6
    # Bigger houses: the best of more people, so never lower on average.
    big = stranger_visits(strangers, gallery_size=10, galleries_per_probe=4, seed=1)
    assert big.mean() > visits.mean()
    assert np.array_equal(
        stranger_visits(strangers, 5, seed=3), stranger_visits(strangers, 5, seed=3)
    )


def test_calibrated_threshold_holds_on_strangers_it_never_saw() -> None:
    """Half the strangers calibrate; houses of the other half let in about the target share."""
    strangers = unit_rows(400, dim=8, seed=2)  # low dimension: strangers do resemble each other
    threshold = calibrate_threshold(strangers[:200], target_far=0.05, gallery_size=5)
    assert accepted(stranger_visits(strangers[:200], 5), threshold) <= 0.05
    unseen = accepted(stranger_visits(strangers[200:], 5, seed=9), threshold)
    assert 0.0 < unseen < 0.1
    # A bigger house at the same threshold lets more strangers in: the house size matters.
    assert accepted(stranger_visits(strangers[200:], 20, seed=9), threshold) > unseen
    assert calibrate_threshold(strangers[:200], 0.05, gallery_size=20) > threshold


def test_residents_above_a_calibrated_threshold_are_named() -> None:
    """Constructed so that residents' photos are near their prototypes and strangers are not."""
    rng = np.random.default_rng(4)
    prototypes = unit_rows(5, dim=32, seed=5)
    photos = normalize(np.repeat(prototypes, 10, axis=0) + rng.normal(0, 0.05, size=(50, 32)))
    strangers = unit_rows(100, dim=32, seed=6)
    threshold = calibrate_threshold(strangers, target_far=0.01, gallery_size=5)
    own = np.sum(photos * np.repeat(prototypes, 10, axis=0), axis=1)
    assert own.min() > threshold  # every resident named
    assert accepted((strangers @ prototypes.T).max(axis=1), threshold) <= 0.05


@pytest.mark.parametrize(
    ("strangers", "gallery_size", "match"),
    [
        (unit_rows(MIN_STRANGERS - 1), 5, "at least 20"),
        (unit_rows(30)[:, 0], 5, "at least 20"),  # one dimension: not embeddings
        (unit_rows(30), 0, "gallery_size"),
        (unit_rows(30), 30, "gallery_size"),
        (np.where(np.eye(30, 16) > 0, np.nan, unit_rows(30)), 5, "NaN"),
    ],
)
def test_stranger_visits_refuses_bad_input(
    strangers: np.ndarray, gallery_size: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        stranger_visits(strangers, gallery_size)
    with pytest.raises(ValueError, match=match):
        calibrate_threshold(strangers, 0.01, gallery_size)


def test_calibrate_refuses_a_target_that_is_not_a_rate() -> None:
    with pytest.raises(ValueError, match="target_far"):
        calibrate_threshold(unit_rows(30), 1.0)
