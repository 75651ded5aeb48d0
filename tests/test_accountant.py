"""The aggregator's privacy accountant and budget (aggregator/accountant.py)."""

from __future__ import annotations

import math

import pytest

from aggregator.accountant import RDP_ORDERS, Budget, epsilon, noise_multiplier_for


def test_epsilon_of_unsampled_rounds_is_the_closed_form() -> None:
    # every house in every round (q = 1): R Gaussian releases have RDP R*a/(2 sigma^2) at
    # order a, and epsilon = min over a of rdp + log((a-1)/a) - (log delta + log a)/(a-1)
    sigma, rounds, delta = 2.0, 10, 1e-5
    closed = min(
        rounds * a / (2 * sigma**2)
        + math.log((a - 1) / a)
        - (math.log(delta) + math.log(a)) / (a - 1)
        for a in RDP_ORDERS
    )
    assert epsilon(sigma, 1.0, rounds, delta) == pytest.approx(closed, rel=1e-6)


def test_epsilon_is_within_the_published_dp_sgd_figure() -> None:
    # Abadi et al. 2016 (moments accountant): sigma 4, q 0.01, 10,000 steps -> (1.26, 1e-5);
    # RDP with the improved conversion is at least as tight, and amplification makes it
    # far below the unsampled composition
    sampled = epsilon(4.0, 0.01, 10_000, 1e-5)
    assert 0.5 < sampled <= 1.26
    assert sampled < epsilon(4.0, 1.0, 10_000, 1e-5) / 10


def test_epsilon_falls_with_noise_and_rises_with_rounds_and_sampling() -> None:
    base = epsilon(1.0, 0.1, 60, 1e-3)
    assert epsilon(2.0, 0.1, 60, 1e-3) < base
    assert epsilon(1.0, 0.1, 120, 1e-3) > base
    assert epsilon(1.0, 0.2, 60, 1e-3) > base
    assert epsilon(1.0, 0.1, 60, 1e-4) > base


def test_no_noise_is_no_privacy_and_no_round_costs_nothing() -> None:
    assert epsilon(0.0, 0.1, 1, 1e-3) == math.inf
    assert epsilon(1.0, 0.1, 0, 1e-3) == 0.0
    with pytest.raises(ValueError, match="delta"):
        epsilon(1.0, 0.1, 1, 0.0)


def test_noise_multiplier_for_reaches_the_target() -> None:
    sigma = noise_multiplier_for(4.0, 0.1, 60, 1e-3)
    assert epsilon(sigma, 0.1, 60, 1e-3) <= 4.0
    assert epsilon(sigma * 0.98, 0.1, 60, 1e-3) > 4.0  # and is about the smallest that does
    assert noise_multiplier_for(math.inf, 0.1, 60, 1e-3) == 0.0


def test_budget_refuses_the_round_that_would_pass_the_limit() -> None:
    budget = Budget(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-3, limit=2.0)
    assert budget.spent == 0.0
    rounds = 0
    while budget.allows_another_round():
        budget = budget.after_round()
        rounds += 1
        assert rounds < 1000
    assert rounds > 0
    assert budget.rounds == rounds
    assert budget.spent <= 2.0 < budget.next_round_epsilon()
    unlimited = Budget(noise_multiplier=0.0, sampling_rate=0.1, delta=1e-3)
    assert unlimited.allows_another_round()
    assert unlimited.after_round().spent == math.inf
    with pytest.raises(ValueError, match="limit"):
        Budget(noise_multiplier=1.0, sampling_rate=0.1, delta=1e-3, limit=0.0)
