"""Provisioning a house hub on the federation tier (deploy/tier.py, `provision add-hub`).

The tier is three real NATS nodes started from the provisioned files
(broker/cluster.py); hubs are added and removed with the provisioner's command
line while it runs, and a real Mosquitto hub bridges with the bundle it made.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.cluster import AGGREGATOR_LOGIN, OBSERVER_LOGIN, ClusterTier, TierLogin
from broker.cluster_hub import HubBroker, Retainer
from broker.local import find_mosquitto
from broker.secure import SecureBroker
from deploy import provision
from deploy.tier import Tier, TierError, add_hub, hub_login, init_tier, remove_hub
from tests.mqtt_helpers import Probe
from tests.test_cluster import SITE, TierClient, pytestmark
from tests.test_cluster_hub import wait_for_bridge

__all__ = ["pytestmark"]  # skipped without nats-server, like tests/test_cluster.py

BASE = f"fedbell/{SITE}"


@pytest.fixture(scope="module")
def tier(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterTier]:
    """A running tier with no hub yet: the tests add theirs with the provisioner."""
    with ClusterTier(tmp_path_factory.mktemp("tier"), SITE) as running:
        yield running


def provision_on(tier: ClusterTier, command: str, house: str) -> str:
    """The operator's command, reloading every node, as on a running tier."""
    before = tier.reloads()
    pids = [f"--node-pid={node.process.pid}" for node in tier.nodes if node.process is not None]
    report = provision.run([command, house, "--tier-dir", str(tier.work_dir), *pids])
    tier.wait_reloaded(before)
    return report


def connack(login: TierLogin, port: int, timeout: float = 10.0) -> bool:
    """Whether the tier accepts `login`: a CONNACK with success, not a refusal or a hang-up."""
    answered = threading.Event()
    accepted: list[bool] = []
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=f"{login.name}-try", protocol=mqtt.MQTTv311
    )
    client.username_pw_set(login.name, login.password())
    client.tls_set(
        ca_certs=str(login.ca_file), certfile=str(login.cert_file), keyfile=str(login.key_file)
    )

    def on_connect(*args: object) -> None:
        accepted.append(not args[3].is_failure)  # type: ignore[attr-defined]
        answered.set()

    client.on_connect = on_connect
    client.on_disconnect = lambda *_args: answered.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        answered.wait(timeout)
        return accepted == [True]
    finally:
        client.loop_stop()
        client.disconnect()


def test_add_hub_makes_a_bundle_whose_bridge_lists_every_node(tmp_path: Path) -> None:
    nodes = ["n1.example:8883", "n2.example:8883", "n3.example:8883"]
    tier = init_tier(tmp_path, SITE, "fedbell", nodes, hub_dir="/etc/fedbell/site/broker/tier")
    first, second = add_hub(tier, "house1"), add_hub(tier, "house2")
    bridge = (second / "bridge.conf").read_text()
    assert "address n2.example:8883 n3.example:8883 n1.example:8883" in bridge  # spread
    assert f"remote_password {(second / 'password').read_text()}" in bridge
    assert "bridge_certfile /etc/fedbell/site/broker/tier/client.crt" in bridge
    assert "address n1.example:8883 n2.example:8883" in (first / "bridge.conf").read_text()
    assert {path.name for path in second.iterdir()} == {
        "bridge.conf",
        "ca.crt",
        "client.crt",
        "client.key",
        "password",
        "fedbell-retainer.service",
    }
    assert (second / "password").stat().st_mode & 0o077 == 0
    accounts = (tmp_path / "accounts.conf").read_text()
    with pytest.raises(TierError, match="already exists"):
        add_hub(tier, "house1")
    assert (tmp_path / "accounts.conf").read_text() == accounts  # nothing changed
    remove_hub(Tier.load(tmp_path), "house1")
    assert not first.exists()
    assert hub_login("house1") not in (tmp_path / "accounts.conf").read_text()
    with pytest.raises(TierError, match="no hub"):
        remove_hub(Tier.load(tmp_path), "house1")


def test_bad_input_is_refused_with_what_and_where(tmp_path: Path) -> None:
    with pytest.raises(provision.ProvisionError, match="bad house name"):
        provision.run(["add-hub", "House 1", "--tier-dir", str(tmp_path)])
    with pytest.raises(TierError, match="no tier in"):
        provision.run(["add-hub", "house1", "--tier-dir", str(tmp_path)])
    with pytest.raises(TierError, match="host:port, not 'n1 8883'"):
        provision.run(["init-tier", "--tier-dir", str(tmp_path), "--node", "n1 8883"])
    with pytest.raises(TierError, match="host:port, not 'n1:mqtts'"):
        provision.run(["init-tier", "--tier-dir", str(tmp_path), "--node", "n1:mqtts"])
    assert not (tmp_path / "tier.json").exists()


def test_no_password_is_in_clear_text_on_the_tiers_side(tier: ClusterTier) -> None:
    """The nodes hold bcrypt hashes; only each login's own bundle holds its password."""
    provision_on(tier, "add-hub", "house9")
    passwords = [path.read_text() for path in tier.work_dir.glob("logins/*/password")]
    assert len(passwords) >= 4  # aggregator, observer, probe, house9
    nodes_read = [tier.work_dir / "accounts.conf", *tier.work_dir.glob("nodes/*/*.conf")]
    assert len(nodes_read) == 1 + 2 * len(tier.nodes)  # each node's config and accounts
    for path in [*nodes_read, tier.work_dir / "tier.json"]:
        text = path.read_text()
        assert not [password for password in passwords if password in text], path
    assert (tier.work_dir / "accounts.conf").read_text().count('password: "$2b$') == len(passwords)
    (_, port), *_ = tier.mqtt_endpoints
    assert connack(tier.login(hub_login("house9")), port)  # the hash is what the node checks


def test_a_provisioned_hub_bridges_its_sites_topics(tier: ClusterTier, tmp_path: Path) -> None:
    """`provision add-hub` on a running tier, then the house's Mosquitto with its bundle."""
    report = provision_on(tier, "add-hub", "house1")
    assert "sent SIGHUP to tier node pids" in report
    (_, first), (_, second), _ = tier.mqtt_endpoints
    observer = TierClient(tier.login(OBSERVER_LOGIN), first, "observer-prov")
    aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), second, "aggregator-prov")
    with HubBroker(tmp_path / "hub", tier, "house1") as hub:
        wait_for_bridge(hub)
        doorbell = Probe(hub.port, f"{BASE}/model/global", client_id="cam1")
        try:
            observer.subscribe("#")
            aggregator.subscribe(f"{BASE}/update/+")
            doorbell.publish("doorbell/cam1/ring", b"ding")
            doorbell.publish(f"{BASE}/update/cam1", b"update-1")
            update = aggregator.wait_for(f"{BASE}/update/+")
            assert update is not None
            assert update.payload == b"update-1"
            aggregator.publish(f"{BASE}/model/global", b"model-v1", retain=True)
            assert doorbell.wait_for(f"{BASE}/model/global").payload == b"model-v1"
            time.sleep(1.0)  # anything that would leak has had time to arrive
            seen = []
            while not observer.messages.empty():
                seen.append(observer.messages.get().topic)
            assert not [topic for topic in seen if topic.startswith("doorbell/")]
        finally:
            for client in (doorbell, observer, aggregator):
                client.close()


def test_a_hubs_login_is_refused_outside_its_sites_topics(tier: ClusterTier) -> None:
    provision_on(tier, "add-hub", "house2")
    (_, first), *_, (_, last) = tier.mqtt_endpoints
    observer = TierClient(tier.login(OBSERVER_LOGIN), first, "observer-outside")
    hub = TierClient(tier.login(hub_login("house2")), last, "hub-outside")
    try:
        observer.subscribe("#")
        granted: list[bool] = []
        done = threading.Event()

        def on_subscribe(*args: object) -> None:
            granted.extend(not code.is_failure for code in args[3])  # type: ignore[attr-defined]
            done.set()

        hub.client.on_subscribe = on_subscribe
        hub.client.subscribe("fedbell/other/model/global", qos=1)
        assert done.wait(10)
        assert granted == [False]  # SUBACK 0x80
        hub.publish("fedbell/other/update/cam1", b"elsewhere")
        hub.publish("doorbell/cam1/visitor", b"alice")
        hub.publish(f"{BASE}/update/cam1", b"allowed")  # arrives after the refused ones
        seen = []
        while (message := observer.wait_for("#", timeout=10)) is not None:
            seen.append((message.topic, message.payload))
            if message.payload == b"allowed":
                break
        assert (f"{BASE}/update/cam1", b"allowed") in seen
        assert not [payload for _, payload in seen if payload in {b"elsewhere", b"alice"}]
    finally:
        observer.close()
        hub.close()


def test_a_removed_hubs_login_is_refused(tier: ClusterTier, tmp_path: Path) -> None:
    provision_on(tier, "add-hub", "house3")
    bundle = tier.login(hub_login("house3")).password_file.parent
    kept = tmp_path / "copied-bundle"  # what the house still has after the tier removed it
    shutil.copytree(bundle, kept)
    copy = TierLogin(
        hub_login("house3"),
        kept / "password",
        kept / "client.crt",
        kept / "client.key",
        kept / "ca.crt",
    )
    (_, port), *_ = tier.mqtt_endpoints
    assert connack(copy, port)
    open_bridge = TierClient(copy, port, "hub-house3-open")
    dropped = threading.Event()
    open_bridge.client.on_disconnect = lambda *_args: dropped.set()
    provision_on(tier, "remove-hub", "house3")
    try:
        assert dropped.wait(10), "the removed hub's open connection survived the reload"
        time.sleep(3.0)  # paho reconnects on its own: refused
        assert not open_bridge.client.is_connected()
    finally:
        open_bridge.close()
    assert not bundle.exists()
    for _, port in tier.mqtt_endpoints:
        assert not connack(copy, port)
    assert connack(tier.login(AGGREGATOR_LOGIN), port)  # the others' logins unchanged


class HouseClient:
    """A TLS MQTT 5 client of a provisioned house login (its bundle under clients/)."""

    def __init__(self, bundle: Path, port: int, *topics: str) -> None:
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=bundle.name, protocol=mqtt.MQTTv5
        )
        self.client.username_pw_set(bundle.name, (bundle / "mqtt-password").read_text())
        self.client.tls_set(
            ca_certs=str(bundle / "ca.crt"),
            certfile=str(bundle / "client.crt"),
            keyfile=str(bundle / "client.key"),
        )
        self.client.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.client.connect("localhost", port)
        self.client.loop_start()
        for topic in topics:
            self.client.subscribe(topic, qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_a_house_installs_its_hub_bundle_and_retainer(tier: ClusterTier, tmp_path: Path) -> None:
    """The production path: the house's own broker (broker/production.conf, its ACL) with
    the hub bundle's bridge.conf appended, and the Retainer on its `add-retainer` login."""
    find_mosquitto()
    provision_on(tier, "add-hub", "house4")
    hub_bundle = tier.login(hub_login("house4")).password_file.parent
    site = tmp_path / "site"
    provision.run(["init", "--site", SITE, "--site-dir", str(site)])
    for command in (["add-device", "door1"], ["add-retainer"]):
        provision.run([*command, "--site-dir", str(site), "--no-reload"])
    assert "user retainer\ntopic read _tier/#\n" in (site / "broker" / "acl").read_text()
    with SecureBroker(
        site / "broker", tmp_path / "broker", bridge=hub_bundle / "bridge.conf"
    ) as house:
        wait_for_bridge(house)
        retainer = Retainer.with_login(
            "localhost", house.port, "retainer", site / "clients" / "retainer"
        ).start()
        (_, first), *_ = tier.mqtt_endpoints
        aggregator = TierClient(tier.login(AGGREGATOR_LOGIN), first, "aggregator-house4")
        try:
            aggregator.subscribe(f"{BASE}/update/+")
            aggregator.publish(f"{BASE}/model/global", b"model-v4", retain=True)
            time.sleep(2.0)  # down the bridge and retained at home, no doorbell listening
            doorbell = HouseClient(site / "clients" / "door1", house.port, f"{BASE}/model/global")
            try:
                model = doorbell.messages.get(timeout=10)
                assert (model.topic, model.payload) == (f"{BASE}/model/global", b"model-v4")
                doorbell.client.publish(f"{BASE}/update/door1", b"update-4", qos=1)
                update = aggregator.wait_for(f"{BASE}/update/+")
                assert update is not None
                assert (update.topic, update.payload) == (f"{BASE}/update/door1", b"update-4")
            finally:
                doorbell.close()
        finally:
            aggregator.close()
            retainer.stop()
