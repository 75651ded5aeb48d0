"""The operator console (console/) in a real browser, against a real federation.

Debian's chromium (installed by `make deps`), driven by Playwright, opens the
page the broker serves on its websockets listener; a real Mosquitto, a real
aggregator and two real doorbell processes run the rounds the page starts.
The ACL tests run the production broker configuration (TLS websockets) of a
provisioned site: only the operator's login reads or presses anything there.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.local import LocalBroker
from broker.secure import SecureBroker
from console import VENDORED_CLIENT, page_url, start_round_line
from console.schema import SCHEMA_FILE
from console.schema import script as schema_script
from edge.events import VisitorEvent, now_iso
from fedbell.wire.protocol import DeviceStatus, Reply, RoundMetrics, to_json
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import Probe
from tests.test_broker_acl import provision_site

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM = shutil.which("chromium")
REPORTS = Path(__file__).resolve().parents[1] / "reports"
NODE_KEEPALIVE_S = 5  # node_process's mqtt.keepalive: the broker gives up after 1.5x
DOORS = ("door1", "door2")
SITE = "test"  # the site the aggregator and doorbell helpers of tests.test_faults configure
TOPICS = Topics(SITE)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium: `make deps` as root installs it"
)


@pytest.fixture(scope="module")
def vendored() -> None:
    assert VENDORED_CLIENT.is_file(), f"{VENDORED_CLIENT} missing: run `make deps`"


@pytest.fixture
def browser(vendored: None) -> Iterator[Any]:
    assert CHROMIUM is not None
    with playwright_api.sync_playwright() as playwright:
        # The system chromium, never one of Playwright's downloads; no sandbox as root.
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture
def federation(
    tmp_path: Path, broker: LocalBroker, aggregator_cache: Path
) -> Iterator[dict[str, Any]]:
    """The aggregator and two doorbells as processes, stopped whatever happened.

    Started with the fault tests' helpers, which follow the learning core's
    configuration; imported here so that the page's other tests do not depend
    on the learning core at all.
    """
    from simulation.data import write_synthetic
    from tests.test_aggregator import SITE as HELPERS_SITE
    from tests.test_faults import aggregator_process, node_process

    assert HELPERS_SITE == SITE
    gallery = tmp_path / "gallery"
    write_synthetic(gallery, persons=3, photos=4, seed=5)
    porch = tmp_path / "porch"
    write_porch(porch, seed=5)
    doorbell_settings = {
        # A replay on a loop: resident person00 walks up, then an empty porch.
        "camera": {"kind": "folder", "folder": str(porch), "fps": 2, "loop": True},
        # A replay's defaults make every visit an event. Generated faces all look alike to
        # dlib's network: at 0.5 the nearest resident is named, which is all the page needs.
        "recognition": {"confirm_frames": 2, "threshold": 0.5},
    }
    processes = {
        # The gallery as held-out set too: each version gets an accuracy to show.
        "aggregator": aggregator_process(
            tmp_path, broker.port, aggregator_cache, evaluation=gallery, timeout_s=60
        )
    }
    processes.update(
        {
            door: node_process(tmp_path, broker.port, door, gallery, **doorbell_settings)
            for door in DOORS
        }
    )
    try:
        processes["aggregator"].start().wait_log("ready: site", timeout=300)
        for door in DOORS:
            processes[door].start()
        yield processes
    finally:
        for process in processes.values():
            process.stop()


def write_porch(folder: Path, seed: int) -> None:
    """Numbered porch frames: write_synthetic's person00 at the door, then nobody."""
    from fedbell.faces.synthetic import make_identities, make_scene, render_face

    rng = np.random.default_rng(seed + 7)
    resident = make_identities(3, seed)[0]  # write_synthetic's person00 (same seed)
    folder.mkdir(parents=True)
    for index in range(10):
        faces = [render_face(resident, rng, 96)] if index < 4 else []
        assert cv2.imwrite(str(folder / f"{index:03d}.png"), make_scene(faces, rng).frame)


OUTSIDE = """() => {
  // What a person would miss: a table (or any of its cells) wider than its card, or
  // anything reaching past the window's right edge.
  const problems = [];
  const width = document.documentElement.clientWidth;
  if (document.documentElement.scrollWidth > width) {
    problems.push(`page ${document.documentElement.scrollWidth} px wide in ${width} px`);
  }
  for (const table of document.querySelectorAll("table")) {
    const card = table.closest("section").getBoundingClientRect();
    for (const box of [table, ...table.querySelectorAll("th, td")]) {
      const r = box.getBoundingClientRect();
      if (r.width === 0 && r.height === 0) continue; // not shown (a phone hides headings)
      if (r.left < card.left - 0.5 || r.right > card.right + 0.5) {
        problems.push(`${table.id} ${box.tagName} "${box.textContent}" ` +
          `${r.left.toFixed(0)}-${r.right.toFixed(0)} outside ${card.left.toFixed(0)}-` +
          `${card.right.toFixed(0)}`);
      }
    }
  }
  for (const node of document.querySelectorAll("body *")) {
    const r = node.getBoundingClientRect();
    if (r.width > 0 && r.right > width + 0.5) {
      problems.push(`${node.tagName}#${node.id} ends at ${r.right.toFixed(0)} of ${width}`);
    }
  }
  return problems;
}"""


def shown_visit(
    page: Any, device: str, visits: Probe, events: list[dict[str, Any]]
) -> dict[str, Any]:
    """The visit the page shows first for `device`, matched to the doorbell's own event
    (`events`: what `visits` heard so far; it is extended)."""
    row = page.locator(f'#visitors [data-device="{device}"] li.visit').first
    expect(row.locator(".person")).to_have_text(re.compile(r"^person\d\d$"), timeout=120_000)
    shown = {
        part: row.locator(f".{part}").inner_text() for part in ("time", "person", "confidence")
    }
    deadline = time.monotonic() + 10  # the probe may hear the event after the page
    while time.monotonic() < deadline:
        while not visits.messages.empty():
            message = visits.messages.get_nowait()
            if message.topic == f"doorbell/{device}/visitor":
                events.append(json.loads(message.payload))
        for event in events:
            clock = page.evaluate("(t) => new Date(t).toLocaleTimeString()", event["time"])
            sent = (clock, event["person"], f"{event['confidence']:.2f}")
            if sent == (shown["time"], shown["person"], shown["confidence"]):
                return event
        time.sleep(0.2)
    raise AssertionError(f"the page shows {shown}, which {device} did not send: {events[-5:]}")


def look_at_sizes(page: Any, visits: Probe) -> None:
    """At a desktop's and a phone's size: the visits as sent, no error, nothing cut off."""
    events: list[dict[str, Any]] = []
    for width, height in ((1400, 900), (390, 844)):
        page.set_viewport_size({"width": width, "height": height})
        event = shown_visit(page, "door1", visits, events)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT[\d:.]+Z", event["time"])  # ISO-8601, as sent
        expect(page.locator("#visitors .error")).to_have_count(0)
        assert page.evaluate(OUTSIDE) == [], f"at {width}x{height}"
        REPORTS.mkdir(exist_ok=True)
        page.screenshot(path=str(REPORTS / f"console-{width}.png"), full_page=True)


def doorbell(page: Any, device: str, cell: str) -> Any:
    return page.locator(f'#doorbells tr[data-device="{device}"] .{cell}')


def test_the_console_drives_a_real_federation(
    broker: LocalBroker, federation: dict[str, Any], browser: Any
) -> None:
    control = Probe(broker.port, TOPICS.control, TOPICS.metrics)
    visits = Probe(broker.port, "doorbell/+/visitor")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    try:
        page.goto(page_url("127.0.0.1", broker.ws_port, SITE, mqtt_port=broker.port))
        expect(page.locator("#connection")).to_have_text("connected")
        for door in DOORS:  # their retained statuses, then live ones
            expect(doorbell(page, door, "state")).to_have_text("online", timeout=90_000)
            expect(doorbell(page, door, "model")).to_have_text("v0", timeout=30_000)
        expect(page.locator("#aggregator")).to_contain_text("online")

        page.click("#start-round")
        # Exactly what the mosquitto_pub line in the README (and `make demo`) sends.
        assert control.wait_for(TOPICS.control, 10).payload == b'{"cmd":"start_round"}'
        # ...to this broker: pasted in a shell, the line does what the button did.
        expect(page.locator("#sent")).to_have_text(start_round_line("127.0.0.1", broker.port, SITE))
        expect(page.locator("#round-body .round-id")).to_have_text("1")
        expect(page.locator("#round-body .deadline")).to_contain_text("deadline")
        expect(page.locator("#reply")).to_contain_text("done start_round")
        expect(page.locator("#version")).to_have_text("v1", timeout=120_000)
        expect(page.locator("#accuracy")).to_have_text(re.compile(r"\d{1,3}\.\d %"))
        expect(page.locator("#round-body .phase")).to_have_text("closed")
        expect(page.locator("#round-body .deadline")).to_have_count(0)  # nothing to wait for
        metrics = RoundMetrics.model_validate_json(control.wait_for(TOPICS.metrics, 10).payload)
        row = page.locator("#rounds tbody tr").first
        for column, sent in ((6, metrics.bytes_up), (7, metrics.bytes_down)):  # kB: 1000 B
            expect(row.locator(f"td:nth-child({column})")).to_have_text(f"{sent / 1000:.1f} kB")
        for door in DOORS:
            expect(doorbell(page, door, "update")).to_contain_text("round 1: accepted")
            expect(doorbell(page, door, "model")).to_have_text("v1", timeout=30_000)
        expect(page.locator("#rounds tbody tr")).to_have_count(1)

        # The visits the doorbells' cameras saw, as they sent them (ISO-8601 times).
        expect(page.locator('#visitors [data-device="door1"] li.visit').first).to_be_visible(
            timeout=120_000
        )
        look_at_sizes(page, visits)
        page.set_viewport_size({"width": 1280, "height": 900})

        # Commands the aggregator refuses: the reason is on the page, not only in its log.
        control.publish(TOPICS.control, b'{"cmd": "start_round", "rounds": "many"}')
        expect(page.locator("#reply")).to_contain_text("refused (unreadable command): bad_json")
        page.click("#aggregate")
        expect(page.locator("#reply")).to_contain_text("refused aggregate: bad_state")
        while not control.messages.empty():
            control.messages.get_nowait()
        page.fill("#auto-rounds", "0")  # not "auto 1": nothing is sent
        page.click("#auto")
        expect(page.locator("#reply")).to_contain_text("nothing sent")
        time.sleep(1.0)
        assert [m.topic for m in list(control.messages.queue)] == []

        # A doorbell dies: its last will reaches the page within the keepalive window.
        killed_at = time.monotonic()
        federation["door2"].kill()
        expect(doorbell(page, "door2", "state")).to_have_text(
            "offline", timeout=1000 * 1.5 * NODE_KEEPALIVE_S
        )
        print(f"door2 shown offline {time.monotonic() - killed_at:.1f} s after SIGKILL")
        expect(doorbell(page, "door2", "model")).to_have_text("v1 (last seen)")
        expect(doorbell(page, "door1", "state")).to_have_text("online")
        REPORTS.mkdir(exist_ok=True)
        page.screenshot(path=str(REPORTS / "console.png"), full_page=True)
        assert errors == []
    finally:
        control.close()
        visits.close()
        page.close()


MALFORMED: dict[str, bytes] = {
    TOPICS.round: b'{"round": "one", "phase": 3}',
    TOPICS.metrics: b"\xff\xfe not even UTF-8",
    TOPICS.aggregator_status: b"[1, 2, 3]",
    TOPICS.reply: b'{"about": "command"}',
    TOPICS.status("door9"): b"{" * 5000,
    "doorbell/door1/visitor": b'{"person": 7}',
}


def test_malformed_retained_messages_are_errors_of_their_item_only(
    broker: LocalBroker, browser: Any
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
    return RoundMetrics(
        round=round_id,
        version=round_id,
        outcome="published",
        participants=1,
        examples=8,
        accuracy=0.75,
        bytes_up=3700,
        bytes_down=32500,
        seconds=1.5,
    )


def test_the_pages_schema_is_generated_from_the_producers_models() -> None:
    assert SCHEMA_FILE.read_text() == schema_script(), (
        "console/static/messages.js is stale: run `python -m console.schema`"
    )


def test_what_the_producers_send_is_what_the_page_reads(
    broker: LocalBroker, browser: Any, tmp_path: Path
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


def test_a_link_cannot_send_the_login_to_another_broker(broker: LocalBroker, browser: Any) -> None:
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


# ------------------------------------------------- production: TLS websockets + ACL


class WsLogin:
    """One login over the production broker's TLS websockets listener (MQTT v5)."""

    def __init__(self, root: Path, name: str, port: int) -> None:
        bundle = root / "clients" / name
        self.name = name
        self.connack: ReasonCode | None = None
        self.connected = threading.Event()
        self.received: list[tuple[str, bytes]] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.subacks = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"ws-{name}",
            protocol=mqtt.MQTTv5,
            transport="websockets",
        )
        self.client.ws_set_options(path="/mqtt")
        self.client.tls_set(
            ca_certs=str(bundle / "ca.crt"),
            certfile=str(bundle / "client.crt"),
            keyfile=str(bundle / "client.key"),
        )
        self.client.username_pw_set(name, (bundle / "mqtt-password").read_text())
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda _c, _u, m: self.received.append((m.topic, bytes(m.payload)))
        self.client.on_publish = lambda _c, _u, mid, rc, _p: self.pubacks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda *_: self.subacks.set()
        self.client.connect("localhost", port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(10), f"{name}: no CONNACK"
        assert self.connack is not None
        assert not self.connack.is_failure, self.connack

    def _on_connect(self, _c: Any, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack = rc
        self.connected.set()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


HOME = Topics("home")  # the site tests.test_broker_acl provisions
CONSOLE_TOPICS = (  # what console.js subscribes to
    HOME.round,
    HOME.metrics,
    HOME.aggregator_status,
    HOME.reply,
    HOME.all_statuses,
    "doorbell/+/visitor",
    "doorbell/+/ring",
    "doorbell/+/snapshot",
)


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, SecureBroker]]:
    root = tmp_path_factory.mktemp("site")
    provision_site(root)
    with SecureBroker(root / "broker", tmp_path_factory.mktemp("broker")) as running:
        yield root, running


def test_only_the_operator_reads_or_presses_anything_over_websockets(
    production: tuple[Path, SecureBroker],
) -> None:
    root, broker = production
    aggregator = WsLogin(root, "aggregator", broker.ws_port)
    door = WsLogin(root, "door1", broker.ws_port)
    logins = {name: WsLogin(root, name, broker.ws_port) for name in ("operator", "homeassistant")}
    logins["door1"] = door
    try:
        aggregator.client.subscribe(HOME.control, qos=1)
        for login in logins.values():
            login.client.subscribe([(topic, 1) for topic in CONSOLE_TOPICS])
        for login in [aggregator, *logins.values()]:
            assert login.subacks.wait(5)
        # What the console shows: the aggregator's reply and metrics, a doorbell's event.
        reply = b'{"about":"command","ok":true,"time":1,"cmd":"stop"}'
        aggregator.client.publish(HOME.reply, reply, qos=1)
        aggregator.client.publish(HOME.metrics, b'{"round":1}', qos=1)
        door.client.publish("doorbell/door1/visitor", b'{"person":"unknown"}', qos=1)
        # Every login presses "start round".
        mids = {
            name: login.client.publish(HOME.control, f"{name}>start".encode(), qos=1).mid
            for name, login in logins.items()
        }
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(mids[n] not in logins[n].pubacks for n in logins):
            time.sleep(0.02)
        time.sleep(1.0)  # anything still to be delivered arrives now or never
        pressed = {payload for _, payload in aggregator.received}
        assert pressed == {b"operator>start"}
        for name in ("door1", "homeassistant"):
            assert logins[name].pubacks[mids[name]].value == 0x87  # Not authorized
        seen = {name: {topic for topic, _ in login.received} for name, login in logins.items()}
        assert seen["operator"] == {
            HOME.reply,
            HOME.metrics,
            "doorbell/door1/visitor",
        }
        assert HOME.reply not in seen["door1"] | seen["homeassistant"]
        assert HOME.metrics not in seen["door1"] | seen["homeassistant"]
        assert HOME.control not in seen["door1"] | seen["homeassistant"]
    finally:
        for login in [aggregator, *logins.values()]:
            login.close()


def test_the_page_is_served_over_tls_to_client_certificates_only(
    production: tuple[Path, SecureBroker],
) -> None:
    root, broker = production
    bundle = root / "clients" / "operator"
    context = ssl.create_default_context(cafile=str(bundle / "ca.crt"))
    context.load_cert_chain(str(bundle / "client.crt"), str(bundle / "client.key"))
    https = http.client.HTTPSConnection("localhost", broker.ws_port, context=context, timeout=10)
    assert b"fedbell" in _get(https)
    https.close()

    anonymous = ssl.create_default_context(cafile=str(bundle / "ca.crt"))
    stranger = http.client.HTTPSConnection(
        "localhost", broker.ws_port, context=anonymous, timeout=10
    )
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.RemoteDisconnected)):
        _get(stranger)
    stranger.close()
    plain = http.client.HTTPConnection("localhost", broker.ws_port, timeout=10)
    with pytest.raises(
        (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine)
    ):
        _get(plain)
    plain.close()


def _get(connection: http.client.HTTPConnection) -> bytes:
    """GET the page; an HTTP error status fails the test."""
    connection.request("GET", "/index.html")
    response = connection.getresponse()
    assert response.status == 200
    return response.read()
