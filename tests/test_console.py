"""The operator console (console/) in a real browser, against a real federation.

Debian's chromium (installed by `make deps`), driven by Playwright, opens the
page the broker serves on its websockets listener; a real Mosquitto, a real
aggregator and two real doorbell processes run the rounds the page starts.
The ACL tests run the production broker configuration (TLS websockets) of a
provisioned site: only the operator's login reads or presses anything there.
How the page reads each message: tests/test_console_messages.py.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.local import LocalBroker
from broker.secure import SecureBroker
from console import VENDORED_CLIENT, page_url, start_round_line
from fedbell.wire.protocol import RoundMetrics
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import Probe
from tests.test_broker_acl import provision_site

if TYPE_CHECKING:
    from tests.federation import Federation, Process

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
def doorbells(federation: Federation) -> dict[str, Process]:
    """The aggregator and two doorbells with cameras, as processes (the shared fixture).

    tests.federation is imported by the fixture only, so that the page's other tests do
    not depend on the learning core at all.
    """
    from simulation.data import write_synthetic
    from tests.test_aggregator import SITE as HELPERS_SITE

    assert HELPERS_SITE == SITE
    gallery = federation.root / "gallery"
    write_synthetic(gallery, persons=3, photos=4, seed=5)
    porch = federation.root / "porch"
    write_porch(porch, seed=5)
    doorbell_settings = {
        # A replay on a loop: resident person00 walks up, then an empty porch.
        "camera": {"kind": "folder", "folder": str(porch), "fps": 2, "loop": True},
        # A replay's defaults make every visit an event. Generated faces all look alike to
        # dlib's network: at 0.5 the nearest resident is named, which is all the page needs.
        "recognition": {"confirm_frames": 2, "threshold": 0.5},
    }
    # The gallery as held-out set too: each version gets an accuracy to show.
    federation.start_aggregator(evaluation=gallery, timeout_s=60)
    return {door: federation.start_doorbell(door, gallery, **doorbell_settings) for door in DOORS}


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
    broker: LocalBroker, doorbells: dict[str, Process], browser: Any
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
        doorbells["door2"].kill()
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
