"""Robust aggregation strategies and server optimisers."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import Weighting
from aggregator.robust import (
    ServerOptimizer,
    clip_by_norm,
    coordinate_median,
    global_norm,
    multi_krum,
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


def test_multi_krum_drops_scaled_and_sign_flipped_updates_and_weights_the_rest() -> None:
    honest_updates = [honest(s) for s in range(8)]
    attackers = [[-10 * a for a in honest(8)], [-1 * a for a in honest(9)]]
    examples = [1, 1, 1, 1, 1, 1, 1, 9, 5, 5]
    result = multi_krum([*honest_updates, *attackers], examples, byzantine=2)
    assert result.dropped == (False,) * 8 + (True, True)
    weights = np.array(examples[:8], dtype=np.float64) / sum(examples[:8])
    for index, tensor in enumerate(result.delta):
        expected = np.tensordot(weights, np.stack([u[index] for u in honest_updates]), axes=1)
        np.testing.assert_allclose(tensor, expected, rtol=1e-5)


def test_multi_krum_with_too_few_updates_falls_back_to_the_median() -> None:
    updates = [honest(s) for s in range(3)]
    for got, want in zip(
        multi_krum(updates, [1, 1, 1], byzantine=1).delta, coordinate_median(updates), strict=True
    ):
        np.testing.assert_allclose(got, want)


@pytest.mark.parametrize(("weighting", "totals"), [("houses", (2, 5)), ("examples", (9, 18))])
def test_buffered_round_keeps_its_weights_across_a_restart(
    weighting: Weighting, totals: tuple[int, int]
) -> None:
    from aggregator.accumulator import make_accumulator, restore
    from aggregator.config import RoundSettings

    settings = RoundSettings(
        strategy="multi_krum", codec="float32", max_devices=8, byzantine=1, weighting=weighting
    )
    shapes = [(4, 3), (3,)]
    first = make_accumulator(settings, shapes, sparse=False)
    for seed, examples in ((0, 2), (1, 7)):
        first.add(honest(seed), examples)
    assert first.total == totals[0]
    resumed = restore(settings, shapes, first.arrays(), total=totals[0], count=2, sparse=False)
    for accumulator in (first, resumed):
        for seed in (2, 3, 4):
            accumulator.add(honest(seed), 3)
    assert resumed.total == first.total == totals[1]
    for got, want in zip(resumed.aggregate().delta, first.aggregate().delta, strict=True):
        np.testing.assert_allclose(got, want)
