"""Issue 18 item 1: an aggregator that must calibrate but has nothing to calibrate on.

A site provisioned for real use (`evaluation.require_calibration`, what
deploy/templates/aggregator.yaml sets) without stranger photos or an evaluation
set used to publish version 0 with the fixed 0.75, which lets every never-seen
stranger in, and every trained version unchecked. Now version 0 ships the
threshold measured safe for dlib's own head (START_HEAD_THRESHOLD) and a trained
version is not published: the round is abandoned, counted and explained.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.config import START_HEAD_THRESHOLD, AggregatorConfig
from broker.local import LocalBroker
from tests.test_aggregator import (
    TOPICS,
    FakeDevice,
    Watcher,
    _version,
    control,
    devices,  # noqa: F401 - fixture
    make_config,
    random_delta,
    running,
    watcher,  # noqa: F401 - fixture
)


def test_a_site_that_must_calibrate_publishes_no_uncalibrated_head(  # noqa: PLR0917 - fixtures
    broker: LocalBroker,
    watcher: Watcher,  # noqa: F811 - fixture
    devices: Callable[..., list[FakeDevice]],  # noqa: F811 - fixture
    tmp_path: Path,
    aggregator_cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_config(tmp_path, broker.port, aggregator_cache).model_dump(mode="json")
    settings["evaluation"]["require_calibration"] = True
    config = AggregatorConfig.model_validate(settings)
    alice, bob = devices("alice", "bob")
    with running(config), caplog.at_level(logging.WARNING, logger="aggregator"):
        base = watcher.global_model(0)
        assert base.threshold == pytest.approx(START_HEAD_THRESHOLD)  # not 0.75
        control(alice, {"cmd": "start_round"})
        watcher.round(1, "train")
        for seed, device in enumerate((alice, bob)):
            device.send(device.update(base, random_delta(base, seed), examples=5, round_id=1))
        metrics = watcher.metrics(1, "abandoned")
        assert metrics.rejected == {"uncalibrated": 1}
        watcher.round(1, "abandoned")
    published = [_version(payload) for payload in watcher.messages(TOPICS.global_model)]
    assert set(published) == {0}
    lines = [r.getMessage() for r in caplog.records if "no calibrated" in r.getMessage()]
    assert len(lines) == 1
    assert "evaluation.strangers" in lines[0]
