"""Doorbell events and state on MQTT, Home Assistant style.

Events (visitor, ring, snapshot) are published non-retained: they happened
once, and Home Assistant ignores retained events. State (presence,
discovery) is retained so a subscriber that arrives later
sees the current value.

The publisher uses a paho-mqtt 2.x client owned by the node: it adds
per-topic callbacks (`message_callback_add`) so it does not take over the
node's own `on_message`, and lists the topics the node must subscribe to.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt
from pydantic import BaseModel, ConfigDict, Field

from edge.feedback import FeedbackError, RecentCrops, apply_label
from edge.gallery import Gallery
from edge.homeassistant import (
    ONLINE,
    PRESENT_OFF,
    PRESENT_ON,
    DoorbellTopics,
    discovery_payload,
)
from fedbell.errors import RejectedMessage
from fedbell.faces.images import Box
from fedbell.wire import safejson

log = logging.getLogger(__name__)

EVENT_QOS = 1
SNAPSHOT_MAX_BYTES = 1000 * 1024
"""Under the broker's 1 MiB message_size_limit, with room for the topic."""

Callback = Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]


ISO_TIME = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$"
"""UTC ISO-8601 with a Z, as `now_iso` writes it (and Home Assistant reads it)."""


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DoorbellEvent(BaseModel):
    """What every doorbell event carries. The console reads events through the JSON
    schema of these models (console/static/messages.js, `python -m console.schema`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str = Field(description="Names the event in a label command.")
    time: str = Field(
        pattern=ISO_TIME,
        json_schema_extra={"format": "date-time"},
        description="When it happened: UTC ISO-8601, e.g. 2026-12-06T05:12:30.458Z.",
    )


class VisitorEvent(DoorbellEvent):
    """`doorbell/<device>/visitor`: one visit's decision."""

    event_type: Literal["known", "unknown"]
    person: str = Field(description='The enrolled person, or "unknown".')
    confidence: float = Field(description="Cosine similarity to the nearest enrolled person.")
    box: list[int] | None = Field(description="x, y, width, height of the face in the frame.")


class RingEvent(DoorbellEvent):
    """`doorbell/<device>/ring`: the bell rang (button, command or a face at the door)."""

    event_type: Literal["ring"]
    source: str = Field(description="button, command or face.")
    person: str | None = Field(description="Who stood at the door, if a face rang it.")


def new_event_id() -> str:
    return uuid.uuid4().hex


@dataclass
class EventCounters:
    """What the publisher did since it started (shown by tests and benchmarks)."""

    published: int = 0
    """Messages handed to paho: events, state, discovery and snapshots."""
    commands: int = 0
    """Command messages received, valid or not."""
    rejected: int = 0
    """Commands and labels refused, and messages whose handler failed."""
    labels: int = 0
    """Labels applied to the gallery."""


@dataclass
class EventPublisher:
    """Publishes a doorbell's events and state; handles its commands."""

    client: mqtt.Client
    topics: DoorbellTopics
    availability_topic: str
    """The node's retained status topic (its last will): Home Assistant's availability."""
    crops: RecentCrops
    gallery: Gallery
    device_name: str | None = None
    discovery: bool = True
    snapshots: bool = False
    snapshot_quality: int = 80
    on_ring_command: Callable[[], None] | None = None
    on_labelled: Callable[[], object] | None = None
    """Called after a label added a chip to the gallery: recognition uses it at once."""
    on_named: Callable[[str], object] | None = None
    """Called with the event id of a visitor a label named (the stranger store forgets it)."""
    counters: EventCounters = field(default_factory=EventCounters)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _queueing: bool = False

    # --- wiring -----------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[str, int]]:
        """Topics the node subscribes to (again after each reconnect)."""
        topics = [(self.topics.command, 1), (self.topics.label, 1)]
        if self.discovery:
            topics.append((self.topics.ha_status, 1))
        return topics

    def attach(self) -> None:
        """Route this doorbell's command, label and HA-status messages here.

        Each handler runs guarded: paho re-raises a callback's exception in its
        network thread, which then dies, and leaves the QoS 1 message
        unacknowledged, so the broker would redeliver it to the next process too.
        A guarded handler counts and logs any failure, and paho acknowledges.
        """
        for topic, handler in (
            (self.topics.command, self._on_command),
            (self.topics.label, self._on_label),
            (self.topics.ha_status, self._on_ha_status),
        ):
            self.client.message_callback_add(topic, self._guarded(handler))

    def _guarded(self, handler: Callback) -> Callback:
        def guarded(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
            try:
                handler(client, userdata, msg)
            except Exception:
                with self._lock:
                    self.counters.rejected += 1
                log.exception("error handling a message on %s (dropped)", msg.topic)

        return guarded

    def announce(self) -> mqtt.MQTTMessageInfo | None:
        """On (re)connect: discovery (availability is the node's own status)."""
        return self.publish_discovery()

    def publish_discovery(self) -> mqtt.MQTTMessageInfo | None:
        """The retained discovery message (its publish info; None if discovery is off)."""
        if not self.discovery:
            return None
        payload = discovery_payload(
            self.topics, self.availability_topic, self.device_name, snapshot=self.snapshots
        )
        return self._publish(self.topics.discovery, json.dumps(payload), retain=True)

    # --- events and state -------------------------------------------------------------

    def visitor(
        self,
        person: str,
        confidence: float,
        box: Box | None,
        crop: npt.NDArray[np.uint8] | None = None,
        frame: npt.NDArray[np.uint8] | None = None,
    ) -> str:
        """A visitor event; the chip is kept for labelling under the returned event id."""
        event_id = new_event_id()
        if crop is not None:
            self.crops.add(event_id, crop, person)
        payload = VisitorEvent(
            event_type="unknown" if person == "unknown" else "known",
            event_id=event_id,
            time=now_iso(),
            person=person,
            confidence=round(float(confidence), 4),
            box=None if box is None else [int(v) for v in box],
        )
        self._publish(self.topics.visitor, payload.model_dump_json(), retain=False)
        self._maybe_snapshot(frame)
        return event_id

    def ring(
        self, source: str, person: str | None = None, frame: npt.NDArray[np.uint8] | None = None
    ) -> str:
        event_id = new_event_id()
        payload = RingEvent(
            event_type="ring", event_id=event_id, time=now_iso(), source=source, person=person
        )
        self._publish(self.topics.ring, payload.model_dump_json(), retain=False)
        self._maybe_snapshot(frame)
        return event_id

    def present(self, present: bool) -> None:
        self._publish(self.topics.present, PRESENT_ON if present else PRESENT_OFF, retain=True)

    def _maybe_snapshot(self, frame: npt.NDArray[np.uint8] | None) -> None:
        if not self.snapshots or frame is None:
            return
        quality = [cv2.IMWRITE_JPEG_QUALITY, self.snapshot_quality]
        image = frame
        ok, jpeg = cv2.imencode(".jpg", image, quality)
        # The broker drops anything over 1 MiB (message_size_limit): halve a big
        # camera's frame until its JPEG fits rather than lose the snapshot.
        while ok and len(jpeg) > SNAPSHOT_MAX_BYTES and min(image.shape[:2]) >= 32:
            image = np.asarray(cv2.resize(image, None, fx=0.5, fy=0.5), np.uint8)
            ok, jpeg = cv2.imencode(".jpg", image, quality)
        if ok:
            # Not retained: an image of someone at the door should not live on the broker.
            self._publish(self.topics.snapshot, jpeg.tobytes(), retain=False)

    def _publish(self, topic: str, payload: str | bytes, retain: bool) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=EVENT_QOS, retain=retain)
        queued = info.rc != mqtt.MQTT_ERR_SUCCESS
        with self._lock:
            self.counters.published += 1
            first = queued and not self._queueing  # said once per outage, not per event
            self._queueing = queued
        if first:
            log.warning("no broker: events are queued until it is back (first: %s)", topic)
        return info

    # --- incoming ---------------------------------------------------------------------

    def _on_command(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.counters.commands += 1
        try:
            command = safejson.loads(bytes(msg.payload))  # bounded size and depth
            name = command.get("cmd") if isinstance(command, dict) else None
        except RejectedMessage:
            name = None
        if name == "ring" and self.on_ring_command is not None:
            self.on_ring_command()
            return
        self.counters.rejected += 1
        log.warning(
            'command on %s rejected: expected JSON {"cmd": "ring"}, got %r',
            msg.topic,
            msg.payload[:100],
        )

    def _on_label(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            apply_label(self.crops, self.gallery, bytes(msg.payload), self.on_named)
        except FeedbackError as err:
            self.counters.rejected += 1
            log.warning("label command rejected: %s", err)
        else:
            if self.on_labelled is not None:  # counted once recognition can use it
                self.on_labelled()
            self.counters.labels += 1

    def _on_ha_status(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload == ONLINE.encode():
            log.info("Home Assistant came online: republishing discovery")
            self.publish_discovery()
