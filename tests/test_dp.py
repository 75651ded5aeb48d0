"""Clipping and distributed Gaussian noise on the doorbell (fedbell/wire/dp.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedbell.wire.dp import clip, noise_std_per_doorbell, privatize


def test_clip_bounds_the_norm_and_reports_the_original() -> None:
    vector = np.full(100, 1.0, np.float32)  # norm 10
    clipped, norm = clip(vector, 2.0)
    assert norm == pytest.approx(10.0)
    assert float(np.linalg.norm(clipped)) <= 2.0
    assert float(np.linalg.norm(clipped)) == pytest.approx(2.0, rel=1e-5)
    assert np.allclose(clipped / np.linalg.norm(clipped), vector / 10.0)  # same direction
    small, small_norm = clip(vector * 0.01, 2.0)
    assert np.array_equal(small, vector * 0.01)
    assert small_norm == pytest.approx(0.1)


def test_clip_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="positive"):
        clip(np.ones(3, np.float32), 0.0)
    with pytest.raises(ValueError, match="NaN"):
        clip(np.array([np.nan], np.float32), 1.0)


def test_privatize_without_noise_is_clipping_alone() -> None:
    rng = np.random.default_rng(0)
    vector = np.random.default_rng(1).normal(size=500).astype(np.float32) * 10
    assert np.array_equal(privatize(vector, 1.0, 0.0, rng), clip(vector, 1.0)[0])


def test_privatize_adds_noise_of_the_asked_variance_around_the_clipped_vector() -> None:
    rng = np.random.default_rng(2)
    vector = np.random.default_rng(3).normal(size=50_000).astype(np.float32)
    clipped, _ = clip(vector, 1.0)
    noisy = privatize(vector, 1.0, 0.5, rng)
    assert noisy.dtype == np.float32
    noise = noisy.astype(np.float64) - clipped
    # 50,000 draws: the sample std of N(0, 0.5^2) is within ~0.0016 of 0.5, the mean ~0.0022
    assert abs(noise.std() - 0.5) < 0.02
    assert abs(noise.mean()) < 0.02


def test_noise_per_doorbell_sums_to_sigma_c_at_min_cohort() -> None:
    sigma, clip_norm, min_cohort = 1.2, 0.5, 16
    each = noise_std_per_doorbell(sigma, clip_norm, min_cohort)
    assert each == pytest.approx(sigma * clip_norm / 4)
    assert math.sqrt(min_cohort) * each == pytest.approx(sigma * clip_norm)
    assert math.sqrt(3 * min_cohort) * each > sigma * clip_norm  # more survivors: more noise
    assert noise_std_per_doorbell(0.0, 1.0, 5) == 0.0
    with pytest.raises(ValueError, match="min_cohort"):
        noise_std_per_doorbell(1.0, 1.0, 0)


def test_sum_of_privatized_updates_carries_sigma_c() -> None:
    rng = np.random.default_rng(4)
    sigma, clip_norm, cohort = 1.0, 1.0, 25
    each = noise_std_per_doorbell(sigma, clip_norm, cohort)
    zero = np.zeros(20_000, np.float32)
    total = sum(privatize(zero, clip_norm, each, rng).astype(np.float64) for _ in range(cohort))
    assert abs(float(np.std(total)) - sigma * clip_norm) < 0.05
