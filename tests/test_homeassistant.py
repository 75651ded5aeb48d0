"""Home Assistant device discovery: payload shape and republishing when HA restarts."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.gallery import Gallery
from edge.homeassistant import DoorbellTopics, discovery_payload
from tests.mqtt_helpers import Probe

STATUS = "fedbell/home/status/door1"


def test_device_based_discovery_payload() -> None:
    topics = DoorbellTopics("door1")
    payload = discovery_payload(topics, STATUS, "Front door", snapshot=True)
    assert topics.discovery == "homeassistant/device/door1/config"
    assert payload["dev"]["ids"] == ["fedbell_door1"]
    assert payload["dev"]["name"] == "Front door"
    assert payload["o"]["name"] == "fedbell"
    components = payload["cmps"]
    platforms = {key: c["p"] for key, c in components.items()}
    assert platforms == {
        "door1_ring": "event",
        "door1_visitor": "event",
        "door1_present": "binary_sensor",
        "door1_ring_button": "button",
        "door1_snapshot": "image",
    }
    for component in components.values():
        assert component["unique_id"].startswith("door1_")
        assert component["availability"] == [
            {
                "topic": STATUS,
                "value_template": "{{ value_json.state }}",
                "payload_available": "online",
                "payload_not_available": "offline",
            }
        ]
    assert components["door1_ring"]["state_topic"] == "doorbell/door1/ring"
    assert components["door1_ring"]["event_types"] == ["ring"]
    assert components["door1_visitor"]["event_types"] == ["known", "unknown"]
    assert components["door1_present"]["state_topic"] == "doorbell/door1/present"
    assert components["door1_snapshot"]["image_topic"] == "doorbell/door1/snapshot"
    assert components["door1_ring_button"]["command_topic"] == "doorbell/door1/command"
    assert json.loads(components["door1_ring_button"]["payload_press"]) == {"cmd": "ring"}
    assert "door1_snapshot" not in discovery_payload(topics, STATUS)["cmps"]  # opt-in


def test_a_doorbell_topic_root_moves_every_event_and_command() -> None:
    topics = DoorbellTopics("door2", root="bell")
    leaves = [topics.visitor, topics.ring, topics.present, topics.snapshot]
    assert leaves == [
        "bell/door2/visitor",
        "bell/door2/ring",
        "bell/door2/present",
        "bell/door2/snapshot",
    ]
    assert (topics.command, topics.label) == ("bell/door2/command", "bell/door2/label")


@pytest.mark.parametrize("bad", ["door/1", "door+", "", "a b"])
def test_device_id_must_be_a_topic_segment(bad: str) -> None:
    with pytest.raises(ValueError, match="device id"):
        DoorbellTopics(bad)


def test_discovery_republished_when_home_assistant_comes_online(
    broker: LocalBroker, tmp_path: Path
) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="door1", protocol=mqtt.MQTTv5)
    publisher = EventPublisher(
        client, DoorbellTopics("door1"), STATUS, RecentCrops(), Gallery(tmp_path)
    )
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    publisher.attach()
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    client.subscribe(publisher.subscriptions())
    assert subscribed.wait(5), "the broker did not acknowledge the subscriptions"
    # The race (issue 13 item 13): a probe that subscribed before the broker had
    # the discovery message got a live copy, not the retained one. Wait for the
    # broker's PUBACK (it has stored the message) before anyone subscribes.
    info = publisher.announce()
    assert info is not None, "announce() must return its publish, to be waited for"
    info.wait_for_publish(5)
    assert info.is_published()
    probe = Probe(broker.port, "homeassistant/device/+/config")
    try:
        first = probe.wait_for("homeassistant/device/door1/config", 5)
        assert first.retain
        probe.publish("homeassistant/status", "online")
        again = probe.wait_for("homeassistant/device/door1/config", 5)
        assert not again.retain  # a live copy, delivered because HA asked
        assert json.loads(again.payload) == json.loads(first.payload)
        client.disconnect()
    finally:
        client.loop_stop()
    probe.close()


def test_a_doorbell_without_a_camera_still_announces_itself(
    broker: LocalBroker, tmp_path: Path
) -> None:
    """The demo's doorbells train without a camera (its live replay runs beside them):
    `python -m edge` announces them to Home Assistant like any doorbell."""
    from tests.federation import node_process

    gallery = tmp_path / "gallery"
    gallery.mkdir()
    door = node_process(tmp_path, broker.port, "door3", gallery)  # camera.enabled false
    probe = Probe(broker.port, "homeassistant/device/+/config")
    try:
        door.start()
        probe.wait_for("homeassistant/device/door3/config", 60)
        late = Probe(broker.port, "homeassistant/device/+/config")  # Home Assistant, later
        found = late.wait_for("homeassistant/device/door3/config", 5)
        late.close()
        assert found.retain
        payload = json.loads(found.payload)
        assert payload["dev"]["ids"] == ["fedbell_door3"]
        availability = payload["cmps"]["door3_visitor"]["availability"][0]
        assert availability["topic"] == "fedbell/test/status/door3"  # its own last will
    finally:
        probe.close()
        door.stop()
