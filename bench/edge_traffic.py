"""The federation's traffic as the benchmarked doorbell sees it, and its reported status.

A client of its own on the broker subscribes to what the doorbell subscribes
to (its secure-round inbox too), plus its updates, its secure-round messages,
status and visitor events, and timestamps each message: bytes per round are
those payloads, counted outside the doorbell.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.edge_setup import DEVICE, SITE
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, RoundMetrics
from fedbell.wire.topics import SECAGG_LEAVES, SecAggLeaf, Topics, doorbell_topic


@dataclass
class Observer:
    """Subscribes to what the doorbell subscribes to (and its updates and status)."""

    port: int
    topics: Topics = field(default_factory=lambda: Topics(SITE))
    received: list[tuple[float, str, int]] = field(default_factory=list)
    updates: queue.Queue[tuple[float, bytes]] = field(default_factory=queue.Queue)
    statuses: queue.Queue[tuple[float, DeviceStatus]] = field(default_factory=queue.Queue)
    metrics: queue.Queue[RoundMetrics] = field(default_factory=queue.Queue)
    announcements: queue.Queue[tuple[float, RoundAnnouncement]] = field(default_factory=queue.Queue)
    secagg: queue.Queue[tuple[float, SecAggLeaf, int]] = field(default_factory=queue.Queue)
    """The doorbell's secure-round messages: when seen, which, how many bytes."""
    visitors: list[str] = field(default_factory=list)
    """Who the doorbell's visitor events named, in order (Home Assistant's view)."""

    def __post_init__(self) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.port, keepalive=60)
        self.client.loop_start()
        t = self.topics
        self.down_topics = (
            t.round,
            t.global_model,
            t.tflite_model,
            t.backbone_chunks,
            t.secagg_inbox(DEVICE),
        )
        self.secagg_topics = {t.secagg(leaf, DEVICE): leaf for leaf in SECAGG_LEAVES}
        result, _ = self.client.subscribe(
            [(topic, 1) for topic in (*self.down_topics, *self.secagg_topics)]
            + [(t.update(DEVICE), 1), (t.status(DEVICE), 1), (t.metrics, 1)]
            + [(doorbell_topic(DEVICE, "visitor"), 1)]
        )
        assert result == mqtt.MQTT_ERR_SUCCESS

    def _on_message(self, _client: Any, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        payload = bytes(message.payload)
        t = self.topics
        if any(mqtt.topic_matches_sub(down, message.topic) for down in self.down_topics):
            # Chunks are counted under their filter: bytes_down names filters.
            topic = (
                t.backbone_chunks
                if message.topic.startswith(t.backbone_chunks[:-1])
                else message.topic
            )
            self.received.append((now, topic, len(payload)))
        if not payload:
            return
        if message.topic == t.update(DEVICE):
            self.updates.put((now, payload))
        elif (leaf := self.secagg_topics.get(message.topic)) is not None:
            self.secagg.put((now, leaf, len(payload)))
        elif message.topic == t.status(DEVICE):
            self.statuses.put((now, DeviceStatus.model_validate_json(payload)))
        elif message.topic == t.metrics:
            self.metrics.put(RoundMetrics.model_validate_json(payload))
        elif message.topic == doorbell_topic(DEVICE, "visitor"):
            self.visitors.append(str(json.loads(payload).get("person")))
        elif message.topic == t.round:
            self.announcements.put((now, RoundAnnouncement.model_validate_json(payload)))

    def command(self, payload: dict[str, Any]) -> None:
        info = self.client.publish(self.topics.control, json.dumps(payload), qos=1)
        info.wait_for_publish(5)

    def start_round(self, phase: str) -> tuple[float, RoundAnnouncement]:
        """Ask for a round and wait for its `phase` announcement selecting the doorbell:
        (when it was seen, the announcement)."""
        self.command({"cmd": "start_round"})
        while True:
            seen, announcement = self.announcements.get(timeout=120)
            if announcement.phase == phase and DEVICE in announcement.selected:
                return seen, announcement

    def bytes_down(self, start: float, end: float, topics: Sequence[str]) -> int:
        return sum(
            size for t, topic, size in list(self.received) if start <= t < end and topic in topics
        )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_status(
    observer: Observer, what: str, ok: Callable[[DeviceStatus], bool], timeout: float
) -> tuple[float, DeviceStatus]:
    deadline = time.monotonic() + timeout
    last: DeviceStatus | None = None
    while time.monotonic() < deadline:
        try:
            seen, status = observer.statuses.get(timeout=0.5)
        except queue.Empty:
            continue
        last = status
        if ok(status):
            return seen, status
    raise TimeoutError(f"doorbell never reported {what} within {timeout:.0f}s (last: {last})")
