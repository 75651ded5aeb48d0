"""The operator's side of MQTT: wait for the fleet, start rounds, collect metrics.

Everything the simulation learns comes from the broker, as an operator with
`mosquitto_sub` would see it: retained device statuses, the retained round
announcement, update arrivals, and the RoundMetrics the aggregator publishes
after each round.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.reasoncodes import ReasonCode

from fedbell.config import MqttSettings
from fedbell.errors import RejectedMessage
from fedbell.wire.mqtt import connect, make_client
from fedbell.wire.protocol import (
    Command,
    DeviceStatus,
    RoundAnnouncement,
    RoundMetrics,
    parse_json,
    to_json,
)
from fedbell.wire.topics import Topics

VISITOR_TOPIC = "doorbell/+/visitor"


GATE_REFUSALS = frozenset({"accuracy_drop", "accuracy_loss"})
"""Reasons of aggregator/gates.py: a refused release, not a broken round."""


class SimulationTimeout(RuntimeError):
    """Something the simulation waits for did not happen in time."""


@dataclass
class FleetView:
    """What the driver has seen so far (guarded by Driver._changed)."""

    statuses: dict[str, DeviceStatus] = field(default_factory=dict)
    aggregator_online: bool = False
    global_model_seen: bool = False
    announcement: RoundAnnouncement | None = None
    updates: set[str] = field(default_factory=set)
    metrics: dict[int, RoundMetrics] = field(default_factory=dict)
    retained: dict[str, bytes] = field(default_factory=dict)
    visitors: list[dict[str, Any]] = field(default_factory=list)


def _is_online(payload: bytes) -> bool:
    """The aggregator's status, as JSON with a `state` or as plain text."""
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return payload.strip() == b"online"
    return data == "online" or (isinstance(data, dict) and data.get("state") == "online")


class Driver:
    def __init__(self, settings: MqttSettings, topics: Topics) -> None:
        self.topics = topics
        self.view = FleetView()
        self._changed = threading.Condition()
        self._wanted = [
            topics.all_statuses,
            topics.aggregator_status,
            topics.round,
            topics.global_model,
            topics.all_updates,
            topics.metrics,
            topics.tflite_model,
            topics.backbone_chunks,
            VISITOR_TOPIC,
        ]
        self.client = make_client(settings, client_id="simulation-driver")
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        connect(self.client, settings)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # --- incoming ---------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _properties: Any
    ) -> None:
        if not reason.is_failure:
            client.subscribe([(topic, 1) for topic in self._wanted])

    def _on_message(self, _client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._changed:
            # Rejecting bad messages is the other processes' business; the driver only watches.
            with contextlib.suppress(RejectedMessage, ValueError):
                self._record(msg.topic, bytes(msg.payload))
            self._changed.notify_all()

    def _record(self, topic: str, payload: bytes) -> None:
        view, topics = self.view, self.topics
        if topic == topics.metrics:
            metrics = parse_json(payload, RoundMetrics)
            view.metrics[metrics.round] = metrics
        elif topic == topics.round:
            announcement = parse_json(payload, RoundAnnouncement)
            if view.announcement is None or announcement.round != view.announcement.round:
                view.updates = set()
            view.announcement = announcement
        elif topic == topics.aggregator_status:
            view.aggregator_online = _is_online(payload)
        elif topic == topics.global_model:
            view.global_model_seen = True  # published once the aggregator is serving
            view.retained[topic] = payload  # the live demo recognises with the latest
        elif topic == topics.tflite_model or mqtt.topic_matches_sub(topics.backbone_chunks, topic):
            view.retained[topic] = payload
        elif mqtt.topic_matches_sub(topics.all_updates, topic):
            view.updates.add(topics.device_of(topic))
        elif mqtt.topic_matches_sub(topics.all_statuses, topic):
            view.statuses[topics.device_of(topic)] = parse_json(payload, DeviceStatus)
        elif mqtt.topic_matches_sub(VISITOR_TOPIC, topic):
            view.visitors.append({"topic": topic, **json.loads(payload)})

    # --- waiting ----------------------------------------------------------------------

    def wait_until(
        self,
        done: Callable[[FleetView], bool],
        timeout: float,
        what: str,
        check: Callable[[], None],
        tick: Callable[[FleetView], None] | None = None,
    ) -> None:
        """Block until `done(view)`; `check` raises if a process died meanwhile."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done(self.view):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise SimulationTimeout(f"timed out after {timeout:.0f} s waiting for {what}")
                self._changed.wait(min(left, 0.5))
                check()
                if tick is not None:
                    tick(self.view)

    def wait_ready(self, devices: Iterable[str], timeout: float, check: Callable[[], None]) -> None:
        """Every device's retained status says online, and the aggregator is up."""
        wanted = set(devices)

        def ready(view: FleetView) -> bool:
            online = {d for d, s in view.statuses.items() if s.state == "online"}
            return wanted <= online and (view.aggregator_online or view.global_model_seen)

        def missing() -> str:
            online = {d for d, s in self.view.statuses.items() if s.state == "online"}
            up = self.view.aggregator_online or self.view.global_model_seen
            names = sorted(wanted - online) + ([] if up else ["aggregator"])
            return ", ".join(names)

        try:
            self.wait_until(ready, timeout, "the aggregator and every node to be online", check)
        except SimulationTimeout as err:
            raise SimulationTimeout(f"{err} (still offline: {missing()})") from None

    # --- rounds -----------------------------------------------------------------------

    def command(self, command: Command) -> None:
        self.client.publish(self.topics.control, to_json(command), qos=1).wait_for_publish(10)

    def run_round(
        self,
        timeout: float,
        check: Callable[[], None],
        tick: Callable[[FleetView], None] | None = None,
    ) -> RoundMetrics:
        """Start one round and return its metrics; a round that aggregates nothing fails."""
        with self._changed:
            previous = max(self.view.metrics, default=0)
        self.command(Command(cmd="start_round"))

        def finished(view: FleetView) -> bool:
            return max(view.metrics, default=0) > previous

        self.wait_until(finished, timeout, f"the metrics of round {previous + 1}", check, tick)
        with self._changed:
            metrics = self.view.metrics[max(self.view.metrics)]
        if metrics.outcome == "abandoned" and not GATE_REFUSALS & metrics.rejected.keys():
            # A version the accuracy bars refused (far worse than the published one, or
            # than the lineage's start) is a result to show, not a failure.
            raise RuntimeError(
                f"round {metrics.round} was abandoned: {metrics.participants} updates, "
                f"rejected {metrics.rejected or 'none'} (see the node logs)"
            )
        return metrics

    def retained(self, topic: str, timeout: float, check: Callable[[], None]) -> bytes:
        self.wait_until(lambda view: topic in view.retained, timeout, topic, check)
        with self._changed:
            return self.view.retained[topic]

    def visitors(self) -> list[dict[str, Any]]:
        with self._changed:
            return list(self.view.visitors)
