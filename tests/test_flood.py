"""Issue 18 item 4: one doorbell's junk must not cost the others their updates.

A real Mosquitto with production's queue limits (max_queued_messages 2000),
the aggregator as its own process (`python -m aggregator`), and a doorbell
login in another process that sends 30,000 junk updates (unreadable bytes and
copies of a well-formed update of its own) as fast as QoS 1 lets it, while
five honest doorbells send their one update each and the operator sends
commands. Every honest update must be counted in the round and every command
answered.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from broker.local import CONFIG_TEMPLATE, LocalBroker
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import GlobalModel
from fedbell.wire.protocol import Reply, RoundMetrics
from tests.federation import start_aggregator
from tests.mqtt_helpers import Probe
from tests.test_aggregator import SITE, TOPICS, FakeDevice, Watcher

HONEST = ("door1", "door2", "door3", "door4", "door5")
FLOODER = "mallory"
JUNK = 30_000
COMMANDS = 20
PRODUCTION = Path(CONFIG_TEMPLATE).with_name("production.conf")


def production_queue_limits(tmp_path: Path) -> Path:
    """local.conf with production.conf's per-client queue limits (what the flood meets)."""
    production = {
        line.split()[0]: line
        for line in PRODUCTION.read_text().splitlines()
        if line.startswith(("max_queued_messages", "max_queued_bytes", "max_inflight_messages"))
    }
    lines = [
        production.get(line.split()[0], line) if line.strip() else line
        for line in CONFIG_TEMPLATE.read_text().splitlines()
    ]
    template = tmp_path / "flood.conf"
    template.write_text("\n".join(lines) + "\n")
    return template


@pytest.fixture
def queued_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path / "broker", template=production_queue_limits(tmp_path)) as broker:
        yield broker


FLOOD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
    port, topic, count, update_file = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
    update = open(update_file, "rb").read()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="mallory", protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(1000)
    acked = []
    client.on_publish = lambda *args: acked.append(1)
    client.connect("127.0.0.1", port)
    client.loop_start()
    start = time.monotonic()
    for n in range(count):
        junk = update if n % 2 else b"junk %d " % n + bytes(200)
        client.publish(topic, junk, qos=1)
    while len(acked) < count and time.monotonic() - start < 120:
        time.sleep(0.05)
    print(f"{len(acked)} of {count} junk updates acked in {time.monotonic() - start:.1f}s")
    client.disconnect()
    client.loop_stop()
    """
)


def delta(base: GlobalModel, seed: int) -> Weights:
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=w.shape) * 0.01).astype(np.float32) for w in base.weights]


def test_a_doorbell_flooding_junk_costs_no_honest_update_and_no_command(
    queued_broker: LocalBroker, tmp_path: Path, aggregator_cache: Path
) -> None:
    broker = queued_broker
    config = tmp_path / "aggregator.yaml"
    config.write_text(
        f"site: {SITE}\nstate_dir: {tmp_path / 'state'}\ncache_dir: {aggregator_cache}\n"
        f"mqtt:\n  port: {broker.port}\nthreads: 1\n"
        "rounds:\n  codec: topk\n  timeout_s: 240\n  auto_pause_s: 0\n"
        f"  min_updates: {len(HONEST) + 1}\n  max_devices: {len(HONEST) + 1}\n"
    )
    # Not the updates: this test's own reader must not drown in the flood either.
    watcher = Watcher(
        broker.port, TOPICS.aggregator_status, TOPICS.global_model, TOPICS.round, TOPICS.metrics
    )
    operator = Probe(broker.port, TOPICS.reply)
    doors = [FakeDevice(broker.port, name) for name in (*HONEST, FLOODER)]
    # Its log goes to a file: a pipe nobody reads while the test runs would fill
    # (64 KiB) and block the aggregator on its next log line.
    log_path = tmp_path / "aggregator.log"
    process = start_aggregator(config, log_path.open("wb"))
    flood: subprocess.Popen[bytes] | None = None
    try:
        watcher.wait_for(TOPICS.aggregator_status, lambda p: b'"online"' in p, timeout=120)
        base = watcher.global_model(0)
        for door in doors:  # the aggregator sees everyone online
            door.publish(TOPICS.status(door.name), door_status(), retain=True)
        time.sleep(1.0)
        operator.publish(TOPICS.control, json.dumps({"cmd": "start_round"}))
        announced = watcher.round(1, "train")
        assert set(announced.selected) == {*HONEST, FLOODER}
        mallory = doors[-1]
        own = mallory.update(base, delta(base, 99), examples=5, round_id=1, codec="topk")
        (tmp_path / "own.bin").write_bytes(own)
        mallory.send(own)  # its one real update, then copies of it and garbage
        mallory.close()
        flood = subprocess.Popen(
            [
                sys.executable,
                "-c",
                FLOOD_SCRIPT,
                str(broker.port),
                TOPICS.update(FLOODER),
                str(JUNK),
                str(tmp_path / "own.bin"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # the flood is under way
        for seed, door in enumerate(doors[:-1]):
            door.send(door.update(base, delta(base, seed), examples=5, round_id=1, codec="topk"))
            operator.publish(TOPICS.control, json.dumps({"cmd": "stop"}))
        for _ in range(COMMANDS - len(HONEST)):
            operator.publish(TOPICS.control, json.dumps({"cmd": "stop"}))
        out, err = flood.communicate(timeout=180)
        print(out.decode().strip(), err.decode()[-2000:])
        # Judged by what was counted, not how fast: the round may take until its deadline.
        metrics = RoundMetrics.model_validate_json(
            watcher.wait_for(TOPICS.metrics, lambda p: b'"round":1,' in p, timeout=250)
        )
        print(f"round 1: {metrics.participants} participants, rejected {metrics.rejected}")
        assert metrics.outcome == "published"
        assert metrics.participants == len(HONEST) + 1  # every honest update counted
        answered = wait_for_replies(operator, COMMANDS + 1)  # + start_round
        assert len(answered) == COMMANDS + 1
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=180)
        for door in doors[:-1]:
            door.close()
        operator.close()
        watcher.close()
    log = log_path.read_text()
    dropped = broker.log_path.read_text().count("Outgoing messages are being dropped")
    print(f"aggregator log: {len(log.splitlines())} lines; broker drop notices: {dropped}")
    assert len(log.splitlines()) < 200, log[-3000:]  # a summary, not a line per junk message


def door_status() -> bytes:
    return b'{"state": "online", "model_version": 0}'


def wait_for_replies(operator: Probe, count: int, timeout: float = 60) -> list[Reply]:
    """Replies to commands seen by the operator, until `count` or the timeout."""
    replies: list[Reply] = []
    deadline = time.monotonic() + timeout
    while len(replies) < count and time.monotonic() < deadline:
        try:
            message = operator.wait_for(TOPICS.reply, timeout=max(0.1, deadline - time.monotonic()))
        except AssertionError:
            break
        reply = Reply.model_validate_json(message.payload)
        if reply.about == "command":
            replies.append(reply)
    return replies
