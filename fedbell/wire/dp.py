"""House-level differential privacy on the doorbell: clip the update, add Gaussian noise.

DP-FedAvg with distributed noise. Each doorbell clips its whole update to L2 norm
C (one house changes the round's sum by at most C: the sensitivity) and adds
Gaussian noise of standard deviation sigma * C / sqrt(m) per coordinate, m being
the fewest survivors the round may unmask (the plan's min_cohort: the aggregator
sets it to the cohort less the dropouts it tolerates, see
aggregator.secure_rounds.secagg_plan). Noise of independent doorbells adds up in
variance, so the sum of any m or more survivors carries at least sigma * C: the
Gaussian mechanism with noise multiplier sigma, which aggregator/accountant.py
turns into epsilon. The aggregator never sees a noiseless sum and no doorbell has
to trust another's noise (secure aggregation shows only the sum, so the
per-doorbell noise need not protect one update alone). A round whose survivors
fall below m would carry less noise, but such a round fails closed anyway
(fedbell.wire.secagg refuses to unmask it), so the guarantee never rests on
fewer than m noises.

The doorbell and the privacy benchmark both call `privatize`; nothing else adds
noise. Clip what is actually sent (the round's shared subset), because that is
what enters the sum.
"""

from __future__ import annotations

import math

import numpy as np


def clip(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float]:
    """(the vector scaled down to L2 norm <= clip_norm, its original norm).

    A vector already within the bound is returned unchanged (float32).
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm {clip_norm} must be positive")
    flat = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(flat.astype(np.float64)))
    if not math.isfinite(norm):
        raise ValueError("cannot clip a vector holding NaN or infinity")
    if norm <= clip_norm:
        return flat.copy(), norm
    # float32 rounding may leave the result a hair above the bound; aim just inside
    factor = clip_norm / norm * (1 - 1e-6)
    return (flat.astype(np.float64) * factor).astype(np.float32), norm


def noise_std_per_doorbell(noise_multiplier: float, clip_norm: float, min_cohort: int) -> float:
    """sigma * C / sqrt(min_cohort): each doorbell's share of the round's noise.

    Any m >= min_cohort survivors sum to noise of std sigma * C * sqrt(m /
    min_cohort) >= sigma * C, the calibrated amount; below min_cohort the round
    is never unmasked (see the module docstring). noise_multiplier 0: no DP.
    """
    if noise_multiplier < 0 or not clip_norm > 0 or min_cohort < 1:
        raise ValueError(
            f"noise_multiplier {noise_multiplier} >= 0, clip_norm {clip_norm} > 0 and "
            f"min_cohort {min_cohort} >= 1 required"
        )
    return noise_multiplier * clip_norm / math.sqrt(min_cohort)


def privatize(
    vector: np.ndarray, clip_norm: float, noise_std: float, rng: np.random.Generator
) -> np.ndarray:
    """Clip to L2 norm clip_norm, then add N(0, noise_std^2) to every coordinate (float32)."""
    if noise_std < 0:
        raise ValueError(f"noise_std {noise_std} must be >= 0")
    clipped, _ = clip(vector, clip_norm)
    if noise_std == 0:
        return clipped
    noise = rng.normal(0.0, noise_std, size=clipped.shape)
    return (clipped.astype(np.float64) + noise).astype(np.float32)
