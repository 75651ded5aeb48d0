"""Doorbell topic names and the Home Assistant device-discovery payload (pure functions).

Device-based discovery (Home Assistant 2024.11+): one retained message on
`<prefix>/device/<device>/config` describes the device (`dev`), the software
that publishes it (`o`) and all its entities (`cmps`, each with a platform
`p`). Events are published non-retained (Home Assistant ignores retained
event messages); state is retained.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fedbell.wire.topics import Subtopic, check_segment

ONLINE = "online"
OFFLINE = "offline"
PRESENT_ON = "ON"
PRESENT_OFF = "OFF"
VISITOR_EVENT_TYPES = ("known", "unknown")
RING_EVENT_TYPES = ("ring",)
ORIGIN = {"name": "fedbell", "sw": "0.1.0", "url": "https://github.com/fedbell/fedbell"}


@dataclass(frozen=True)
class DoorbellTopics:
    """`<root>/<device>/...`: what one doorbell publishes and listens to."""

    device: str
    root: str = "doorbell"
    discovery_prefix: str = "homeassistant"

    def __post_init__(self) -> None:
        check_segment(self.device, "device id")
        check_segment(self.root, "doorbell topic root")
        check_segment(self.discovery_prefix, "discovery prefix")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.device}"

    visitor = Subtopic("visitor")
    ring = Subtopic("ring")
    present = Subtopic("present")
    snapshot = Subtopic("snapshot")
    command = Subtopic("command")
    label = Subtopic("label")

    @property
    def discovery(self) -> str:
        return f"{self.discovery_prefix}/device/{self.device}/config"

    @property
    def ha_status(self) -> str:
        """Home Assistant publishes `online` here when it (re)starts."""
        return f"{self.discovery_prefix}/status"


def discovery_payload(
    topics: DoorbellTopics,
    availability_topic: str,
    name: str | None = None,
    *,
    snapshot: bool = False,
    model: str = "fedbell doorbell",
    sw_version: str = "0.1.0",
) -> dict[str, Any]:
    """The device-discovery config: ring and visitor events, presence, optional snapshot.

    Availability follows the node's federation status topic (JSON with a
    `state` field), because that is where its last will lands: a doorbell
    that loses power shows as unavailable, not just one that shuts down.
    """
    device = topics.device
    availability = [
        {
            "topic": availability_topic,
            "value_template": "{{ value_json.state }}",
            "payload_available": ONLINE,
            "payload_not_available": OFFLINE,
        }
    ]

    def component(platform: str, key: str, title: str, **extra: Any) -> dict[str, Any]:
        return {
            "p": platform,
            "name": title,
            "unique_id": f"{device}_{key}",
            "availability": availability,
            **extra,
        }

    components: dict[str, dict[str, Any]] = {
        f"{device}_ring": component(
            "event",
            "ring",
            "Ring",
            state_topic=topics.ring,
            event_types=list(RING_EVENT_TYPES),
            device_class="doorbell",
        ),
        f"{device}_visitor": component(
            "event",
            "visitor",
            "Visitor",
            state_topic=topics.visitor,
            event_types=list(VISITOR_EVENT_TYPES),
        ),
        f"{device}_present": component(
            "binary_sensor",
            "present",
            "Person present",
            state_topic=topics.present,
            payload_on=PRESENT_ON,
            payload_off=PRESENT_OFF,
            device_class="occupancy",
        ),
        f"{device}_ring_button": component(
            "button",
            "ring_button",
            "Ring",
            command_topic=topics.command,
            payload_press='{"cmd": "ring"}',
        ),
    }
    if snapshot:
        components[f"{device}_snapshot"] = component(
            "image", "snapshot", "Snapshot", image_topic=topics.snapshot, content_type="image/jpeg"
        )
    return {
        "dev": {
            "ids": [f"fedbell_{device}"],
            "name": name or device,
            "mf": "fedbell",
            "mdl": model,
            "sw": sw_version,
        },
        "o": dict(ORIGIN),
        "cmps": components,
        "qos": 1,
    }
