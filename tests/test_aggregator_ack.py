"""Manual acks: an update the aggregator accepted but had not persisted when it
crashed is redelivered by the broker and counted exactly once.

The aggregator runs as the real CLI (so SIGKILL is a real crash) with a
persist interval far longer than the test, so the accepted update is only in
memory and un-acked at the moment of the kill.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from broker.local import LocalBroker
from tests.federation import start_aggregator
from tests.test_aggregator import (
    SITE,
    TOPICS,
    FakeDevice,
    Watcher,
    assert_weighted_mean,
    control,
    random_delta,
)

STARTUP = 180.0
"""Seconds a CLI start may take on a loaded 2-core machine (TensorFlow, the backbone)."""


def _config(tmp_path: Path, port: int, cache_dir: Path) -> Path:
    path = tmp_path / "aggregator.yaml"
    path.write_text(
        json.dumps(
            {  # JSON is YAML
                "site": SITE,
                "state_dir": str(tmp_path / "state"),
                "cache_dir": str(cache_dir),
                "mqtt": {"port": port, "keepalive": 10},
                "rounds": {  # float32 both ways: the head is checked to 1e-6
                    "codec": "float32",
                    "downlink_codec": "float32",
                    "timeout_s": 120,
                    "auto_pause_s": 0,
                },
                "threads": 1,
                "persist_interval_s": 3600,
                "receive_maximum": 100,
            }
        )
    )
    return path


@contextmanager
def _aggregator(config: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as stderr:
        process = start_aggregator(config, stderr)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)


def _wait_for(
    condition: Callable[[], bool], what: str, timeout: float = 60.0, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"no {what} within {timeout}s\n{tail}")
        time.sleep(0.05)


def _count(log: Path, text: str) -> int:
    return log.read_text().count(text) if log.exists() else 0


@pytest.mark.timeout(900)  # two aggregator starts, each loading TensorFlow and the backbone
def test_update_lost_in_a_crash_is_redelivered_and_counted_once(
    broker: LocalBroker, tmp_path: Path, aggregator_cache: Path
) -> None:
    config = _config(tmp_path, broker.port, aggregator_cache)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    watcher = Watcher(broker.port)
    alice, bob = FakeDevice(broker.port, "alice"), FakeDevice(broker.port, "bob")
    try:
        with _aggregator(config, first_log) as first:
            # A start loads TensorFlow and the backbone before it publishes anything.
            watcher.wait_for(TOPICS.aggregator_status, lambda p: b'"online"' in p, timeout=STARTUP)
            base = watcher.global_model(0)
            _wait_for(lambda: _count(first_log, "device bob online") == 1, "bob online")
            _wait_for(lambda: _count(first_log, "device alice online") == 1, "alice online")
            control(alice, {"cmd": "start_round"})
            assert watcher.round(1, "train").selected == ("alice", "bob")
            delta_a, delta_b = random_delta(base, 1), random_delta(base, 2)
            alice.send(alice.update(base, delta_a, examples=3, round_id=1))
            _wait_for(
                lambda: _count(first_log, "accepted update from alice") == 1, "accepted update"
            )
            state = json.loads((tmp_path / "state" / "state.json").read_text())
            assert state["round"]["received"] == []  # in memory only, not acked
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)

        with _aggregator(config, second_log):
            # The broker redelivers the un-acked update to the persistent session.
            _wait_for(
                lambda: _count(second_log, "accepted update from alice") == 1,
                "redelivered update",
                timeout=STARTUP,
                log=second_log,
            )
            bob.send(bob.update(base, delta_b, examples=1, round_id=1))
            new = watcher.global_model(1)
            assert_weighted_mean(new, base, [(delta_a, 1), (delta_b, 1)])
            metrics = watcher.metrics(1, "published")
            assert (metrics.participants, metrics.examples) == (2, 4)
            assert metrics.rejected == {}
            assert _count(second_log, "accepted update from alice") == 1
    finally:
        for client in (alice, bob, watcher):
            client.close()
