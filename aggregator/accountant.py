"""The privacy budget of house-level DP: epsilon per round and in total, and a hard stop.

Each round is the Gaussian mechanism (noise multiplier sigma over the sum of
clipped house updates, fedbell.wire.dp) applied to a Poisson sample of the
houses (each house takes part with probability q = houses per round / houses);
R rounds compose. dp_accounting's RDP accountant turns that into epsilon at a
given delta (the caller passes delta = 1 / number of houses: a mechanism that
leaks one house outright with probability delta must not be likely to leak
anyone). Sampling houses for a round without replacement is close to Poisson
at these rates; the accountant's amplification assumes Poisson.

Only the aggregator imports this (dp-accounting is not installed on doorbells).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import dp_accounting  # type: ignore[import-untyped]
from dp_accounting.rdp import RdpAccountant  # type: ignore[import-untyped]

_MAX_NOISE_MULTIPLIER = 1000.0
RDP_ORDERS = (2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5, *range(5, 64), 128.0, 256.0, 512.0)
"""Renyi orders tried. dp_accounting's default also tries orders 1.1-1.9, whose series
fail to converge at sampling rates ~0.1 (it logs a warning for each and skips them);
they only matter when epsilon is already far above any budget worth setting."""


@lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float) -> float:
    """Epsilon after `rounds` Poisson-sampled Gaussian rounds; inf without noise.

    noise_multiplier 0 means no DP (epsilon = inf); 0 rounds cost nothing.
    """
    if noise_multiplier < 0 or not 0 <= sampling_rate <= 1 or rounds < 0 or not 0 < delta < 1:
        raise ValueError(
            f"noise_multiplier {noise_multiplier} >= 0, sampling_rate {sampling_rate} in "
            f"[0, 1], rounds {rounds} >= 0 and delta {delta} in (0, 1) required"
        )
    if rounds == 0 or sampling_rate == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        rounds,
    )
    return float(RdpAccountant(RDP_ORDERS).compose(event).get_epsilon(delta))


def noise_multiplier_for(
    target_epsilon: float, sampling_rate: float, rounds: int, delta: float
) -> float:
    """The smallest noise multiplier that keeps `rounds` rounds within target_epsilon.

    Bisection on epsilon (which falls as the noise grows) to 0.1 % of the
    answer; inf target: 0 (no noise needed).
    """
    if math.isinf(target_epsilon):
        return 0.0
    if not target_epsilon > 0:
        raise ValueError(f"target_epsilon {target_epsilon} must be positive")
    low, high = 0.0, 1.0
    while epsilon(high, sampling_rate, rounds, delta) > target_epsilon:
        low, high = high, high * 2
        if high > _MAX_NOISE_MULTIPLIER:
            raise ValueError(f"no noise multiplier <= {_MAX_NOISE_MULTIPLIER} reaches it")
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        if epsilon(middle, sampling_rate, rounds, delta) > target_epsilon:
            low = middle
        else:
            high = middle
    return high


@dataclass(frozen=True)
class Budget:
    """Epsilon spent by the rounds so far, and whether one more stays within `limit`.

    Frozen: `after_round()` returns the budget with one more round spent (the
    aggregator persists `rounds` with its state). limit inf: never refuses.
    """

    noise_multiplier: float
    sampling_rate: float
    delta: float
    limit: float = math.inf
    rounds: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 0 or not self.limit > 0:
            raise ValueError(f"rounds {self.rounds} >= 0 and limit {self.limit} > 0 required")
        epsilon(self.noise_multiplier, self.sampling_rate, 0, self.delta)  # checks the rest

    @property
    def spent(self) -> float:
        """Epsilon after `rounds` rounds."""
        return epsilon(self.noise_multiplier, self.sampling_rate, self.rounds, self.delta)

    def next_round_epsilon(self) -> float:
        return epsilon(self.noise_multiplier, self.sampling_rate, self.rounds + 1, self.delta)

    def allows_another_round(self) -> bool:
        """False once one more round would take epsilon past the limit."""
        return math.isinf(self.limit) or self.next_round_epsilon() <= self.limit

    def after_round(self) -> Budget:
        return replace(self, rounds=self.rounds + 1)
