"""Unknown-visitor threshold calibration on similarities: pure numpy, constructed scores."""

from __future__ import annotations

import numpy as np
import pytest

from fedbell.faces.calibration import (
    MAX_THRESHOLD,
    MIN_STRANGERS,
    MIN_THRESHOLD,
    calibrate_threshold,
    stranger_visits,
    threshold_for_far,
)
from fedbell.faces.embedding import normalize
from fedbell.faces.openset import prototype


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


def cone(count: int, photos: int, rng: np.random.Generator) -> np.ndarray:
    """`photos` embeddings of each of `count` people, in a narrow cone as a face network
    makes them: a shared direction, a person's own offset, and per-photo noise."""
    middle = np.zeros(32)
    middle[0] = 1.0
    people = rng.normal(0, 0.15, size=(count, 1, 32))
    noise = rng.normal(0, 0.6, size=(count, photos, 32))
    return np.asarray(normalize((middle + people + noise).reshape(-1, 32)))


def test_houses_enrolled_from_several_photos_need_a_stricter_threshold() -> None:
    """Prototypes average photos, so they sit nearer the cone's middle and nearer every
    stranger: calibrating on single stranger photos lets far more than the target in."""
    rng = np.random.default_rng(0)
    strangers = cone(1200, 1, rng)
    held_out = cone(60, 5, rng).reshape(60, 5, 32)
    prototypes = np.stack([prototype(person) for person in held_out])
    houses = cone(60, 5, rng).reshape(60, 5, 32)  # other people, enrolled the same way
    fresh = np.stack([prototype(person) for person in houses])
    single = calibrate_threshold(strangers[:600], 0.01, gallery_size=5)
    enrolled = calibrate_threshold(strangers[:600], 0.01, gallery_size=5, residents=prototypes)
    assert enrolled > single
    # Unseen strangers at unseen houses (4,800 visits: 1 % is 48 of them).
    visits = stranger_visits(strangers[600:], 5, seed=3, residents=fresh)
    assert accepted(visits, enrolled) <= 0.015  # near its target
    assert accepted(visits, single) >= 1.5 * accepted(visits, enrolled) + 0.005


def test_stranger_visits_draw_houses_from_the_residents() -> None:
    strangers = unit_rows(30, seed=1)
    residents = unit_rows(6, seed=2)
    visits = stranger_visits(strangers, 6, galleries_per_probe=2, residents=residents)
    best = (strangers @ residents.T).max(axis=1)  # a house of all six: the best match
    np.testing.assert_allclose(visits, np.repeat(best, 2), rtol=1e-6)


@pytest.mark.parametrize(
    ("residents", "gallery_size", "match"),
    [
        (unit_rows(4), 5, "gallery_size"),
        (unit_rows(6, dim=8), 5, "width 8"),
        (np.full((6, 16), np.nan), 5, "NaN"),
        (unit_rows(6)[:, 0], 5, "resident prototypes"),
    ],
)
def test_residents_are_checked(residents: np.ndarray, gallery_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        calibrate_threshold(unit_rows(30), 0.01, gallery_size, residents=residents)
