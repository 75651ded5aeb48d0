"""The federation tier (broker/cluster.py): three real NATS nodes speaking MQTT 3.1.1 over TLS."""

from __future__ import annotations

import queue
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.cluster import AGGREGATOR_LOGIN, ClusterTier, TierLogin
from deploy.tier import hub_rules, subject

pytestmark = pytest.mark.skipif(
    shutil.which("nats-server") is None and not Path("/usr/sbin/nats-server").exists(),
    reason="nats-server is not installed (apt-get install nats-server)",
)

SITE = "fed"


class TierClient:
    """A synchronous MQTT 3.1.1 client of one tier login on one node."""

    def __init__(self, login: TierLogin, port: int, client_id: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self.client.username_pw_set(login.name, login.password())
        self.client.tls_set(
            ca_certs=str(login.ca_file), certfile=str(login.cert_file), keyfile=str(login.key_file)
        )
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def subscribe(self, topic: str) -> None:
        """Subscribe and wait for the SUBACK: NATS creates a JetStream consumer first."""
        acked = threading.Event()
        self.client.on_subscribe = lambda *_args: acked.set()
        self.client.subscribe(topic, qos=1)
        assert acked.wait(10), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def wait_for(self, topic: str, timeout: float = 30.0) -> mqtt.MQTTMessage | None:
        try:
            while True:
                msg = self.messages.get(timeout=timeout)
                if mqtt.topic_matches_sub(topic, msg.topic):
                    return msg
        except queue.Empty:
            return None

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTier]:
    with ClusterTier(tmp_path_factory.mktemp("tier"), SITE, hubs=["house1"]) as running:
        yield running


def test_hub_permissions_are_the_doorbells_federation_topics() -> None:
    base = f"fedbell/{SITE}"
    allowed = hub_rules(base, "house1")
    assert ("write", f"{base}/update/+") in allowed
    assert ("read", f"{base}/model/global") in allowed
    # its own house's key adverts and inboxes, no other's
    assert ("write", f"{base}/secagg/keys/house1/+") in allowed
    assert ("read", f"{base}/secagg/inboxes/house1/+") in allowed
    assert not [topic for _, topic in allowed if topic.endswith(("keys/+", "inbox/+"))]
    assert all(topic.startswith(base) for _, topic in allowed)  # no doorbell/, no homeassistant/
    assert subject(f"{base}/model/tflite/+") == "fedbell.fed.model.tflite.*"


def test_the_hubs_start_at_different_nodes(tmp_path: Path) -> None:
    """A lost node moves a third of the bridges, not all of them (issue 23)."""
    houses = ["a", "b", "c", "d"]
    tier = ClusterTier(tmp_path, SITE, hubs=houses)  # not started: ports only
    nodes = tier.mqtt_endpoints
    firsts = [tier.endpoints_for(house)[0] for house in houses]
    assert firsts == [nodes[0], nodes[1], nodes[2], nodes[0]]
    assert all(sorted(tier.endpoints_for(house)) == sorted(nodes) for house in houses)


def test_a_retained_model_published_on_one_node_is_served_by_another(tier: ClusterTier) -> None:
    (_, first), *_, (_, last) = tier.mqtt_endpoints
    aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), first, "agg-retain")
    aggregator.publish(f"fedbell/{SITE}/model/global", b"model-v1", retain=True)
    hub = TierClient(tier.login(tier.hub_login("house1")), last, "hub-retain")
    try:
        hub.subscribe(f"fedbell/{SITE}/model/global")
        msg = hub.wait_for(f"fedbell/{SITE}/model/global")
        assert msg is not None
        assert msg.payload == b"model-v1"
        assert msg.retain
    finally:
        aggregator.close()
        hub.close()


def test_a_hub_login_cannot_publish_outside_its_federation_topics(tier: ClusterTier) -> None:
    (_, first), *_, (_, last) = tier.mqtt_endpoints
    hub = TierClient(tier.login(tier.hub_login("house1")), first, "hub-perm")
    aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), last, "agg-perm")
    try:
        aggregator.subscribe(f"fedbell/{SITE}/update/+")
        hub.publish(f"fedbell/{SITE}/model/global", b"forged", retain=True)  # not a hub's to write
        hub.publish(f"fedbell/{SITE}/update/cam1", b"update")
        msg = aggregator.wait_for(f"fedbell/{SITE}/update/+")
        assert msg is not None
        assert msg.payload == b"update"
    finally:
        hub.close()
        aggregator.close()
    late = TierClient(tier.login(tier.hub_login("house1")), last, "hub-perm-late")
    try:
        late.subscribe(f"fedbell/{SITE}/model/global")
        msg = late.wait_for(f"fedbell/{SITE}/model/global", timeout=5)
        assert msg is None or msg.payload != b"forged"
    finally:
        late.close()
