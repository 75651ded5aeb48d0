"""Robust aggregation strategies and server optimisers."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.robust import (
    ServerOptimizer,
    clip_by_norm,
    coordinate_median,
    global_norm,
    trimmed_mean,
)


def honest(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(1.0, 0.1, size=(4, 3)).astype(np.float32),
        rng.normal(1.0, 0.1, size=(3,)).astype(np.float32),
    ]


def test_clipping_bounds_the_norm_and_keeps_direction() -> None:
    delta = [np.full((10,), 3.0, np.float32)]
    clipped = clip_by_norm(delta, 1.0)
    assert global_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped[0] / clipped[0][0], 1.0)
    assert clip_by_norm(delta, 100.0)[0] == pytest.approx(delta[0])


@pytest.mark.parametrize("attack", [lambda d: [-10 * a for a in d], lambda d: [10 * a for a in d]])
def test_median_and_trimmed_mean_resist_a_minority_of_attackers(attack: object) -> None:
    updates = [honest(s) for s in range(8)] + [attack(honest(s)) for s in (8, 9)]  # type: ignore[operator]
    for robust in (coordinate_median(updates), trimmed_mean(updates, 0.2)):
        for tensor in robust:
            assert np.all(np.abs(tensor - 1.0) < 0.3)
    plain = [np.mean(np.stack([u[i] for u in updates]), axis=0) for i in range(2)]
    assert np.any(np.abs(plain[0] - 1.0) > 0.3)


def test_trimmed_mean_without_trimming_is_the_mean() -> None:
    updates = [honest(s) for s in range(5)]
    np.testing.assert_allclose(
        trimmed_mean(updates, 0.0)[0], np.mean([u[0] for u in updates], axis=0), rtol=1e-6
    )
    with pytest.raises(ValueError, match="trim fraction"):
        trimmed_mean(updates, 0.5)


def test_fedavgm_without_momentum_is_plain_fedavg_and_with_it_accumulates() -> None:
    delta = [np.ones((2,), np.float32)]
    plain = ServerOptimizer("fedavgm", learning_rate=1.0, momentum=0.0)
    assert plain.step(delta)[0] == pytest.approx([1.0, 1.0])
    heavy = ServerOptimizer("fedavgm", learning_rate=1.0, momentum=0.5)
    heavy.step(delta)
    assert heavy.step(delta)[0] == pytest.approx([1.5, 1.5])


def test_fedadam_moves_along_the_pseudo_gradient() -> None:
    opt = ServerOptimizer("fedadam", learning_rate=0.01)
    step = opt.step([np.array([0.5, -0.5], np.float32)])
    assert step[0][0] > 0 > step[0][1]
    with pytest.raises(ValueError, match="unknown server optimiser"):
        ServerOptimizer("sgd").step([np.zeros(1, np.float32)])
