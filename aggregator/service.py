"""MQTT wiring and the main loop of the aggregator service.

paho's network thread only copies messages onto a queue; one main-loop
thread takes them off, runs the coordinator (validation, aggregation, TFLite
conversion), wakes up for deadlines, and pings the systemd watchdog. So a
slow conversion never stalls keep-alives, and no state is shared between
threads except the queue.

Acknowledgements are manual: a QoS 1 message is acked (PUBACK) only once
whatever it changed is on disk. Accepted updates are persisted in batches
(every `persist_interval_s`, or when half of `receive_maximum` messages wait
for their ack, so the broker never stalls on a full window), which is what
makes ~1000 updates a round cheap; after a crash the broker redelivers every
un-acked update to the persistent session, and one that was already counted
is refused as a duplicate.

Memory does not grow with the number of doorbells because the inbox is
bounded (`inbox_size`): when it is full, paho's thread waits in `put`, stops
reading the socket, and TCP holds the broker back; the updates wait in the
broker, which queues them anyway. It has one lane per sending topic
(`aggregator/inbox.py`): a sender with `inbox_per_sender` messages waiting
has the next dropped (acked, counted as `backlog_full`) instead, so one
doorbell flooding junk never stalls the network thread nor makes the broker
drop the others' updates or the operator's commands. The MQTT v5 Receive Maximum cannot do that
on its own: Mosquitto 2.0.11 (Ubuntu 22.04's) stops honouring it after the
first PUBACKs (with a window of 5, every PUBACK released 5 more messages).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, ParamSpec

import paho.mqtt.client as mqtt

from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator
from aggregator.export import Exporter
from aggregator.inbox import FairInbox
from aggregator.state import StateError, StateStore
from fedbell import systemd
from fedbell.wire.messages import AGGREGATOR, Signer
from fedbell.wire.mqtt import connect, make_client
from fedbell.wire.signing import KeyRing, load_private_key
from fedbell.wire.topics import SECAGG_LEAVES, Topics

log = logging.getLogger("aggregator")

MAX_SLEEP_S: Final = 1.0
"""Longest wait on the queue: bounds how late a stop or a watchdog ping can be."""
DROP_SUMMARY_S: Final = 10.0
"""At most one log line this often about messages dropped from full backlogs."""

P = ParamSpec("P")


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    mid: int = 0
    qos: int = 0
    connection: int = 0
    """Which connection it came on: an ack is only valid on that one."""


class _Signal:
    """Markers the network thread and `stop()` put on the queue."""

    SUBSCRIBED: Final = "subscribed"
    WAKE: Final = "wake"


Item = Incoming | str


def _guarded(callback: Callable[P, None]) -> Callable[P, None]:
    """No exception may escape into paho's thread: log it and carry on."""

    @functools.wraps(callback)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            callback(*args, **kwargs)
        except Exception:
            log.exception("error in MQTT callback %s", callback.__name__)

    return wrapper


class AggregatorService:
    def __init__(self, config: AggregatorConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.topics = Topics(config.site, config.mqtt.topic_root)
        key = config.signing.private_key_file
        signer = Signer(AGGREGATOR, load_private_key(key) if key is not None else None)
        keys_dir = config.signing.trusted_keys_dir
        # Re-read when the folder changes or on SIGHUP: `provision remove-device`
        # revokes a doorbell's key at once, a new doorbell needs no restart.
        self.keyring = KeyRing(keys_dir) if keys_dir is not None else None
        trusted = self.keyring.keys() if self.keyring is not None else None
        self.inbox: FairInbox[Item] = FairInbox(config.inbox_size, config.inbox_per_sender)
        self._drops_summarised_at = 0.0
        self._stopping = threading.Event()
        self._connection = 0  # written by paho's thread only, read by the main loop
        self._session_kept = False  # the last CONNACK's session present, likewise
        self._unacked: list[tuple[int, int, int]] = []
        """(mid, qos, connection) of handled messages not yet acked (not their payloads)."""
        self._unacked_since = 0.0
        self._ack_batch = max(1, config.receive_maximum // 2)
        self.coordinator = Coordinator(
            config,
            Exporter(config, signer),
            StateStore(config.state_dir),
            publish=self._publish,
            clock=clock,
            trusted_keys=trusted,
        )
        self.client = make_client(
            config.mqtt,
            client_id=f"fedbell-aggregator-{config.site}",
            will=(self.topics.aggregator_status, self.coordinator.status_payload("offline")),
            manual_ack=True,
        )
        self.client.on_connect = _guarded(self._on_connect)
        self.client.on_subscribe = _guarded(self._on_subscribe)
        self.client.on_message = _guarded(self._on_message)
        self.client.on_disconnect = _guarded(self._on_disconnect)

    # -- paho's network thread: no work beyond queueing --------------------------

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            log.error("broker refused the connection: %s", reason)
            return
        log.info("connected to %s:%d", self.config.mqtt.host, self.config.mqtt.port)
        self._session_kept = bool(flags.session_present)
        self._connection += 1
        client.subscribe(
            [
                (self.topics.control, 1),
                (self.topics.all_updates, 1),
                (self.topics.all_statuses, 1),
                *((self.topics.all_secagg(leaf), 1) for leaf in SECAGG_LEAVES),
                (self.topics.all_house_adverts, 1),
            ]
        )

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[Any], _properties: Any
    ) -> None:
        refused = [str(r) for r in reasons if r.is_failure]
        if refused:
            log.error("subscription refused (check the ACL): %s", ", ".join(refused))
        self.inbox.signal(_Signal.SUBSCRIBED)

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        incoming = Incoming(
            message.topic, bytes(message.payload), message.mid, message.qos, self._connection
        )
        commands = message.topic == self.topics.control
        kept = self.inbox.put(incoming, message.topic, self._stopping, commands=commands)
        if not kept and message.qos > 0:
            client.ack(message.mid, message.qos)  # dropped: free the broker's window

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if not self._stopping.is_set():
            log.warning("disconnected from the broker (%s); reconnecting", reason)

    # -- main loop thread ---------------------------------------------------------

    def _publish(self, topic: str, payload: bytes) -> None:
        # Replies (one per accepted update, for whoever watches) at QoS 0, still
        # retained for the next console. On the federation tier a QoS 1 publish
        # is a JetStream store on three nodes that NATS waits for before it reads
        # the aggregator's next packet: a round's 1,000 replies cost ~2 s of it
        # (7.3 s, 5.3 s at QoS 0), and one that timed out while the tier re-elected
        # leaders after a node loss closed the aggregator's connection (a round
        # with a node killed: 24.8 s, 15.0 s at QoS 0; docs/many-houses.md).
        qos = 0 if topic == self.topics.reply else 1
        self.client.publish(topic, payload, qos=qos, retain=True)

    def stop(self) -> None:
        """Ask the main loop to finish (safe from a signal handler or another thread)."""
        self._stopping.set()
        self.inbox.signal(_Signal.WAKE)

    def run(self) -> None:
        """Connect and serve until `stop()`; state errors and disk errors propagate."""
        connect(self.client, self.config.mqtt, receive_maximum=self.config.receive_maximum)
        ready = False
        shown = ""
        try:
            while not self._stopping.is_set():
                # HOOK: systemd watchdog (a no-op outside a Type=notify unit).
                systemd.notify_watchdog()
                sleep = (
                    min(MAX_SLEEP_S, self.coordinator.seconds_to_next_event())
                    if ready
                    else MAX_SLEEP_S
                )
                if self._unacked:
                    sleep = min(
                        sleep,
                        self._unacked_since + self.config.persist_interval_s - time.monotonic(),
                    )
                item = self.inbox.get(timeout=max(sleep, 0.01))
                if item == _Signal.SUBSCRIBED:
                    self.coordinator.connected(session_kept=self._session_kept)
                    if not ready:
                        systemd.notify_ready()
                        ready = True
                        log.info(
                            "ready: site %s, model version %d",
                            self.config.site,
                            self.coordinator.federation.model.version,
                        )
                elif isinstance(item, Incoming):
                    self._handle(item)
                if ready and not self._stopping.is_set():
                    self._refresh_keys()  # a round selects only doorbells with a key
                    self.coordinator.tick()
                    if (summary := self.coordinator.summary()) != shown:
                        systemd.notify_status(summary)
                        shown = summary
                self._settle(force=False)
                self._summarise_drops()
            # A normal stop persists and acks everything; after an error (the
            # finally below) nothing more is written and the broker keeps the un-acked.
            self._settle(force=True)
        finally:
            self._shutdown()

    def _summarise_drops(self) -> None:
        """Count messages dropped from full backlogs; one log line every DROP_SUMMARY_S."""
        now = time.monotonic()
        if now - self._drops_summarised_at < DROP_SUMMARY_S:
            return
        self._drops_summarised_at = now
        dropped = self.inbox.take_dropped()
        if dropped:
            self.coordinator.count("backlog_full", sum(dropped.values()))
            log.warning(
                "dropped %d messages whose sender already had %d waiting: %s",
                sum(dropped.values()),
                self.config.inbox_per_sender,
                ", ".join(f"{topic} {n}" for topic, n in dropped.most_common(5)),
            )
            self._publish(self.topics.aggregator_status, self.coordinator.status_payload())

    def reload_keys(self) -> None:
        """Re-read the trusted keys before the next message (SIGHUP; signal-safe)."""
        if self.keyring is not None:
            self.keyring.request_reload()

    def _refresh_keys(self) -> None:
        if self.keyring is not None:
            self.coordinator.federation.trusted_keys = self.keyring.keys()

    def _handle(self, item: Incoming) -> None:
        self._refresh_keys()  # a revoked key is refused from the next message on
        if item.qos > 0:
            if not self._unacked:
                self._unacked_since = time.monotonic()
            self._unacked.append((item.mid, item.qos, item.connection))
        try:
            self.coordinator.on_message(item.topic, item.payload)
        except (OSError, StateError):
            raise  # the disk is the truth: better restart than run on without it
        except Exception:
            # A bug triggered by one message must not take the service down.
            self.coordinator.federation.rejected["internal_error"] += 1
            log.exception("internal error handling a message on %s", item.topic)

    def _settle(self, force: bool) -> None:
        """Persist accepted updates when due, then ack every message handled so far.

        Messages that left nothing unpersisted (statuses, commands, rejections)
        are acked at once; while accepted updates are only in memory, every ack
        waits for the next persist, in arrival order.
        """
        if not self._unacked:
            return
        if self.coordinator.federation.dirty:
            due = (
                force
                or len(self._unacked) >= self._ack_batch
                or time.monotonic() - self._unacked_since >= self.config.persist_interval_s
            )
            if not due:
                return
            self.coordinator.persist()
        for mid, qos, connection in self._unacked:
            if connection == self._connection:  # else the broker redelivers it anyway
                self.client.ack(mid, qos)
        self._unacked.clear()

    def _shutdown(self) -> None:
        systemd.notify_stopping()
        info = self.client.publish(
            self.topics.aggregator_status,
            self.coordinator.status_payload("offline"),
            qos=1,
            retain=True,
        )
        try:
            info.wait_for_publish(timeout=5)
        except (RuntimeError, ValueError):
            log.warning("could not publish the offline status (not connected)")
        self.client.disconnect()
        self.client.loop_stop()
        log.info("stopped")
