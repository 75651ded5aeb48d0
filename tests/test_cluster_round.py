"""A round across houses on the clustered tier, with a node SIGKILLed in the middle.

Real processes: three NATS nodes (broker/cluster.py), two house hubs
(Mosquitto bridged to the tier, broker/cluster_hub.py), the real aggregator
service on the tier over MQTT 3.1.1 with failover (fedbell/tier.py); doorbells
reduced to their MQTT behaviour, each on its house's hub over MQTT 5.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from broker.cluster import AGGREGATOR_LOGIN, ClusterTier
from broker.cluster_hub import HubBroker
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import GlobalModel, Signer, build_update, parse_global
from fedbell.wire.protocol import DeviceStatus, to_json
from fedbell.wire.topics import Topics
from tests.test_cluster import pytestmark

__all__ = ["pytestmark"]  # skipped without nats-server, like tests/test_cluster.py

SITE = "fed"
TOPICS = Topics(SITE)
HOUSES = {"house1": ["a1", "a2", "a3"], "house2": ["b1", "b2", "b3"]}
MAX_BYTES = 1024 * 1024


class Doorbell:
    """A doorbell's MQTT behaviour on its house's hub: a status, the model, the round, updates."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.models: dict[int, GlobalModel] = {}
        self.rounds: list[dict[str, object]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.on_message = self._record
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(TOPICS.global_model, 1), (TOPICS.round, 1)])
        status = to_json(DeviceStatus(state="online", model_version=0))
        self.client.publish(TOPICS.status(name), status, qos=1, retain=True).wait_for_publish(5)

    def _record(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == TOPICS.global_model:
            model = parse_global(bytes(message.payload), site=SITE, max_bytes=MAX_BYTES, keys=None)
            self.models[model.version] = model
        else:
            self.rounds.append(json.loads(message.payload))

    def send_update(self, base: GlobalModel, delta: Weights, examples: int) -> None:
        payload = build_update(
            site=SITE,
            signer=Signer(self.name),
            round_id=1,
            base_version=base.version,
            num_examples=examples,
            names=base.names,
            delta=delta,
            codec="float32",
        )
        self.client.publish(TOPICS.update(self.name), payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(condition: object, timeout: float, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def aggregator_config(tmp_path: Path, tier: ClusterTier, cache_dir: Path) -> AggregatorConfig:
    """The aggregator on the tier: node 1 first, then the others (fedbell/tier.py)."""
    base = AggregatorConfig.model_validate(
        {
            "site": SITE,
            "state_dir": str(tmp_path / "state"),
            "cache_dir": str(cache_dir),
            "rounds": {
                "codec": "float32",
                "downlink_codec": "float32",
                "timeout_s": 90,
                "min_updates": sum(map(len, HOUSES.values())),
                "auto_pause_s": 0,
            },
            "auto_rounds": 1,
            "evaluation": {"detector": "haar"},
            "threads": 1,
        }
    )
    on_tier = tier.mqtt_settings(AGGREGATOR_LOGIN, keepalive=5)
    return base.model_copy(update={"mqtt": on_tier})


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[ClusterTier, dict[str, HubBroker]]]:
    with ExitStack() as stack:
        tier = stack.enter_context(ClusterTier(tmp_path / "tier", SITE, hubs=list(HOUSES)))
        hubs = {
            house: stack.enter_context(HubBroker(tmp_path / house, tier, house)) for house in HOUSES
        }
        yield tier, hubs


def test_a_round_survives_a_node_killed_mid_round_and_counts_each_update_once(
    federation: tuple[ClusterTier, dict[str, HubBroker]],
    tmp_path: Path,
    aggregator_cache: Path,
) -> None:
    tier, hubs = federation
    doorbells = [
        Doorbell(hubs[house].port, name) for house, names in HOUSES.items() for name in names
    ]
    service = AggregatorService(aggregator_config(tmp_path, tier, aggregator_cache))
    thread = threading.Thread(target=service.run, name="aggregator", daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: all(d.rounds and d.rounds[-1].get("phase") == "train" for d in doorbells),
            60,
            "every doorbell, in both houses, sees round 1 announced",
        )
        wait_until(lambda: all(0 in d.models for d in doorbells), 30, "the base model")
        base = doorbells[0].models[0]
        rng = np.random.default_rng(0)
        deltas = [
            [(rng.normal(size=w.shape) * 0.005).astype(np.float32) for w in base.weights]
            for _ in doorbells
        ]
        examples = [1 + index for index in range(len(doorbells))]

        half = len(doorbells) // 2
        for doorbell, delta, count in zip(doorbells[:half], deltas, examples, strict=False):
            doorbell.send_update(base, delta, count)
        # Node 1 holds the aggregator's connection (its first address) and house1's
        # bridge (the hubs are spread over the nodes, ClusterTier.endpoints_for):
        # lose it while updates are on their way.
        tier.kill_node(0)
        for doorbell, delta, count in zip(
            doorbells[half:], deltas[half:], examples[half:], strict=True
        ):
            doorbell.send_update(base, delta, count)

        wait_until(
            lambda: all(1 in d.models for d in doorbells), 120, "the new model in both houses"
        )
        # Every house weighs the same (rounds.weighting houses), whatever count it claims:
        # an update counted twice would still move the mean.
        expected = [
            b + sum(d[i].astype(np.float64) for d in deltas) / len(deltas)
            for i, b in enumerate(base.weights)
        ]
        for doorbell in doorbells:
            for got, want in zip(doorbell.models[1].weights, expected, strict=True):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        # Whatever the failover redelivered was refused, not counted: as a
        # duplicate while the round was open, as `no_round` once it had closed.
        assert set(service.coordinator.federation.rejected) <= {"duplicate", "no_round"}
    finally:
        service.stop()
        thread.join(30)
        for doorbell in doorbells:
            doorbell.close()
    assert not thread.is_alive()
