"""Federated calibration's arithmetic (fedbell/faces/histograms.py, aggregator/calibration.py
check_sum): summed per-house histograms in, a threshold and true-accept rates out. Pure
numpy, constructed scores; the real processes are in test_federated_calibration.py."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.calibration import check_sum
from fedbell.errors import RejectedMessage
from fedbell.faces import histograms
from fedbell.faces.histograms import BINS, COUNT_CAP, MISNAMED, VECTOR_NORM, VECTOR_SIZE
from fedbell.wire.protocol import SecAggPlan

WIDTH = 2.0 / BINS


def house(strangers: np.ndarray, genuine: np.ndarray) -> np.ndarray:
    """A house's vector with the same scores for the candidate and the start head."""
    parts = [histograms.histogram(s) for s in (strangers, genuine, strangers, genuine)]
    return np.concatenate([*parts, [min(len(strangers), COUNT_CAP) / COUNT_CAP]])


def houses(count: int, seed: int, strangers: int = 60) -> list[tuple[np.ndarray, np.ndarray]]:
    """(stranger scores, genuine scores) of `count` houses, each house a little different."""
    rng = np.random.default_rng(seed)
    return [
        (
            np.clip(rng.normal(0.55 + 0.05 * rng.random(), 0.12, strangers), -1, 1),
            np.clip(rng.normal(0.85, 0.06, 12), -1, 1),
        )
        for _ in range(count)
    ]


def summed(data: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    return np.asarray(np.sum([house(s, g) for s, g in data], axis=0), np.float64)


def house_averaged(scores: list[np.ndarray], threshold: float) -> float:
    """The share of each house's scores at or above threshold, averaged over houses."""
    return float(np.mean([np.mean(s >= threshold) for s in scores]))


def test_the_threshold_keeps_the_house_averaged_rate_at_the_target_within_one_bin() -> None:
    data = houses(20, seed=0)
    total = summed(data)
    for target in (0.01, 0.02, 0.05):
        result = histograms.calibrate(total, target)
        strangers = [s for s, _ in data]
        let_in = house_averaged(strangers, result.threshold)
        assert let_in == pytest.approx(result.false_accept, abs=1e-9)
        assert let_in <= target
        # the lowest such edge: one bin lower lets more than the target in
        assert house_averaged(strangers, result.threshold - WIDTH) > target
        assert result.true_accept == pytest.approx(
            house_averaged([g for _, g in data], result.threshold), abs=1e-9
        )
        assert result.start_threshold == result.threshold
        assert result.start_true_accept == result.true_accept
    assert result.strangers == 20 * 60
    assert result.houses == pytest.approx(20)


def test_every_house_weighs_the_same_whatever_its_store_holds() -> None:
    """A house with 190 strangers all scoring 0.9 counts as one house of twenty (5 %), not
    as 14 % of the strangers: at a 10 % target the threshold stays well below 0.9, where
    pooling every stranger would have had to put it above."""
    data = houses(19, seed=1)
    loud = (np.full(190, 0.9), np.full(12, 0.9))
    result = histograms.calibrate(summed([*data, loud]), 0.10)
    strangers = [s for s, _ in [*data, loud]]
    assert house_averaged(strangers, result.threshold) <= 0.10
    pooled = np.concatenate(strangers)
    assert np.mean(pooled >= 0.9) > 0.10
    assert result.threshold < 0.8


def test_misnamed_residents_are_never_true_accepts() -> None:
    assert histograms.histogram([MISNAMED])[0] == 1.0
    data = [(np.full(60, 0.3), np.array([0.95, 0.95, MISNAMED, MISNAMED]))]
    result = histograms.calibrate(summed(data), 0.01)
    assert result.true_accept == pytest.approx(0.5)


def test_too_few_strangers_no_residents_or_a_wrong_sum_are_refused_saying_what() -> None:
    few = summed([(s[:10], g) for s, g in houses(3, seed=2)])  # 30 strangers in all
    with pytest.raises(RejectedMessage) as refused:
        histograms.calibrate(few, 0.01)
    assert refused.value.reason == "calibration_too_few_strangers"
    assert "hold 30 strangers" in refused.value.detail
    empty = summed([(np.zeros(0), g) for _, g in houses(3, seed=2)])
    with pytest.raises(RejectedMessage, match="hold 0 strangers"):
        histograms.calibrate(empty, 0.01)
    nobody = summed([(s, np.zeros(0)) for s, _ in houses(3, seed=2)])
    with pytest.raises(RejectedMessage) as refused:
        histograms.calibrate(nobody, 0.01)
    assert refused.value.reason == "calibration_no_residents"
    for bad in (np.zeros(VECTOR_SIZE + 1), np.full(VECTOR_SIZE, np.nan)):
        with pytest.raises(RejectedMessage) as refused:
            histograms.calibrate(bad, 0.01)
        assert refused.value.reason == "bad_calibration_sum"


def test_noisy_bins_keep_the_rate_at_or_below_the_target() -> None:
    """With privacy noise bins go negative and tails stop being monotone: each tail must
    clear the bar by twice its noise, so the noiseless rate stays within the target; noise
    larger than the tail it must measure is refused, saying what to do."""
    data = houses(200, seed=3)
    clean = summed(data)
    for seed in range(5):
        noisy = clean + np.random.default_rng(seed).normal(0, 0.05, clean.shape)
        result = histograms.calibrate(noisy, 0.02, noise_std=0.05)
        assert house_averaged([s for s, _ in data], result.threshold) <= 0.02
    loud = clean + np.random.default_rng(9).normal(0, 1.0, clean.shape)
    with pytest.raises(RejectedMessage) as refused:
        histograms.calibrate(loud, 0.02, noise_std=1.0)
    assert refused.value.reason == "calibration_too_noisy"
    assert "more doorbells a round" in refused.value.detail


def plan(survivors: int, noise_std: float = 0.0) -> SecAggPlan:
    return SecAggPlan(
        min_cohort=survivors,
        neighbours=survivors - 1,
        threshold=survivors // 2 + 1,
        scale=2.0**14,
        dimension=VECTOR_SIZE,
        size=VECTOR_SIZE,
        density=1.0,
        clip_norm=VECTOR_NORM,
        noise_std=noise_std,
    )


def test_a_sum_no_honest_houses_can_make_is_refused() -> None:
    """A compromised doorbell masking a histogram of mass 20 (its strangers counted twenty
    times, to drag the threshold its way) is caught by the sum's mass; honest sums, with
    noise, pass."""
    honest = summed(houses(5, seed=5))
    check_sum(honest, 5, plan(5))
    check_sum(honest + np.random.default_rng(6).normal(0, 0.05, VECTOR_SIZE), 5, plan(5, 0.05))
    hostile = honest.copy()
    hostile[: BINS // 2] += 20 / (BINS // 2)
    with pytest.raises(RejectedMessage) as refused:
        check_sum(hostile, 5, plan(5))
    assert refused.value.reason == "calibration_sum_out_of_bounds"
    assert "strangers histogram of 5 doorbells sums to 25" in refused.value.detail


def test_a_house_vector_is_within_the_calibration_clip_norm() -> None:
    worst = house(np.full(COUNT_CAP * 2, 0.5), np.full(3, 0.9))
    assert np.linalg.norm(worst) <= VECTOR_NORM + 1e-12
    assert worst.shape == (VECTOR_SIZE,)
