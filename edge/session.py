"""The doorbell's MQTT session: connecting, subscribing, routing messages, the status.

paho's network thread runs every callback here. They only parse, check and
record (anything slow is the node's worker's job), so keep-alives and
acknowledgements never wait behind TensorFlow. Every callback runs guarded:
whatever it raises is logged and counted, so a bad message is dropped (and
acknowledged, so the broker does not redeliver it to the next process), never
fatal.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt

from edge import health
from edge.config import EdgeConfig
from fedbell import systemd
from fedbell.errors import RejectedMessage
from fedbell.wire.mqtt import connect, make_client
from fedbell.wire.topics import Topics

log = logging.getLogger(__name__)

OFFLINE_PUBLISH_WAIT_S = 5.0
"""How long closing waits for the broker to acknowledge the offline status."""

Handler = Callable[[str, bytes], None]
"""A routed message's handler: its topic and its (non-empty) payload."""


@dataclass(frozen=True)
class Listener:
    """Another part of the doorbell on this connection (the camera side, Home Assistant):
    it routes its own messages (`message_callback_add`); the session subscribes to its
    topics and tells it each time the connection is (re)made."""

    subscriptions: Callable[[], list[tuple[str, int]]]
    on_connected: Callable[[], object]


def payload_only(handler: Callable[[bytes], None]) -> Handler:
    """A handler for one exact topic, which has no use for the topic."""
    return lambda _topic, payload: handler(payload)


class NodeSession:
    """One doorbell's MQTT client: callbacks, subscriptions, the retained status."""

    def __init__(
        self,
        config: EdgeConfig,
        counters: Counter[str],
        *,
        status: Callable[[str], bytes],
        summary: Callable[[], str],
    ) -> None:
        """`status(state)`: the status payload for "online" or "offline" (the last will);
        `summary()`: the one-line status systemd shows. Neither is asked before `start`."""
        self.config = config
        self.device = config.device_id
        self.topics = Topics(config.site, config.mqtt.topic_root)
        self.counters = counters
        self.status_topic = self.topics.status(self.device)
        self._status = status
        self._summary = summary
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set once the broker acknowledged the subscriptions of the current connection."""
        self.activity = health.Activity()
        """The callback running now (the watchdog's business)."""
        self.client = make_client(config.mqtt, client_id=self.device)
        self._routes: list[tuple[str, Handler]] = []  # in subscription order
        self._listeners: list[Listener] = []
        self._last_status: bytes | None = None
        self._status_lock = threading.Lock()
        self._closing = threading.Event()
        self._said_unreachable = threading.Event()  # once per outage, not per retry
        self.client.on_connect = self._guarded(self._on_connect)
        self.client.on_disconnect = self._guarded(self._on_disconnect)
        self.client.on_connect_fail = self._guarded(self._on_connect_fail)
        self.client.on_message = self._guarded(self._on_message)
        self.client.on_subscribe = self._guarded(self._on_subscribe)

    # --- wiring (before `start`) ----------------------------------------------------

    def route(self, topic_filter: str, handler: Handler) -> None:
        """Subscribe to `topic_filter` and hand its messages to `handler`. The broker sends
        retained messages in subscription order, so route what must come first first."""
        self._routes.append((topic_filter, handler))

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (paho's thread); paho reconnects by itself."""
        # The last will is set here, not with the client: what it says (the model
        # and round) is known once the parts that `status` asks are all set up.
        will = self._status("offline")
        self.client.will_set(self.status_topic, will, qos=1, retain=True)
        connect(self.client, self.config.mqtt)

    def said_unreachable(self) -> bool:
        """Whether the broker's absence was reported since the last connection."""
        return self._said_unreachable.is_set()

    def close(self) -> None:
        """Publish the offline status (if connected), disconnect, stop paho's thread."""
        if self._closing.is_set():
            return
        self._closing.set()
        if self.connected.is_set():
            info = self.client.publish(
                self.status_topic, self._status("offline"), qos=1, retain=True
            )
            try:
                info.wait_for_publish(OFFLINE_PUBLISH_WAIT_S)
            except (RuntimeError, ValueError) as err:
                log.warning("offline status not sent: %s", err)
        self.client.disconnect()
        self.client.loop_stop()

    def network_problem(self, limit_s: float) -> str | None:
        """Why paho's network thread cannot serve (dead, or a callback stuck), or None."""
        # paho's loop_start() thread; it only ends by loop_stop() or a crash.
        thread = self.client._thread  # paho keeps it private
        return health.thread_problem("MQTT network", thread, self.activity, limit_s)

    # --- publishing -------------------------------------------------------------------

    def publish_status(self, force: bool = False) -> None:
        """Publish the retained online status if anything in it changed."""
        payload = self._status("online")
        with self._status_lock:
            if payload == self._last_status and not force:
                return
            self._last_status = payload
        self.client.publish(self.status_topic, payload, qos=1, retain=True)
        systemd.notify_status(self._summary())

    def publish_status_if_connected(self) -> None:
        if self.connected.is_set():
            self.publish_status()

    def publish_update(self, topic: str, payload: bytes, what: str) -> None:
        """An update, at QoS 1: paho queues it while offline and sends it after reconnecting."""
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("%s: update queued while offline (%s)", what, mqtt.error_string(info.rc))

    # --- MQTT callbacks (paho's thread) ---------------------------------------------

    def _guarded(self, callback: Callable[..., None]) -> Callable[..., None]:
        """No exception may reach paho (its thread would die, the message stay
        unacknowledged); and how long a callback runs is the watchdog's business."""

        def guarded(*args: Any) -> None:
            with self.activity.running(callback.__name__):
                try:
                    callback(*args)
                except Exception:
                    self.counters["callback_error"] += 1
                    log.exception("MQTT callback %s failed (carrying on)", callback.__name__)

        return guarded

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        self._said_unreachable.clear()
        try:
            client.subscribe(
                [
                    *((topic_filter, 1) for topic_filter, _ in self._routes),
                    *(topic for listener in self._listeners for topic in listener.subscriptions()),
                ]
            )
            self.publish_status(force=True)  # the broker may hold our last will
            for listener in self._listeners:
                listener.on_connected()
            self.connected.set()
            log.info(
                "connected to %s:%d as %s",
                self.config.mqtt.host,
                self.config.mqtt.port,
                self.device,
            )
        except Exception:
            self.counters["connect_error"] += 1
            log.exception("on_connect failed")

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        """Nothing answered at the broker's address: say so at once, once per outage."""
        if not self._said_unreachable.is_set():
            self._said_unreachable.set()
            log.warning(
                "no broker at %s:%d (is it running, on this port?): retrying in the background;"
                " recognising offline meanwhile",
                self.config.mqtt.host,
                self.config.mqtt.port,
            )

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._closing.is_set():
            log.warning("disconnected from the broker (%s); paho reconnects", reason)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[Any], _props: Any
    ) -> None:
        refused = [str(reason) for reason in reasons if reason.is_failure]
        if refused:  # an ACL that denies these means no model will ever arrive: say so loudly
            self.counters["subscribe_refused"] += 1
            log.error("broker refused subscriptions (%s): check the ACL", ", ".join(refused))
            return
        self.subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        handler = next(
            (h for pattern, h in self._routes if mqtt.topic_matches_sub(pattern, topic)), None
        )
        try:
            if handler is None:
                raise RejectedMessage("unexpected_topic", topic)
            if not message.payload:
                log.info("%s cleared (empty retained message)", topic)
                return
            handler(topic, bytes(message.payload))
        except RejectedMessage as err:
            self.counters[err.reason] += 1
            log.warning("dropped message on %s: %s", topic, err)
        except Exception as err:
            self.counters["handler_error"] += 1
            log.exception("error handling %s: %s", topic, err)
