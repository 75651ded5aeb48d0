"""Issue 13 item 2: one message must not silence a doorbell.

A payload of 5,000 `[` used to raise RecursionError in the command and label
handlers; paho re-raised it in its network thread, which died, the message
stayed unacknowledged (and was redelivered to the next process), and the
watchdog, which only looked at the worker thread, kept being pinged.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.local import LocalBroker
from edge import health
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.gallery import Gallery
from edge.homeassistant import DoorbellTopics
from fedbell.errors import RejectedMessage
from fedbell.wire import safejson
from fedbell.wire.protocol import RoundAnnouncement, parse_json
from tests.mqtt_helpers import Probe, doorbell_config, wait_until

POISON = b"[" * 5000
TOPICS = DoorbellTopics("door1")


@pytest.mark.parametrize(
    "payload",
    [POISON, b'{"a":' * 40 + b"1" + b"}" * 40, b"x" * (safejson.MAX_JSON_BYTES + 1)],
    ids=["5000 brackets", "40 nested objects", "too large"],
)
def test_deep_or_large_json_is_rejected_before_parsing(payload: bytes) -> None:
    with pytest.raises(RejectedMessage) as caught:
        safejson.loads(payload)
    assert caught.value.reason in {"too_deep", "too_large"}
    with pytest.raises(RejectedMessage):
        parse_json(payload, RoundAnnouncement)


def test_brackets_inside_strings_do_not_count() -> None:
    value = safejson.loads(b'{"person": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"{{{{{{{{{{{{{{{{{{{{"}')
    assert value["person"].startswith("[[[")


class Doorbell:
    """A paho client with a persistent session and a doorbell's event handlers."""

    def __init__(self, port: int, gallery: Path) -> None:
        self.rings = 0
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="door1", protocol=mqtt.MQTTv5
        )
        self.publisher = EventPublisher(
            self.client, TOPICS, "fedbell/home/status/door1", RecentCrops(), Gallery(gallery)
        )
        self.publisher.on_ring_command = self._ring
        self.publisher.attach()
        self.client.on_subscribe = lambda *_args: self.subscribed.set()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 300
        self.client.connect("127.0.0.1", port, clean_start=False, properties=properties)
        self.client.loop_start()
        self.client.subscribe(self.publisher.subscriptions())
        assert self.subscribed.wait(5), "no SUBACK"

    def _ring(self) -> None:
        self.rings += 1

    @property
    def network_thread_alive(self) -> bool:
        thread = self.client._thread
        return thread is not None and thread.is_alive()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_poison_commands_are_counted_acknowledged_and_the_doorbell_keeps_listening(
    broker: LocalBroker, tmp_path: Path
) -> None:
    operator = Probe(broker.port)
    door = Doorbell(broker.port, tmp_path)
    try:
        operator.publish(TOPICS.command, POISON)
        operator.publish(TOPICS.label, POISON)
        operator.publish(TOPICS.command, b'{"cmd": "ring"}')
        wait_until(lambda: door.rings == 1, what="the ring after the poison")
        assert door.publisher.counters.rejected == 2
        assert door.network_thread_alive
    finally:
        door.close()
    # The poison was acknowledged: a restarted doorbell (same persistent
    # session) is not handed it again, only what came after.
    operator.publish(TOPICS.command, b'{"cmd": "ring"}')
    again = Doorbell(broker.port, tmp_path)
    try:
        wait_until(lambda: again.rings == 1, what="the queued ring")
        operator.publish(TOPICS.command, b'{"cmd": "ring"}')
        wait_until(lambda: again.rings == 2, what="a live ring")
        assert again.publisher.counters.rejected == 0, "a poison message was redelivered"
    finally:
        again.close()
        operator.close()


def test_a_handler_that_raises_is_counted_and_does_not_kill_the_network_thread(
    broker: LocalBroker, tmp_path: Path
) -> None:
    operator = Probe(broker.port)
    door = Doorbell(broker.port, tmp_path)

    def broken() -> None:
        raise RuntimeError("the pipeline is gone")

    try:
        door.publisher.on_ring_command = broken
        operator.publish(TOPICS.command, b'{"cmd": "ring"}')
        wait_until(lambda: door.publisher.counters.rejected == 1, what="the counted failure")
        door.publisher.on_ring_command = door._ring
        operator.publish(TOPICS.command, b'{"cmd": "ring"}')
        wait_until(lambda: door.rings == 1, what="the next ring")
        assert door.network_thread_alive
    finally:
        door.close()
        operator.close()


# ------------------------------------------------------------------ watchdog


def test_health_names_a_dead_or_stuck_thread() -> None:
    now = [100.0]
    activity = health.Activity(clock=lambda: now[0])
    alive = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True)
    alive.start()
    dead = threading.Thread(target=lambda: None)
    dead.start()
    dead.join()
    assert health.thread_problem("worker", alive, activity, 10) is None
    assert health.thread_problem("worker", dead, activity, 10) == "worker thread is dead"
    with activity.running("a training"):
        now[0] += 5
        assert health.thread_problem("worker", alive, activity, 10) is None
        now[0] += 10
        assert health.thread_problem("worker", alive, activity, 10) == (
            "worker thread is stuck: a training running for over 10s"
        )
    assert health.thread_problem("worker", alive, activity, 10) is None
    # The camera: dead is only fine once its replay ended; stuck when it stops reading.
    clock = lambda: now[0]  # noqa: E731
    assert health.camera_problem(dead, ended=True, last_read=None, limit_s=10) is None
    assert health.camera_problem(dead, ended=False, last_read=None, limit_s=10) == (
        "camera thread is dead"
    )
    assert health.camera_problem(alive, False, now[0] - 5, 10, clock) is None
    assert "stuck" in str(health.camera_problem(alive, False, now[0] - 50, 10, clock))


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A unix datagram socket standing in for systemd's $NOTIFY_SOCKET."""
    folder = Path(tempfile.mkdtemp(prefix="fb-notify-"))  # short: AF_UNIX paths are limited
    path = folder / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()
    path.unlink()
    folder.rmdir()


def pings_within(sock: socket.socket, seconds: float) -> int:
    """WATCHDOG=1 messages received over the next `seconds`."""
    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            message = sock.recv(4096)
        except TimeoutError:
            continue
        count += b"WATCHDOG=1" in message.split(b"\n")
    return count


def drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(4096)
        except TimeoutError:
            return


def test_the_watchdog_stops_when_the_network_or_worker_thread_dies_or_sticks(
    broker: LocalBroker, tmp_path: Path, notify_socket: socket.socket
) -> None:
    from edge.node import EdgeNode

    assert os.environ["NOTIFY_SOCKET"]
    node = EdgeNode(doorbell_config(broker.port, tmp_path))
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    release = threading.Event()
    try:
        wait_until(node.session.subscribed.is_set, what="the node's subscriptions")
        assert pings_within(notify_socket, 2.5) >= 1, "a healthy node pings"

        # A worker job that never ends (a hung training): stuck past the limit.
        node.limits.job_s = 0.5

        def hang() -> None:
            release.wait(30)

        node._jobs.put(hang)
        wait_until(lambda: node.health_problem() is not None, what="the stuck worker")
        assert "worker thread is stuck" in str(node.health_problem())
        drain(notify_socket)
        assert pings_within(notify_socket, 2.5) == 0, "pinged while the worker was stuck"
        release.set()
        wait_until(lambda: node.health_problem() is None, what="the worker to recover")
        assert pings_within(notify_socket, 2.5) >= 1

        # paho's network thread gone: nothing more would ever be received.
        node.session.client.loop_stop()
        assert node.health_problem() == "MQTT network thread is dead"
        drain(notify_socket)
        assert pings_within(notify_socket, 2.5) == 0, "pinged with a dead network thread"
        assert node.counters["watchdog_withheld"] == 2
    finally:
        release.set()
        stop.set()
        thread.join(30)
