"""The aggregator service against a real Mosquitto and the real backbone.

The aggregator runs in a thread of the test process (TensorFlow loads once);
one test runs the real CLI in a subprocess. Every aggregator shares one cache
folder (the `aggregator_cache` fixture), so dlib's backbone is converted once
per session. Fake doorbells are plain paho clients that publish retained
online statuses and real `build_update` envelopes whose deltas, of the
head's shape, are computed with numpy from the global model they received.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import START_HEAD_THRESHOLD, AggregatorConfig
from aggregator.service import AggregatorService
from broker.local import LocalBroker
from fedbell.faces.embedding import HEAD_NAMES
from fedbell.wire.backbone import assemble, parse_manifest
from fedbell.wire.codecs import Weights
from fedbell.wire.envelope import Codec
from fedbell.wire.messages import (
    GlobalModel,
    Signer,
    TfliteArtifact,
    build_update,
    parse_global,
)
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, RoundMetrics, to_json
from fedbell.wire.topics import Topics
from simulation.data import write_synthetic
from tests.mqtt_helpers import wait_until

SITE = "test"
TOPICS = Topics(SITE)
MAX_BYTES = 1024 * 1024
"""The backbone message is ~28 MB (float and int8 TFLite)."""
LINEAGE = re.compile(r"[0-9a-f]{16}")
"""A lineage as an aggregator starts one: secrets.token_hex(8)."""
REPO = Path(__file__).resolve().parents[1]


class Watcher:
    """Records every message under the site, retained or not, by topic."""

    def __init__(self, port: int, *topics: str) -> None:
        self._lock = threading.Lock()
        self._seen: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._record
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(topic, 1) for topic in topics or [f"{TOPICS.base}/#"]])

    def _record(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self._seen.append((message.topic, bytes(message.payload)))

    def messages(self, topic: str) -> list[bytes]:
        """Payloads seen on `topic`, oldest first."""
        with self._lock:
            return [payload for seen, payload in self._seen if seen == topic]

    def wait_for(
        self, topic: str, accept: Callable[[bytes], bool] = lambda _p: True, timeout: float = 20.0
    ) -> bytes:
        """The first payload on `topic` that `accept` likes (seen before or later)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for payload in self.messages(topic):
                if accept(payload):
                    return payload
            time.sleep(0.02)
        seen = [payload[:200] for payload in self.messages(topic)]
        raise AssertionError(f"nothing acceptable on {topic} within {timeout}s; saw {seen}")

    def round(self, round_id: int, phase: str) -> RoundAnnouncement:
        payload = self.wait_for(TOPICS.round, lambda p: _is_round(p, round_id, phase))
        return RoundAnnouncement.model_validate_json(payload)

    def backbone(self) -> TfliteArtifact:
        """The backbone as a doorbell gets it: the manifest, then every chunk it lists."""
        manifest = parse_manifest(
            self.wait_for(TOPICS.tflite_model), site=SITE, max_bytes=MAX_BYTES, keys=None
        )
        chunks = {
            index: self.wait_for(TOPICS.backbone_chunk(index))
            for index in range(len(manifest.chunks))
        }
        return assemble(manifest, chunks)

    def global_model(self, version: int) -> GlobalModel:
        payload = self.wait_for(TOPICS.global_model, lambda p: _version(p) == version)
        return parse_global(payload, site=SITE, max_bytes=MAX_BYTES, keys=None)

    def metrics(self, round_id: int, outcome: str) -> RoundMetrics:
        payload = self.wait_for(TOPICS.metrics, lambda p: _is_metrics(p, round_id, outcome))
        return RoundMetrics.model_validate_json(payload)

    def close(self) -> None:
        self.client.disconnect()  # first: it wakes the network loop, which then ends at once
        self.client.loop_stop()


def _is_round(payload: bytes, round_id: int, phase: str) -> bool:
    message = json.loads(payload)
    return bool(message["round"] == round_id and message["phase"] == phase)


def _is_metrics(payload: bytes, round_id: int, outcome: str) -> bool:
    message = json.loads(payload)
    return bool(message["round"] == round_id and message["outcome"] == outcome)


def _version(payload: bytes) -> int:
    return parse_global(payload, site=SITE, max_bytes=MAX_BYTES, keys=None).version


class FakeDevice:
    """A doorbell reduced to its MQTT behaviour: a status and updates."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.will_set(
            TOPICS.status(name), to_json(DeviceStatus(state="offline")), qos=1, retain=True
        )
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.publish(
            TOPICS.status(name), to_json(DeviceStatus(state="online", model_version=0)), retain=True
        )

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def send(self, payload: bytes) -> None:
        self.publish(TOPICS.update(self.name), payload)

    def update(
        self,
        base: GlobalModel,
        delta: Weights,
        *,
        examples: int,
        round_id: int,
        base_version: int | None = None,
        codec: Codec = "float32",
    ) -> bytes:
        return build_update(
            site=SITE,
            signer=Signer(self.name),
            round_id=round_id,
            base_version=base.version if base_version is None else base_version,
            num_examples=examples,
            names=base.names,
            delta=delta,
            codec=codec,
        )

    def close(self) -> None:
        self.client.disconnect()  # first: it wakes the network loop, which then ends at once
        self.client.loop_stop()


def random_delta(base: GlobalModel, seed: int, scale: float = 0.005) -> Weights:
    """A delta of norm ~0.9: under rounds.clip_norm (1.0), so averages are exact."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=w.shape) * scale).astype(np.float32) for w in base.weights]


def weighted(base: GlobalModel, parts: list[tuple[Weights, int]]) -> Weights:
    """The base plus the mean of the deltas by their weights (1 per house: rounds.weighting's
    default)."""
    total = sum(n for _, n in parts)
    return [
        b + sum(d[i].astype(np.float64) * n for d, n in parts) / total
        for i, b in enumerate(base.weights)
    ]


def assert_weighted_mean(
    new: GlobalModel,
    base: GlobalModel,
    parts: list[tuple[Weights, int]],
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """The published head is the base plus the weighted mean of the (delta, weight) parts."""
    for got, expected in zip(new.weights, weighted(base, parts), strict=True):
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=atol)


def make_config(
    tmp_path: Path,
    port: int,
    cache_dir: Path,
    evaluation: Path | None = None,
    strangers: Path | None = None,
    **rounds: Any,
) -> AggregatorConfig:
    """An aggregator on the test broker; `cache_dir` is the session's `aggregator_cache`.

    Generated faces are found by Haar only, so the evaluation uses it.
    """
    return AggregatorConfig.model_validate(
        {
            "site": SITE,
            "state_dir": str(tmp_path / "state"),
            "cache_dir": str(cache_dir),
            "mqtt": {"port": port, "keepalive": 10},
            # float32 both ways: these tests check the weighted mean to 1e-6 (the default
            # int8 downlink is checked in test_aggregator_rounds.py)
            "rounds": {
                "codec": "float32",
                "downlink_codec": "float32",
                "timeout_s": 30,
                "auto_pause_s": 0,
                # secure rounds without DP: noise that protects a test's few houses drowns
                # their updates and the exact sums the tests check (a DP test passes privacy)
                "privacy": {"epsilon_budget": None},
                **rounds,
            },
            "evaluation": {
                "dataset": str(evaluation) if evaluation else None,
                "strangers": str(strangers) if strangers else None,
                "detector": "haar",
            },
            "threads": 1,
        }
    )


@contextmanager
def running(config: AggregatorConfig) -> Iterator[AggregatorService]:
    service = AggregatorService(config)
    thread = threading.Thread(target=service.run, name="aggregator", daemon=True)
    thread.start()
    try:
        yield service
    finally:
        service.stop()
        thread.join(30)
        assert not thread.is_alive()


def received(service: AggregatorService) -> list[str]:
    """The doorbells whose updates the round accepted so far ([] before the first round)."""
    current = service.coordinator.federation.round
    return [] if current is None else current.received


def control(device: FakeDevice, command: dict[str, Any] | str) -> None:
    payload = command if isinstance(command, str) else json.dumps(command)
    device.publish(TOPICS.control, payload.encode())


Configure = Callable[..., AggregatorConfig]
"""`make_config` for this test's broker and folder and the session's cache."""
Devices = Callable[..., list[FakeDevice]]
"""Fake doorbells, by name, closed after the test."""


@pytest.fixture
def configure(broker: LocalBroker, tmp_path: Path, aggregator_cache: Path) -> Configure:
    return functools.partial(make_config, tmp_path, broker.port, aggregator_cache)


@pytest.fixture
def watcher(broker: LocalBroker) -> Iterator[Watcher]:
    watching = Watcher(broker.port)
    yield watching
    watching.close()


@pytest.fixture
def devices(broker: LocalBroker) -> Iterator[Devices]:
    made: list[FakeDevice] = []

    def make(*names: str) -> list[FakeDevice]:
        made.extend(FakeDevice(broker.port, name) for name in names)
        return made[-len(names) :]

    yield make
    for device in made:
        device.close()


def test_round_publishes_weighted_average_and_rejects_bad_updates(
    broker: LocalBroker,
    watcher: Watcher,
    devices: Devices,
    tmp_path: Path,
    configure: Configure,
) -> None:
    write_synthetic(tmp_path / "heldout", persons=3, photos=3, seed=0)  # Haar finds them all
    config = configure(evaluation=tmp_path / "heldout")
    alice, bob, eve = devices("alice", "bob", "eve")
    with running(config) as service:
        base = watcher.global_model(0)
        assert base.names == HEAD_NAMES
        assert [w.shape for w in base.weights] == [(256, 128)]  # dlib's features -> embedding
        assert LINEAGE.fullmatch(base.lineage)
        assert -1.0 <= base.threshold <= 1.0
        backbone = watcher.backbone()
        assert (backbone.version, backbone.lineage) == (0, base.lineage)
        assert backbone.float_model[4:8] == b"TFL3"
        assert backbone.int8_model[4:8] == b"TFL3"
        assert hashlib.sha256(backbone.float_model).hexdigest() == base.backbone
        wait_until(lambda: {"alice", "bob", "eve"} <= set(service.coordinator.federation.online))
        eve.publish(TOPICS.status("eve"), b"")  # eve leaves: not selected
        wait_until(lambda: "eve" not in service.coordinator.federation.online)

        control(alice, {"cmd": "start_round"})
        announced = watcher.round(1, "train")
        assert announced.selected == ("alice", "bob")
        assert announced.base_version == 0
        assert announced.send_when_trained
        assert announced.deadline > time.time()

        delta_a, delta_b = random_delta(base, 1), random_delta(base, 2)
        bad_shapes = [w.T.copy() for w in random_delta(base, 3)]  # (128, 256): not the head
        nan_delta = random_delta(base, 4)
        nan_delta[0][0, 0] = np.nan
        alice.send(alice.update(base, delta_a, examples=3, round_id=2))
        alice.send(alice.update(base, delta_a, examples=3, round_id=1, base_version=7))
        alice.send(alice.update(base, bad_shapes, examples=3, round_id=1, base_version=0))
        alice.send(alice.update(base, nan_delta, examples=3, round_id=1))
        alice.send(alice.update(base, delta_a, examples=3, round_id=1, codec="float16"))
        alice.send(alice.update(base, [d * 1e6 for d in delta_a], examples=3, round_id=1))
        alice.send(alice.update(base, delta_a, examples=3, round_id=1))
        alice.send(alice.update(base, delta_a, examples=3, round_id=1))  # a replay
        eve.send(eve.update(base, delta_a, examples=5, round_id=1))
        bob.send(alice.update(base, delta_b, examples=1, round_id=1))  # alice's name on bob's topic
        control(alice, "{not json")
        control(alice, {"cmd": "publish"})  # nothing aggregated
        wait_until(lambda: sum(service.coordinator.federation.rejected.values()) >= 11)
        bob.send(bob.update(base, delta_b, examples=1, round_id=1))

        new = watcher.global_model(1)
        # 3 examples claimed against 1: every house weighs the same all the same
        assert_weighted_mean(new, base, [(delta_a, 1), (delta_b, 1)])
        assert new.round == 1
        assert (new.lineage, new.backbone, new.names) == (base.lineage, base.backbone, HEAD_NAMES)
        assert -1.0 <= new.threshold <= 1.0

        metrics = watcher.metrics(1, "published")
        assert metrics.version == 1
        assert metrics.participants == 2
        assert metrics.examples == 4
        assert metrics.accuracy is not None
        assert 0.0 <= metrics.accuracy <= 1.0
        assert metrics.threshold == new.threshold
        assert metrics.bytes_up > 0
        # Two selected doorbells, each sent the new head (not the backbone) and the round.
        head_bytes = len(watcher.messages(TOPICS.global_model)[-1])
        assert 2 * head_bytes < metrics.bytes_down < 2 * head_bytes + 20_000
        assert metrics.rejected == {
            "wrong_round": 1,
            "wrong_base": 1,
            "bad_shapes": 1,
            "not_finite": 1,
            "wrong_codec": 1,
            "norm_too_large": 1,
            "duplicate": 1,
            "not_selected": 1,
            "wrong_sender": 1,
            "bad_json": 1,
            "bad_state": 1,
        }
        closed = watcher.round(1, "closed")
        assert closed.selected == ("alice", "bob")
        assert closed.lineage == base.lineage
        # The backbone went out once, at version 0: a round publishes only the head.
        assert len(watcher.messages(TOPICS.tflite_model)) == 1

    status = DeviceStatus.model_validate_json(
        watcher.wait_for(TOPICS.aggregator_status, lambda p: b"offline" in p)
    )
    assert status.model_version == 1

    # Everything a late-joining node needs is retained.
    late = Watcher(broker.port)
    try:
        assert late.global_model(1).version == 1
        assert late.round(1, "closed").round == 1
        assert late.metrics(1, "published").version == 1
    finally:
        late.close()


def test_deadline_closes_with_quorum_else_abandons(
    watcher: Watcher,
    devices: Devices,
    configure: Configure,
) -> None:
    config = configure(timeout_s=1.5, min_updates=2)
    alice, bob, _carol = devices("alice", "bob", "carol")
    with running(config) as service:
        base = watcher.global_model(0)
        wait_until(lambda: len(service.coordinator.federation.online) == 3)
        control(alice, {"cmd": "start_round"})
        assert watcher.round(1, "train").selected == ("alice", "bob", "carol")
        delta_a, delta_b = random_delta(base, 1), random_delta(base, 2)
        alice.send(alice.update(base, delta_a, examples=2, round_id=1))
        bob.send(bob.update(base, delta_b, examples=6, round_id=1))
        new = watcher.global_model(1)  # carol never answers: the deadline closes it
        assert_weighted_mean(new, base, [(delta_a, 1), (delta_b, 1)])
        assert watcher.metrics(1, "published").participants == 2

        control(alice, {"cmd": "start_round", "devices": ["alice", "bob"]})
        assert watcher.round(2, "train").selected == ("alice", "bob")
        alice.send(alice.update(new, random_delta(new, 3), examples=2, round_id=2))
        metrics = watcher.metrics(2, "abandoned")
        assert metrics.participants == 1
        assert metrics.version == 0
        watcher.round(2, "abandoned")
        bob.send(bob.update(new, random_delta(new, 4), examples=2, round_id=2))  # too late
        wait_until(lambda: service.coordinator.federation.rejected["no_round"] == 1)
        assert service.coordinator.federation.model.version == 1
    assert [_version(p) for p in watcher.messages(TOPICS.global_model)] == [0, 1]


def test_step_by_step_train_send_aggregate_publish(
    watcher: Watcher,
    devices: Devices,
    configure: Configure,
) -> None:
    config = configure(codec="int8", min_updates=2)
    alice, bob = devices("alice", "bob")
    with running(config) as service:
        base = watcher.global_model(0)
        wait_until(lambda: len(service.coordinator.federation.online) == 2)
        control(alice, {"cmd": "send"})  # no round yet
        wait_until(lambda: service.coordinator.federation.rejected["bad_state"] == 1)

        control(alice, {"cmd": "train"})
        training = watcher.round(1, "train")
        assert not training.send_when_trained
        assert training.codec == "int8"
        control(alice, {"cmd": "send"})
        sending = watcher.round(1, "send")
        assert sending.deadline >= training.deadline

        delta_a, delta_b = random_delta(base, 1), random_delta(base, 2)
        alice.send(alice.update(base, delta_a, examples=4, round_id=1, codec="int8"))
        control(alice, {"cmd": "aggregate"})  # one update, quorum two: refused
        wait_until(lambda: service.coordinator.federation.rejected["below_quorum"] == 1)
        bob.send(bob.update(base, delta_b, examples=4, round_id=1, codec="int8"))
        wait_until(lambda: len(received(service)) == 2)
        time.sleep(0.3)
        assert watcher.messages(TOPICS.metrics) == []  # a step round waits for the operator

        control(alice, {"cmd": "aggregate"})
        pending = watcher.metrics(1, "aggregated")
        assert pending.version == 1
        assert pending.participants == 2
        assert [_version(p) for p in watcher.messages(TOPICS.global_model)] == [0]

        control(alice, {"cmd": "publish"})
        new = watcher.global_model(1)
        # int8: within half a step (peak/127, peak ~0.05) of the exact mean.
        assert_weighted_mean(new, base, [(delta_a, 1), (delta_b, 1)], rtol=1e-7, atol=1e-3)
        assert watcher.metrics(1, "published").version == 1
        watcher.round(1, "closed")


def test_a_site_that_must_calibrate_publishes_no_uncalibrated_head(  # noqa: PLR0917 - fixtures
    broker: LocalBroker,
    watcher: Watcher,
    devices: Devices,
    tmp_path: Path,
    aggregator_cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 18 item 1: a site provisioned for real use (`evaluation.require_calibration`,
    what deploy/templates/aggregator.yaml sets) without stranger photos or an evaluation set
    used to publish version 0 with the fixed 0.75, which lets every never-seen stranger in,
    and every trained version unchecked. Now version 0 ships the threshold measured safe for
    dlib's own head (START_HEAD_THRESHOLD) and a trained version is not published: the
    round is abandoned, counted and explained."""
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
