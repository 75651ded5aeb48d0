"""A small synchronous MQTT client for tests: subscribe, wait for messages, publish."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.config import EdgeConfig
from edge.recognition_config import CameraConfig
from fedbell.config import MqttSettings
from fedbell.wire.backbone import BackboneMessages
from fedbell.wire.topics import Topics


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> None:
    """Poll `condition` until it holds; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not met within {timeout}s: {what or condition}")
        time.sleep(0.02)


def doorbell_config(port: int, folder: Path, camera: CameraConfig | None = None) -> EdgeConfig:
    """Doorbell door1 of site home on the test broker, its state and gallery under `folder`
    (no camera unless one is given)."""
    return EdgeConfig(
        device_id="door1",
        site="home",
        mqtt=MqttSettings(port=port, keepalive=5),
        state_dir=folder / "state",
        gallery_dir=folder / "gallery",
        camera=camera or CameraConfig(enabled=False),
    )


class Probe:
    """Connects to a test broker and records every message it receives."""

    def __init__(self, port: int, *topics: str, client_id: str = "") -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def publish_backbone(self, topics: Topics, messages: BackboneMessages) -> None:
        """A backbone as the aggregator publishes it: the manifest, then its chunks, retained."""
        for topic, payload in messages.publications(topics):
            self.publish(topic, payload, retain=True)

    def wait_for(self, topic: str, timeout: float = 30.0) -> mqtt.MQTTMessage:
        """The next message on `topic` (others are dropped), or AssertionError."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.messages.get(timeout=left)
            except queue.Empty:
                break
            if mqtt.topic_matches_sub(topic, msg.topic):
                return msg
        raise AssertionError(f"no message on {topic} within {timeout}s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
