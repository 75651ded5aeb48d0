"""The doorbell's MQTT session (`edge.session.NodeSession`) on a real Mosquitto.

What the node relies on it for: the routed topics (exact and wildcard) reach
their handlers, in order and only when not empty; a message nobody routes, or
a handler that fails, is counted and dropped; another part's topics are
subscribed and it hears of each connection; the retained status goes out on
connecting and the offline status on closing.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.local import LocalBroker
from edge.session import Listener, NodeSession, payload_only
from fedbell.errors import RejectedMessage
from tests.mqtt_helpers import Probe, wait_until
from tests.test_edge_node import DEVICE, aggregator_at, make_config

Received = list[tuple[str, bytes]]


def make_session(tmp_path: Path, broker: LocalBroker, counters: Counter[str]) -> NodeSession:
    return NodeSession(
        make_config(tmp_path, broker.port, tmp_path / "gallery"),
        counters,
        status=lambda state: f'{{"state": "{state}"}}'.encode(),
        summary=lambda: "a test doorbell",
    )


@pytest.fixture
def counters() -> Counter[str]:
    return Counter()


@pytest.fixture
def session(tmp_path: Path, broker: LocalBroker, counters: Counter[str]) -> Iterator[NodeSession]:
    made = make_session(tmp_path, broker, counters)
    yield made
    made.close()


def test_routed_topics_reach_their_handlers_and_the_rest_is_counted(
    session: NodeSession, broker: LocalBroker, counters: Counter[str]
) -> None:
    received: Received = []
    rounds = session.topics.round

    def refuse(payload: bytes) -> None:
        raise RejectedMessage("bad_global", payload.decode())

    def fail(_topic: str, _payload: bytes) -> None:
        raise ZeroDivisionError

    session.route(rounds, payload_only(lambda payload: received.append((rounds, payload))))
    session.route(session.topics.backbone_chunks, lambda t, p: received.append((t, p)))
    session.route(session.topics.global_model, payload_only(refuse))
    session.route(session.topics.tflite_model, fail)
    session.start()
    wait_until(session.subscribed.is_set, 10)
    chunk = session.topics.backbone_chunk(3)
    with aggregator_at(broker) as aggregator:
        aggregator.publish(rounds, b"")  # a cleared retained message: nothing to handle
        aggregator.publish(rounds, b"round 1")
        aggregator.publish(chunk, b"chunk 3")
        aggregator.publish(session.topics.global_model, b"forged")
        aggregator.publish(session.topics.tflite_model, b"boom")
        wait_until(lambda: len(received) == 2 and sum(counters.values()) == 2, 10)
    assert received == [(rounds, b"round 1"), (chunk, b"chunk 3")]
    assert counters == {"bad_global": 1, "handler_error": 1}
    # A message on a topic the session never routed (a subscription its persistent
    # session kept from an older release, say): dropped and counted, never fatal.
    stray = session.topics.update("elsewhere")
    with aggregator_at(broker) as aggregator:
        aggregator.publish(stray, b"not ours", retain=True)
    session.client.subscribe(stray, qos=1)
    wait_until(lambda: counters["unexpected_topic"] == 1, 10)
    assert session.network_problem(limit_s=60) is None


def test_status_on_connect_listeners_and_offline_status_on_close(
    session: NodeSession, broker: LocalBroker
) -> None:
    heard = threading.Event()
    listener_topic = f"doorbell/{DEVICE}/command"
    received: list[bytes] = []
    session.add_listener(Listener(lambda: [(listener_topic, 1)], heard.set))
    # The listener routes its own messages, as edge/events.py does.
    session.client.message_callback_add(
        listener_topic, lambda _client, _userdata, message: received.append(bytes(message.payload))
    )
    with aggregator_at(broker, session.status_topic) as aggregator:
        session.start()
        wait_until(session.subscribed.is_set, 10)
        assert heard.is_set()
        online = aggregator.wait_for(session.status_topic, 10)
        assert online.payload == b'{"state": "online"}'
        aggregator.publish(listener_topic, b"ring")
        wait_until(lambda: received == [b"ring"], 10)
        session.close()
        offline = aggregator.wait_for(session.status_topic, 10)
        assert offline.payload == b'{"state": "offline"}'
    late = Probe(broker.port, session.status_topic)
    try:
        kept = late.wait_for(session.status_topic, 10)
        assert kept.retain
        assert kept.payload == b'{"state": "offline"}'
    finally:
        late.close()
