"""The production broker configuration, tested against a real Mosquitto.

A throwaway site is provisioned in tmp_path with deploy.provision (CA, broker
certificate, passwords, ACL), Mosquitto is started with broker/production.conf
on a free port, and every role tries every (topic x publish/subscribe) pair
over TLS with MQTT v5. The expected matrix below is written from the topic
contract (DESIGN.md / issue 4), independently of deploy/acl.py, so a mistake
in either shows up as a difference.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from broker.local import find_mosquitto
from broker.secure import SecureBroker
from deploy import pki, provision
from tests.mqtt_helpers import wait_until

SITE = "home"
BASE = f"fedbell/{SITE}"
DEVICES = ("door1", "door2")
ROLES = ("door1", "door2", "aggregator", "operator", "homeassistant")
OUT = ("visitor", "ring", "present", "snapshot")
IN = ("command", "label")
SECAGG = ("keys", "shares", "masked", "unmask")
"""What a doorbell publishes in a secure round (issue 22); the aggregator routes each
doorbell's shares from the others to secagg/inbox/<device>."""
QUIET = 1.0  # one shared wait for messages that must never arrive


# ------------------------------------------------------------ the contract


def topics() -> list[str]:
    found = [
        f"{BASE}/{leaf}"
        for leaf in (
            "control",
            "round",
            "model/global",
            "model/tflite",
            "model/tflite/0",
            "metrics",
            "aggregator/status",
            "aggregator/reply",
        )
    ]
    for device in DEVICES:
        found += [f"{BASE}/update/{device}", f"{BASE}/status/{device}"]
        found += [f"{BASE}/secagg/{leaf}/{device}" for leaf in SECAGG]
        found.append(f"{BASE}/secagg/inbox/{device}")
        found += [f"doorbell/{device}/{leaf}" for leaf in (*OUT, *IN)]
        found.append(f"homeassistant/device/{device}/config")
    found.append("homeassistant/status")
    return found


def allowed(role: str, action: str, topic: str) -> bool:  # noqa: PLR0911 - one rule a line
    """The contract: may `role` publish ("pub") or subscribe ("sub") to `topic`?"""
    parts = topic.split("/")
    pub = action == "pub"
    if role in DEVICES:
        me = role
        if topic in (
            f"{BASE}/update/{me}",
            f"{BASE}/status/{me}",
            f"homeassistant/device/{me}/config",
            *(f"{BASE}/secagg/{leaf}/{me}" for leaf in SECAGG),
        ):
            return pub
        if topic == f"{BASE}/secagg/inbox/{me}":
            return not pub  # only its own inbox: the shares the others encrypted for it
        if topic in (
            f"{BASE}/round",
            f"{BASE}/model/global",
            f"{BASE}/model/tflite",
            f"{BASE}/model/tflite/0",
            "homeassistant/status",
        ):
            return not pub
        if parts[:2] == ["doorbell", me]:
            return pub == (parts[2] in OUT)
        return False
    if role == "aggregator":
        if topic in (
            f"{BASE}/round",
            f"{BASE}/model/global",
            f"{BASE}/model/tflite",
            f"{BASE}/model/tflite/0",
            f"{BASE}/metrics",
            f"{BASE}/aggregator/status",
            f"{BASE}/aggregator/reply",
        ):
            return pub
        if topic == f"{BASE}/control" or topic.startswith((f"{BASE}/update/", f"{BASE}/status/")):
            return not pub
        if topic.startswith(f"{BASE}/secagg/inbox/"):
            return pub  # routes the shares; reads nobody's inbox
        if topic.startswith(f"{BASE}/secagg/"):
            return not pub
        return False
    if role == "operator":
        if topic == f"{BASE}/control":
            return pub
        # What the console (console/) shows: the federation's state and the replies
        # to its commands, and each doorbell's events (not its `present` state).
        if topic in (
            f"{BASE}/metrics",
            f"{BASE}/aggregator/status",
            f"{BASE}/aggregator/reply",
            f"{BASE}/round",
        ) or topic.startswith(f"{BASE}/status/"):
            return not pub
        if parts[0] == "doorbell" and parts[2] in IN:
            return pub
        if parts[0] == "doorbell" and parts[2] in ("visitor", "ring", "snapshot"):
            return not pub
        return False
    assert role == "homeassistant"
    if topic.startswith(f"{BASE}/status/"):
        return not pub  # doorbell availability: the status topic carries the last will
    if parts[0] == "doorbell":
        return not pub or parts[2] in IN  # reads them all, writes command/label
    if topic == "homeassistant/status":
        return True  # its own birth/will message, which it also reads
    if parts[0] == "homeassistant":
        return not pub
    return False


# ------------------------------------------------------------------ probes


@dataclass
class Probe:
    """One MQTT v5 client over TLS that records what the broker answers."""

    name: str
    client: mqtt.Client
    connected: threading.Event = field(default_factory=threading.Event)
    disconnected: threading.Event = field(default_factory=threading.Event)
    connack: ReasonCode | None = None
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    received: list[tuple[str, bytes]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @classmethod
    def create(
        cls,
        name: str,
        port: int,
        *,
        password: str | None,
        ca: Path,
        cert: Path | None,
        key: Path | None,
        username: str | None = None,
        tls: bool = True,
        client_id: str | None = None,
    ) -> Probe:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id if client_id is not None else f"probe-{name}",
            protocol=mqtt.MQTTv5,
        )
        probe = cls(name, client)
        if username is not None or password is not None:
            client.username_pw_set(username if username is not None else name, password)
        if tls:
            client.tls_set(
                ca_certs=str(ca),
                certfile=str(cert) if cert else None,
                keyfile=str(key) if key else None,
            )
        client.on_connect = probe._on_connect
        client.on_disconnect = probe._on_disconnect
        client.on_subscribe = probe._on_subscribe
        client.on_publish = probe._on_publish
        client.on_message = probe._on_message
        probe.port = port
        return probe

    def start(self) -> Probe:
        """Connect (TLS handshake now, CONNACK in the loop thread)."""
        try:
            self.client.connect("localhost", self.port, keepalive=30)
        except (ssl.SSLError, OSError):
            self.disconnected.set()
            return self
        self.client.loop_start()
        return self

    def wait_connack(self, timeout: float = 5.0) -> bool:
        """True if the broker accepted the login."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.connected.is_set() or self.disconnected.is_set():
                break
            time.sleep(0.01)
        return self.connack is not None and not self.connack.is_failure

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Any) -> None:
        self.connack = rc
        self.connected.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, _rc: ReasonCode, _p: Any) -> None:
        self.disconnected.set()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, codes: list[ReasonCode], _p: Any
    ) -> None:
        with self.lock:
            self.subacks[mid] = codes

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, rc: ReasonCode, _p: Any) -> None:
        with self.lock:
            self.pubacks[mid] = rc

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.received.append((message.topic, bytes(message.payload)))


# ---------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class RunningSite:
    root: Path
    broker: SecureBroker

    def bundle(self, name: str) -> Path:
        return self.root / "clients" / name

    def password(self, name: str) -> str:
        return (self.bundle(name) / "mqtt-password").read_text()

    def probe(self, name: str, port: int | None = None, **overrides: Any) -> Probe:
        """`name`'s login from its bundle, to the site's broker or the one on `port`."""
        bundle = self.bundle(name)
        options: dict[str, Any] = {
            "password": self.password(name),
            "ca": bundle / "ca.crt",
            "cert": bundle / "client.crt",
            "key": bundle / "client.key",
        }
        options.update(overrides)
        return Probe.create(name, port or self.broker.port, **options)


def provision_site(root: Path) -> None:
    def run(*args: str) -> None:
        provision.run([*args, "--site-dir", str(root)])

    run("init", "--site", SITE, "--broker-host", "localhost")
    run("add-aggregator", "--no-reload")
    for device in DEVICES:
        run("add-device", device, "--no-reload")
    run("add-operator", "--no-reload")
    run("add-homeassistant", "--no-reload")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSite]:
    find_mosquitto()
    root = tmp_path_factory.mktemp("site")
    provision_site(root)
    broker = SecureBroker(root / "broker", tmp_path_factory.mktemp("broker"))
    with broker:
        yield RunningSite(root, broker)


# ------------------------------------------------------------------- tests


def test_every_role_topic_and_action_matches_the_contract(site: RunningSite) -> None:
    probes = {role: site.probe(role).start() for role in ROLES}
    try:
        for probe in probes.values():
            assert probe.wait_connack(), f"{probe.name} could not log in: {probe.connack}"
        all_topics = topics()

        # Subscribe every role to every exact topic, one SUBSCRIBE each.
        sub_mid: dict[tuple[str, str], int] = {}
        for role, probe in probes.items():
            for topic in all_topics:
                _, mid = probe.client.subscribe(topic, qos=1)
                assert mid is not None
                sub_mid[role, topic] = mid
        wait_until(
            lambda: all(len(p.subacks) == len(all_topics) for p in probes.values()), 5, "SUBACKs"
        )

        # Every role publishes a recognisable payload to every topic.
        pub_mid: dict[tuple[str, str], int] = {}
        for role, probe in probes.items():
            for topic in all_topics:
                info = probe.client.publish(topic, f"{role}>{topic}".encode(), qos=1)
                pub_mid[role, topic] = info.mid
        wait_until(
            lambda: all(len(p.pubacks) == len(all_topics) for p in probes.values()), 5, "PUBACKs"
        )
        time.sleep(QUIET)  # anything still to be delivered arrives now or never

        received = {role: list(p.received) for role, p in probes.items()}
        delivered = {payload for messages in received.values() for _, payload in messages}
        got_topic = {role: {topic for topic, _ in messages} for role, messages in received.items()}

        rows: list[str] = []
        unexpected_allow: list[str] = []
        unexpected_deny: list[str] = []
        for topic in all_topics:
            cells = []
            for role in ROLES:
                probe = probes[role]
                suback = probe.subacks[sub_mid[role, topic]][0]
                can_sub = not suback.is_failure and topic in got_topic[role]
                puback = probe.pubacks[pub_mid[role, topic]]
                can_pub = not puback.is_failure and f"{role}>{topic}".encode() in delivered
                cell = ""
                for action, actual, code in (("pub", can_pub, puback), ("sub", can_sub, suback)):
                    expect = allowed(role, action, topic)
                    cell += action[0].upper() if actual else "-"
                    what = f"{role} {action} {topic} (reason {code}, delivered={actual})"
                    if actual and not expect:
                        unexpected_allow.append(what)
                        cell += "!"
                    elif expect and not actual:
                        unexpected_deny.append(what)
                        cell += "?"
                cells.append(f"{cell:5}")
            rows.append(f"{topic:38} " + " ".join(cells))
        header = f"{'topic':38} " + " ".join(f"{role[:5]:5}" for role in ROLES)
        checks = len(all_topics) * len(ROLES) * 2
        print(
            "\nACL matrix (P = publish delivered, S = subscription receives; "
            "! unexpected allow, ? unexpected denial)"
        )
        print("\n".join([header, *rows]))
        print(
            f"{checks} checks: {len(unexpected_allow)} unexpected allows, "
            f"{len(unexpected_deny)} unexpected denials"
        )

        # A denied publish is reported to an MQTT v5 client (PUBACK 0x87 Not
        # authorized), not silently dropped. Mosquitto 2.0 grants every
        # SUBSCRIBE and filters on delivery: a denied read is "never delivered".
        denied_codes = {
            probes[r].pubacks[pub_mid[r, t]].value
            for r in ROLES
            for t in all_topics
            if not allowed(r, "pub", t)
        }
        denied_subs = {
            probes[r].subacks[sub_mid[r, t]][0].value
            for r in ROLES
            for t in all_topics
            if not allowed(r, "sub", t)
        }
        print(
            f"reason codes for denied publishes: {sorted(map(hex, denied_codes))}, "
            f"SUBACK codes for denied subscriptions: {sorted(map(hex, denied_subs))}"
        )
        assert unexpected_allow == []
        assert unexpected_deny == []
        assert denied_codes == {0x87}
    finally:
        for probe in probes.values():
            probe.stop()


def test_a_subscription_to_everything_leaks_nothing(site: RunningSite) -> None:
    """Mosquitto 2.0 grants every SUBSCRIBE (SUBACK 0x01 even where the ACL
    says no) and enforces read access per message on delivery: so each role
    subscribes to `#` and must receive exactly the topics it may read."""
    probes = {role: site.probe(role).start() for role in ROLES}
    try:
        for probe in probes.values():
            assert probe.wait_connack()
            probe.client.subscribe("#", qos=1)
        wait_until(lambda: all(len(p.subacks) == 1 for p in probes.values()), 5, "SUBACKs")
        all_topics = topics()
        for topic in all_topics:
            writer = next(role for role in ROLES if allowed(role, "pub", topic))
            probes[writer].client.publish(topic, b"x", qos=1)
        wait_until(
            lambda: sum(len(p.pubacks) for p in probes.values()) == len(all_topics), 5, "PUBACKs"
        )
        time.sleep(QUIET)
        for role, probe in probes.items():
            got = {topic for topic, _ in probe.received}
            may_read = {topic for topic in all_topics if allowed(role, "sub", topic)}
            assert got == may_read, f"{role}: leaked {got - may_read}, missed {may_read - got}"
    finally:
        for probe in probes.values():
            probe.stop()


def test_logins_without_the_right_credentials_are_refused(
    site: RunningSite, tmp_path: Path
) -> None:
    # A certificate from another CA: right password, wrong issuer.
    stranger = pki.create_ca("elsewhere")
    pki.save(stranger, tmp_path / "other-ca.crt", tmp_path / "other-ca.key")
    fake = pki.issue(stranger, "door1", "device")
    pki.save(fake, tmp_path / "fake.crt", tmp_path / "fake.key")
    door1 = site.bundle("door1")
    attempts = {
        "wrong password": site.probe("door1", password="not-the-password"),
        "another device's password": site.probe("door1", password=site.password("door2")),
        "unknown user": site.probe("door1", username="door9"),
        "no user name": site.probe("door1", username=None, password=None),
        "certificate from another CA": site.probe(
            "door1", cert=tmp_path / "fake.crt", key=tmp_path / "fake.key"
        ),
        "no client certificate": site.probe("door1", cert=None, key=None),
        "broker not trusted (other CA)": site.probe("door1", ca=tmp_path / "other-ca.crt"),
        "plain TCP, no TLS": site.probe("door1", tls=False),
    }
    control = site.probe("door1")
    assert door1.exists()
    for probe in [*attempts.values(), control]:
        probe.start()
    try:
        results = {why: probe.wait_connack(timeout=3) for why, probe in attempts.items()}
        for why, probe in attempts.items():
            print(f"{why:32} accepted={results[why]} connack={probe.connack}")
        assert not any(results.values()), results
        assert control.wait_connack(), "the right credentials must still work"
    finally:
        for probe in [*attempts.values(), control]:
            probe.stop()


def test_chunk_sized_messages_pass_and_a_login_cannot_park_more(site: RunningSite) -> None:
    """Issue 18 item 5: the backbone goes in 512 KiB chunks, so the broker takes at
    most 1 MiB a message from anyone; a doorbell used to park 60 MiB per topic."""
    aggregator = site.probe("aggregator").start()
    door = site.probe("door1").start()
    reader = site.probe("homeassistant").start()
    try:
        assert aggregator.wait_connack()
        assert door.wait_connack()
        assert reader.wait_connack()
        door.client.subscribe(f"{BASE}/model/tflite/+", qos=1)
        reader.client.subscribe([("doorbell/door1/#", 1), ("homeassistant/#", 1)])
        wait_until(lambda: len(door.subacks) == 1 and len(reader.subacks) == 1, 5, "SUBACK")
        chunk = b"m" * (512 * 1024)  # a backbone chunk (fedbell.wire.backbone.CHUNK_BYTES)
        aggregator.client.publish(f"{BASE}/model/tflite/0", chunk, qos=1)
        wait_until(lambda: len(door.received) == 1, 20, "a 512 KiB chunk")
        aggregator.client.publish(f"{BASE}/model/tflite/1", b"x" * (1024 * 1024 + 1), qos=1)
        # The doorbell tries to park 2 MiB on each topic it may write, then 1000 KiB.
        writable = [f"doorbell/door1/{leaf}" for leaf in OUT]
        writable += [f"{BASE}/status/door1", "homeassistant/device/door1/config"]
        for topic in writable:
            door.client.publish(topic, b"p" * (2 * 1024 * 1024), qos=1, retain=True)
        # Over max_packet_size the broker drops the connection (MQTT v5 clients were
        # told the limit in CONNACK); nothing was delivered or retained.
        wait_until(door.disconnected.is_set, 10, "the doorbell disconnected")
        time.sleep(QUIET)
        assert [len(payload) for _, payload in door.received] == [len(chunk)]
        assert reader.received == []
        again = site.probe("door1").start()
        assert again.wait_connack()
        for topic in writable:
            again.client.publish(topic, b"q" * (1000 * 1024), qos=1, retain=True)
        wait_until(lambda: len(reader.received) == len(writable) - 1, 20, "1000 KiB messages")
        again.stop()
    finally:
        for probe in (aggregator, door, reader):
            probe.stop()
    # What stays retained for the next subscriber: at most 1 MiB per writable topic.
    late = site.probe("homeassistant").start()
    try:
        assert late.wait_connack()
        late.client.subscribe([("doorbell/door1/#", 1), ("homeassistant/#", 1)])
        wait_until(lambda: len(late.received) >= len(writable) - 1, 20, "retained messages")
        parked = sum(len(payload) for _, payload in late.received)
        print(f"retained by one doorbell login, as Home Assistant sees it: {parked} B")
        assert parked <= len(writable) * 1024 * 1024
    finally:
        late.stop()


def test_retained_model_survives_a_broker_restart(
    site: RunningSite, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Persistence is on and writable: a restarted broker still serves the model."""
    broker = SecureBroker(site.root / "broker", tmp_path_factory.mktemp("restart"))
    with broker:
        aggregator = site.probe("aggregator", broker.port).start()
        assert aggregator.wait_connack()
        aggregator.client.publish(f"{BASE}/model/global", b"model v7", qos=1, retain=True)
        wait_until(lambda: len(aggregator.pubacks) == 1, 5, "PUBACK")
        aggregator.stop()
    broker.start()  # same port and data folder
    try:
        door = site.probe("door1", broker.port).start()
        assert door.wait_connack()
        door.client.subscribe(f"{BASE}/model/global", qos=1)
        wait_until(lambda: len(door.received) == 1, 5, "the retained model")
        assert door.received == [(f"{BASE}/model/global", b"model v7")]
        door.stop()
    finally:
        broker.stop()


def test_a_login_cannot_take_over_another_clients_session(site: RunningSite) -> None:
    """Issue 13 item 3: client ids are bound to user names (`use_username_as_clientid`).

    door1 connects with the aggregator service's client id, then with door2's:
    neither is kicked off, and the aggregator keeps receiving what it subscribed to.
    """
    aggregator = site.probe("aggregator", client_id=f"fedbell-aggregator-{SITE}").start()
    door2 = site.probe("door2", client_id="door2").start()
    impostors = [
        site.probe("door1", client_id=f"fedbell-aggregator-{SITE}"),
        site.probe("door1", client_id="door2"),
    ]
    try:
        assert aggregator.wait_connack()
        assert door2.wait_connack()
        aggregator.client.subscribe(f"{BASE}/status/+", qos=1)
        wait_until(lambda: len(aggregator.subacks) == 1, 5, "SUBACK")
        for impostor in impostors:
            impostor.start()
            assert impostor.wait_connack(), impostor.connack  # as itself: door1
        # Both victims are still connected and served: a status door2 publishes
        # after the impostors logged in reaches the aggregator.
        door2.client.publish(f"{BASE}/status/door2", b"after the impostors", qos=1)
        wait_until(
            lambda: (f"{BASE}/status/door2", b"after the impostors") in aggregator.received,
            5,
            "the aggregator to receive door2's status",
        )
        assert not aggregator.disconnected.is_set(), "the aggregator's session was taken over"
        assert not door2.disconnected.is_set(), "door2's session was taken over"
    finally:
        for probe in (aggregator, door2, *impostors):
            probe.stop()
