"""A house hub (Mosquitto) bridged to the federation tier (three NATS nodes), real processes.

Only the site's federation topics cross, each in a doorbell's direction:
`doorbell/...` and Home Assistant's topics stay in the house.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from broker.cluster import AGGREGATOR_LOGIN, OBSERVER_LOGIN, ClusterTier
from broker.cluster_hub import HubBroker
from broker.local import LocalBroker
from deploy.tier import bridge_topics
from fedbell.wire import house_inboxes
from tests.mqtt_helpers import Probe
from tests.test_cluster import SITE, TierClient, pytestmark

__all__ = ["pytestmark"]  # skipped without nats-server, like tests/test_cluster.py

BASE = f"fedbell/{SITE}"


@pytest.fixture(scope="module")
def tier_and_hub(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[ClusterTier, HubBroker]]:
    folder = tmp_path_factory.mktemp("hub")
    with (
        ClusterTier(folder / "tier", SITE, hubs=["house1"]) as tier,
        HubBroker(folder / "hub", tier, "house1") as hub,
    ):
        yield tier, hub


def wait_for_bridge(hub: LocalBroker, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hub.log_path.exists() and "Connecting bridge" in hub.log_path.read_text():
            time.sleep(1.0)  # the bridge's subscriptions, after its CONNACK
            return
        time.sleep(0.1)
    raise AssertionError("the bridge never connected")


def test_the_bridge_carries_only_the_sites_federation_topics() -> None:
    lines = bridge_topics(BASE, "house1")
    assert f"topic {BASE}/update/+ out 1" in lines
    assert f'topic {BASE}/model/global in 0 _tier/ ""' in lines
    assert f'topic {BASE}/secagg/inboxes/house1/+ in 0 _tier/ ""' in lines
    # the key advert: `topic + out 1 <prefix in the house> <prefix on the tier>`
    adverts = f"topic + out 1 {BASE}/secagg/keys/ {BASE}/secagg/keys/house1/"
    assert adverts in lines
    others = [line.split()[1] for line in lines if line != adverts]
    assert all(topic.startswith(f"{BASE}/") for topic in others)
    assert not [topic for topic in others if "/secagg/inbox/" in topic or "keys" in topic]


def test_a_hub_is_sent_its_own_houses_inboxes_only(
    tier_and_hub: tuple[ClusterTier, HubBroker],
) -> None:
    """A doorbell's key advert crosses under its house; the aggregator's bundle of that
    house's inboxes reaches each doorbell on its own inbox topic; another house's bundle,
    and an earlier round's, never reach it."""
    tier, hub = tier_and_hub
    wait_for_bridge(hub)
    (_, first), *_ = tier.mqtt_endpoints
    aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), first, "aggregator-5")
    doorbell = Probe(hub.port, f"{BASE}/secagg/inbox/+", client_id="cam4")
    try:
        aggregator.subscribe(f"{BASE}/secagg/keys/+/+")
        doorbell.publish(f"{BASE}/secagg/keys/cam4", b"advert")
        advert = aggregator.wait_for(f"{BASE}/secagg/keys/+/+")
        assert advert is not None
        assert advert.topic == f"{BASE}/secagg/keys/house1/cam4"
        elsewhere = house_inboxes.pack(7, [("cam9", b"not for house1")])[0]
        aggregator.publish(f"{BASE}/secagg/inboxes/house2/0", elsewhere, retain=True)
        mine = house_inboxes.pack(7, [("cam4", b"inbox 4"), ("cam5", b"inbox 5")])[0]
        aggregator.publish(f"{BASE}/secagg/inboxes/house1/0", mine, retain=True)
        earlier = house_inboxes.pack(6, [("cam4", b"round 6")])[0]
        aggregator.publish(f"{BASE}/secagg/inboxes/house1/1", earlier, retain=True)
        received = [doorbell.wait_for(f"{BASE}/secagg/inbox/+", timeout=10) for _ in range(2)]
        assert {(m.topic, m.payload) for m in received} == {
            (f"{BASE}/secagg/inbox/cam4", b"inbox 4"),
            (f"{BASE}/secagg/inbox/cam5", b"inbox 5"),
        }
        time.sleep(1.0)  # house2's and round 6's would have arrived by now
        assert doorbell.messages.empty()
    finally:
        aggregator.close()
        doorbell.close()


def test_doorbell_traffic_stays_home_and_updates_and_models_cross(
    tier_and_hub: tuple[ClusterTier, HubBroker],
) -> None:
    tier, hub = tier_and_hub
    wait_for_bridge(hub)
    (_, first), (_, second), (_, third) = tier.mqtt_endpoints
    observer = TierClient(tier.login(OBSERVER_LOGIN), first, "observer")
    aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), second, "aggregator")
    house = Probe(hub.port, f"{BASE}/model/global", client_id="cam1")
    try:
        observer.subscribe("#")
        aggregator.subscribe(f"{BASE}/update/+")
        house.publish("doorbell/cam1/visitor", b"alice at the door")
        house.publish("homeassistant/device/cam1/config", b"{}")
        house.publish(f"{BASE}/update/cam1", b"update-1")

        update = aggregator.wait_for(f"{BASE}/update/+")
        assert update is not None
        assert update.payload == b"update-1"

        model = TierClient(tier.login(AGGREGATOR_LOGIN), third, "aggregator-2")
        model.publish(f"{BASE}/model/global", b"model-v2", retain=True)
        model.close()
        received = house.wait_for(f"{BASE}/model/global")
        assert received.payload == b"model-v2"

        time.sleep(1.0)  # anything that would leak has had time to arrive
        seen = []
        while not observer.messages.empty():
            seen.append(observer.messages.get().topic)
        assert f"{BASE}/update/cam1" in seen
        # NATS shows its own JetStream and session traffic ($JS/..., $MQTT/...) to `#`.
        applications = [topic for topic in seen if not topic.startswith("$")]
        assert not [topic for topic in applications if not topic.startswith(f"{BASE}/")]
    finally:
        observer.close()
        aggregator.close()
        house.close()


def test_a_late_doorbell_gets_the_model_retained_at_the_hub(
    tier_and_hub: tuple[ClusterTier, HubBroker],
) -> None:
    tier, hub = tier_and_hub
    wait_for_bridge(hub)
    (_, first), *_ = tier.mqtt_endpoints
    aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), first, "aggregator-3")
    aggregator.publish(f"{BASE}/model/global", b"model-v3", retain=True)
    aggregator.close()
    time.sleep(1.0)  # across the bridge while no doorbell listens
    late = Probe(hub.port, f"{BASE}/model/global", client_id="cam2")
    try:
        assert late.wait_for(f"{BASE}/model/global", timeout=10).payload == b"model-v3"
    finally:
        late.close()


def test_the_hub_passes_on_what_the_tier_sends_again_only_if_it_changed(
    tier_and_hub: tuple[ClusterTier, HubBroker],
) -> None:
    """A bridge that reconnects is sent every retained message again, the 28 MB backbone
    included: the hub's doorbells get each message once, and every change."""
    tier, hub = tier_and_hub
    wait_for_bridge(hub)
    (_, first), *_ = tier.mqtt_endpoints
    topic = f"{BASE}/round"
    doorbell = Probe(hub.port, topic, client_id="cam3")
    aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), first, "aggregator-4")
    try:
        for payload in (b"round-7", b"round-7", b"round-8"):
            aggregator.publish(topic, payload, retain=True)
        received = [doorbell.wait_for(topic, timeout=10).payload for _ in range(2)]
        assert received == [b"round-7", b"round-8"]
        time.sleep(1.0)  # a second round-7 would have arrived by now
        assert doorbell.messages.empty()
    finally:
        aggregator.close()
        doorbell.close()
