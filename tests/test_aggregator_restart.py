"""The aggregator service restarted mid-round: what was committed carries on.

Against a real Mosquitto and the real backbone, with the fake doorbells and
the watcher of tests/test_aggregator.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from tests.mqtt_helpers import wait_until
from tests.test_aggregator import (
    TOPICS,
    Configure,
    Devices,
    Watcher,
    _version,
    assert_weighted_mean,
    configure,
    control,
    devices,
    random_delta,
    received,
    running,
    watcher,
)

__all__ = ["configure", "devices", "watcher"]  # the fixtures, shared with test_aggregator


def test_restart_resumes_the_open_round(
    watcher: Watcher,
    devices: Devices,
    tmp_path: Path,
    configure: Configure,
) -> None:
    # The round starts weighing by examples; after the restart the config says houses, and
    # the open round keeps the weighting it started with (its running sum was built so).
    config = configure(weighting="examples")
    alice, bob = devices("alice", "bob")
    with running(config) as service:
        base = watcher.global_model(0)
        wait_until(lambda: len(service.coordinator.federation.online) == 2)
        control(alice, {"cmd": "start_round"})
        watcher.round(1, "train")
        delta_a, delta_b = random_delta(base, 1), random_delta(base, 2)
        alice.send(alice.update(base, delta_a, examples=5, round_id=1))
        wait_until(lambda: received(service) == ["alice"])

    with running(configure()) as service:
        wait_until(lambda: len(service.coordinator.federation.online) == 2)
        assert service.coordinator.federation.round is not None
        assert service.coordinator.federation.round.received == ["alice"]
        assert service.coordinator.federation.round.weighting == "examples"
        alice.send(alice.update(base, delta_a, examples=5, round_id=1))  # a replay
        bob.send(bob.update(base, delta_b, examples=3, round_id=1))
        new = watcher.global_model(1)
        assert_weighted_mean(new, base, [(delta_a, 5), (delta_b, 3)])
        metrics = watcher.metrics(1, "published")
        assert (metrics.participants, metrics.examples) == (2, 8)
        assert metrics.rejected == {"duplicate": 1}
        assert service.coordinator.federation.model.version == 1
    assert {_version(p) for p in watcher.messages(TOPICS.global_model)} == {0, 1}
    leftovers = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert not [name for name in leftovers if name.startswith("sum-")]


def test_restart_after_the_deadline_closes_the_round(
    watcher: Watcher,
    devices: Devices,
    configure: Configure,
) -> None:
    config = configure(timeout_s=2.0)
    alice, _bob = devices("alice", "bob")
    with running(config) as service:
        base = watcher.global_model(0)
        wait_until(lambda: len(service.coordinator.federation.online) == 2)
        control(alice, {"cmd": "start_round"})
        deadline = watcher.round(1, "train").deadline
        alice.send(alice.update(base, random_delta(base, 1), examples=5, round_id=1))
        wait_until(lambda: received(service) == ["alice"])
        service.stop()  # before the deadline: the round is still open on disk
    assert watcher.messages(TOPICS.metrics) == []
    time.sleep(max(0.0, deadline - time.time()) + 0.2)
    with running(config):
        assert watcher.global_model(1).version == 1  # quorum 1: aggregated on restart
        assert watcher.metrics(1, "published").participants == 1
