"""Robust strategies and server optimisers wired into the coordinator (fake clock, no broker).

Each test runs whole rounds through `Coordinator` as the service would, and
checks the published model against the pure functions of aggregator/robust.py.
Restarts mid-round show that buffered deltas and optimiser moments are state.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from aggregator.accumulator import Buffered, Streaming
from aggregator.config import DEFAULT_CLIP_NORM, RoundSettings
from aggregator.export import Exporter
from aggregator.robust import clip_by_norm, global_norm
from aggregator.state import StateError
from tests.test_aggregator_rounds import Harness, exporter

__all__ = ["exporter"]  # the module-scoped fixture: one exporter for these tests too

BASE_SCALE = 0.01


def start(tmp_path: Path, exporter: Exporter, **rounds: Any) -> Harness:
    # The attackers' updates must reach the strategy, not be refused as absurd first.
    # Exact expected steps: no clipping unless the test asks for it.
    return Harness(tmp_path, exporter, max_update_norm=1e6, **{"clip_norm": None, **rounds})


def weights_of(harness: Harness) -> list[np.ndarray]:
    return [w.astype(np.float64) for w in harness.coordinator.federation.model.weights]


def run_round(harness: Harness, scales: dict[str, float], examples: int = 2) -> None:
    harness.online(*scales)
    harness.command(cmd="start_round")
    round_id = harness.coordinator.federation.last_round
    for device, scale in scales.items():
        harness.update(device, round_id, examples=examples, scale=scale)


def assert_moved_by(
    before: list[np.ndarray], harness: Harness, step: Sequence[float | np.ndarray]
) -> None:
    """Every tensor moved by its step: a per-coordinate constant (the test deltas are flat)
    or a whole tensor."""
    for old, new, expected in zip(before, weights_of(harness), step, strict=True):
        np.testing.assert_allclose(new - old, expected, rtol=1e-4, atol=1e-6)


def test_clipped_fedavg_scales_each_update_down_before_averaging(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = start(tmp_path, exporter, strategy="clipped", clip_norm=0.5)
    before = weights_of(harness)
    run_round(harness, {"a": BASE_SCALE, "b": 5.0})  # b's update is huge (norm >> 0.5)
    assert harness.versions() == [0, 1]
    shapes = [w.shape for w in before]
    clipped = [
        clip_by_norm([np.full(s, scale, np.float32) for s in shapes], 0.5)
        for scale in (BASE_SCALE, 5.0)
    ]
    assert global_norm(clipped[1]) == pytest.approx(0.5, rel=1e-4)
    mean = [(a.astype(np.float64) + b) / 2 for a, b in zip(*clipped, strict=True)]
    assert_moved_by(before, harness, mean)


def test_median_ignores_one_outlier_and_survives_a_restart_mid_round(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = start(tmp_path, exporter, strategy="median", max_devices=3)
    before = weights_of(harness)
    harness.online("a", "b", "c")
    harness.command(cmd="start_round")
    harness.update("a", 1, scale=0.01)
    harness.update("b", 1, scale=-3.0)  # the attacker
    current = harness.coordinator.federation.round
    assert current is not None
    assert isinstance(current.accumulator, Buffered)
    assert current.accumulator.count == 2

    restarted = harness.restart(tmp_path)  # the buffered deltas come from disk
    resumed = restarted.coordinator.federation.round
    assert resumed is not None
    assert isinstance(resumed.accumulator, Buffered)
    assert resumed.accumulator.count == 2
    assert resumed.received == ["a", "b"]
    restarted.update("c", 1, scale=0.03)
    assert restarted.versions() == [0, 1]  # the republished v0, then the median
    assert_moved_by(before, restarted, [0.01] * len(before))  # median of (0.01, -3, 0.03)


def test_trimmed_mean_drops_the_extremes_of_each_coordinate(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = start(tmp_path, exporter, strategy="trimmed_mean", trim_fraction=0.2, max_devices=5)
    before = weights_of(harness)
    run_round(harness, {"a": -4.0, "b": 0.01, "c": 0.02, "d": 0.03, "e": 9.0})
    assert harness.versions() == [0, 1]
    assert_moved_by(before, harness, [0.02] * len(before))  # mean of 0.01, 0.02, 0.03


def test_buffered_strategies_need_max_devices_and_clipping_a_norm() -> None:
    for strategy in ("median", "trimmed_mean"):
        with pytest.raises(ValidationError, match="needs max_devices"):
            RoundSettings(strategy=strategy, codec="float32")
    with pytest.raises(ValidationError, match="needs clip_norm"):
        RoundSettings(strategy="clipped", clip_norm=None)
    with pytest.raises(ValidationError, match=r"less than 0\.5"):
        RoundSettings(strategy="trimmed_mean", max_devices=4, trim_fraction=0.5)
    assert RoundSettings(server_optimizer="fedadam").server_lr == 0.01
    assert RoundSettings(server_optimizer="fedavgm").server_lr == 1.0


def test_fedavg_default_streams(tmp_path: Path, exporter: Exporter) -> None:
    harness = Harness(tmp_path, exporter)
    harness.online("a")
    harness.command(cmd="start_round")
    current = harness.coordinator.federation.round
    assert current is not None
    assert isinstance(current.accumulator, Streaming)
    assert current.accumulator.clip_norm == DEFAULT_CLIP_NORM  # clipping is on by default


def test_fedavgm_momentum_is_saved_with_the_model(tmp_path: Path, exporter: Exporter) -> None:
    harness = start(tmp_path, exporter, server_optimizer="fedavgm", server_momentum=0.5)
    first = weights_of(harness)
    run_round(harness, {"a": 0.02})
    assert_moved_by(first, harness, [0.02] * len(first))  # step 1: the mean delta

    restarted = harness.restart(tmp_path)  # moments come back from disk
    assert restarted.coordinator.federation.model.optimizer is not None
    assert restarted.coordinator.federation.model.optimizer.steps == 1
    second = weights_of(restarted)
    run_round(restarted, {"a": 0.02})
    assert_moved_by(second, restarted, [0.03] * len(second))  # 0.5 * 0.02 + 0.02


def test_an_unpublished_step_is_not_applied_twice_after_a_restart(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = start(tmp_path, exporter, server_optimizer="fedadam", server_learning_rate=0.001)
    before = weights_of(harness)
    harness.online("a")
    harness.command(cmd="train")
    harness.command(cmd="send")
    harness.update("a", 1, scale=0.5)
    harness.command(cmd="aggregate")

    restarted = harness.restart(tmp_path)
    restarted.command(cmd="publish")
    optimizer = restarted.coordinator.federation.model.optimizer
    assert optimizer is not None
    assert optimizer.steps == 1
    # Adam's first step: lr * (0.1 d) / (sqrt(0.01 d^2) + eps), the same sign as d.
    expected = 0.001 * 0.05 / (np.sqrt(0.01 * 0.25) + 1e-3)
    assert_moved_by(before, restarted, [expected] * len(before))


def test_multi_krum_drops_the_outlier_and_names_it_in_the_metrics(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = start(tmp_path, exporter, strategy="multi_krum", byzantine=1, max_devices=5)
    first = weights_of(harness)
    run_round(harness, {"a": 0.010, "b": 0.011, "c": 0.012, "d": 0.013, "e": -0.5})
    assert_moved_by(first, harness, [0.0115] * len(first))  # the mean of a, b, c, d
    assert harness.metrics()[-1].dropped == ["e"]


def test_changing_the_strategy_mid_round_is_a_clear_error(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = start(tmp_path, exporter)
    harness.online("a", "b")
    harness.command(cmd="start_round")
    harness.update("a", 1)
    with pytest.raises(StateError, match="started with strategy fedavg"):
        start(tmp_path, exporter, strategy="median", max_devices=2)
    assert start(tmp_path, exporter).coordinator.federation.round is not None  # fedavg resumes it
