"""The operator console's page reading what the producers send, in a real browser.

Malformed retained messages are errors of their item only; the page's schema is
generated from the producers' models and reads what they send; a link cannot send
the login elsewhere. tests/test_console.py runs the page against a real federation
and the production broker.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker
from console import page_url, start_round_line
from console.schema import SCHEMA_FILE
from console.schema import script as schema_script
from edge.events import VisitorEvent, now_iso
from fedbell.wire.protocol import DeviceStatus, Reply, RoundMetrics, to_json
from tests.mqtt_helpers import Probe
from tests.test_console import (  # noqa: F401  (fixtures)
    REPORTS,
    SITE,
    TOPICS,
    browser,
    doorbell,
    expect,
    pytestmark,
    vendored,
)

MALFORMED: dict[str, bytes] = {
    TOPICS.round: b'{"round": "one", "phase": 3}',
    TOPICS.metrics: b"\xff\xfe not even UTF-8",
    TOPICS.aggregator_status: b"[1, 2, 3]",
    TOPICS.reply: b'{"about": "command"}',
    TOPICS.status("door9"): b"{" * 5000,
    "doorbell/door1/visitor": b'{"person": 7}',
}


def test_malformed_retained_messages_are_errors_of_their_item_only(
    broker: LocalBroker,
    browser: Any,  # noqa: F811
) -> None:
    writer = Probe(broker.port)
    good_status = DeviceStatus(state="online", model_version=4, gallery_size=9, detail="camera ok")
    good_metrics = metrics(4)
    try:
        writer.publish(TOPICS.status("door1"), to_json(good_status), retain=True)
        writer.publish(TOPICS.metrics, to_json(good_metrics), retain=True)
        for topic, payload in MALFORMED.items():  # retained: the page meets them on load
            writer.publish(topic, payload, retain=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(page_url("127.0.0.1", broker.ws_port, SITE))
        expect(page.locator("#connection")).to_have_text("connected")

        expect(page.locator("#round-body")).to_contain_text("malformed round message")
        expect(page.locator("#metrics-error")).to_contain_text("malformed metrics: not JSON")
        expect(page.locator("#aggregator")).to_contain_text("malformed status")
        expect(page.locator("#reply")).to_contain_text('malformed reply: no "ok"')
        expect(doorbell(page, "door9", "state")).to_contain_text("malformed status")
        expect(page.locator('#visitors [data-device="door1"] .error')).to_contain_text(
            "malformed visitor event"
        )
        # ...and everything else still shows and still updates.
        expect(doorbell(page, "door1", "state")).to_have_text("online")
        expect(doorbell(page, "door1", "model")).to_have_text("v4")
        writer.publish(TOPICS.metrics, to_json(metrics(5)))
        expect(page.locator("#version")).to_have_text("v5")
        expect(page.locator("#metrics-error")).to_be_hidden()
        event = VisitorEvent(
            event_type="unknown",
            event_id="e1",
            time=now_iso(),
            person="unknown",
            confidence=0.41,
            box=None,
        )
        writer.publish("doorbell/door1/visitor", event.model_dump_json())
        expect(page.locator('#visitors [data-device="door1"] .visit')).to_contain_text(
            "unknown, confidence 0.41"
        )
        offline = good_status.model_copy(update={"state": "offline"})
        writer.publish(TOPICS.status("door9"), to_json(offline))
        expect(doorbell(page, "door9", "state")).to_have_text("offline")
        REPORTS.mkdir(exist_ok=True)
        page.screenshot(path=str(REPORTS / "console-malformed.png"), full_page=True)
        assert errors == []
        page.close()
    finally:
        writer.close()


def metrics(round_id: int) -> RoundMetrics:
    """A round the aggregator published, as its metrics message reports it."""
    published = {"outcome": "published", "participants": 1, "examples": 8, "accuracy": 0.75}
    sizes = {"bytes_up": 3700, "bytes_down": 32500, "seconds": 1.5}
    return RoundMetrics.model_validate(
        {"round": round_id, "version": round_id, **published, **sizes}
    )


def test_the_pages_schema_is_generated_from_the_producers_models() -> None:
    assert SCHEMA_FILE.read_text() == schema_script(), (
        "console/static/messages.js is stale: run `python -m console.schema`"
    )


def test_what_the_producers_send_is_what_the_page_reads(
    broker: LocalBroker,
    browser: Any,  # noqa: F811
    tmp_path: Path,
) -> None:
    """A doorbell's real events, and the aggregator's messages as its models write them,
    through the page's own reader; and the shapes no producer sends are refused."""
    from edge.events import EventPublisher
    from edge.feedback import RecentCrops
    from edge.gallery import Gallery
    from edge.homeassistant import DoorbellTopics

    heard = Probe(broker.port, "doorbell/door1/#")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="door1", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    page = browser.new_page()
    try:
        publisher = EventPublisher(
            client,
            DoorbellTopics("door1"),
            TOPICS.status("door1"),
            RecentCrops(),
            Gallery(tmp_path / "g"),
            discovery=False,
        )
        publisher.visitor("alice", 0.91234, (1, 2, 3, 4))
        publisher.visitor("unknown", 0.4, None)
        publisher.ring("button")
        sent = [
            ("visitor", heard.wait_for("doorbell/door1/visitor", 5).payload),
            ("visitor", heard.wait_for("doorbell/door1/visitor", 5).payload),
            ("ring", heard.wait_for("doorbell/door1/ring", 5).payload),
            ("metrics", to_json(metrics(3))),
            ("status", to_json(DeviceStatus(state="online", model_version=2, detail="camera ok"))),
            ("reply", to_json(Reply(about="command", ok=True, time=time.time(), cmd="stop"))),
        ]
        page.goto(page_url("127.0.0.1", broker.ws_port, SITE))
        for kind, payload in sent:
            data = json.loads(payload)
            read = page.evaluate("([kind, data]) => read(kind, data)", [kind, data])
            assert {k: v for k, v in read.items() if k in data} == data, kind
        refused = page.evaluate(
            """(data) => { try { read("visitor", data); return null; }
                           catch (err) { return err.message; } }""",
            {
                "event_type": "unknown",
                "event_id": "e1",
                "time": time.time(),  # what the page once expected
                "person": "unknown",
                "confidence": 0.4,
                "box": None,
            },
        )
        assert refused == '"time" is not an ISO-8601 time'  # a doorbell never sends a number
    finally:
        page.close()
        client.loop_stop()
        client.disconnect()
        heard.close()


def test_the_gallery_line_says_what_to_do() -> None:
    from edge.artifacts import gallery_summary
    from edge.gallery import GalleryFeatures

    gallery = GalleryFeatures(
        persons=("ann", "bob", "cy"),
        labels=np.array([0, 0, 0, 1, 2, 2], np.int64),
        features=np.zeros((6, 4), np.float32),
        files=tuple(f"p/{i}.png" for i in range(6)),
        backbone="b" * 64,
        skipped=("cy/blurred.png",),
    )
    assert gallery_summary(gallery, 0.75) == (
        "3 people, 6 photos; 2 with fewer than 3 photos: enroll more; "
        "1 photo without a usable face; 25% of photos look more like someone else"
    )
    assert "ann" not in gallery_summary(gallery, None)  # the status leaves the house
    single = GalleryFeatures(
        ("ann",), np.zeros(3, np.int64), np.zeros((3, 4), np.float32), ("a", "b", "c"), "b" * 64
    )
    assert gallery_summary(single, 1.0) == "1 person, 3 photos"


def test_a_link_cannot_send_the_login_to_another_broker(
    broker: LocalBroker,
    browser: Any,  # noqa: F811
) -> None:
    """`?broker=` once pointed the login form anywhere: the page now logs in only to the
    broker that served it, whatever the link says."""
    elsewhere = socket.create_server(("127.0.0.1", 0))
    elsewhere.settimeout(0.2)
    other = f"ws://127.0.0.1:{elsewhere.getsockname()[1]}/mqtt"
    page = browser.new_page()
    try:
        page.goto(f"{page_url('127.0.0.1', broker.ws_port, SITE)}&broker={quote(other)}")
        expect(page.locator("#connection")).to_have_text("connected")
        own = f"ws://127.0.0.1:{broker.ws_port}/mqtt"
        expect(page.locator("#broker-url")).to_have_value(own)
        assert page.locator("#broker-url").get_attribute("readonly") is not None
        page.fill("#username", "operator")
        page.fill("#password", "secret")
        page.click("#connect")  # the local broker is anonymous: the login is accepted
        expect(page.locator("#connection")).to_have_text("connected")
        with pytest.raises(TimeoutError):
            elsewhere.accept()  # nothing ever knocked at the other address
    finally:
        page.close()
        elsewhere.close()


def test_start_round_line_is_what_the_button_sends() -> None:
    line = start_round_line("127.0.0.1", 1883, "sim")
    assert line == (
        "mosquitto_pub -h 127.0.0.1 -p 1883 -q 1 -t fedbell/sim/control "
        '-m \'{"cmd":"start_round"}\''
    )
    assert page_url("hub.lan", 8443, "home", tls=True) == "https://hub.lan:8443/?site=home"
