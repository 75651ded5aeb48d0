"""A house hub: the house's own Mosquitto, bridged to the federation tier.

The house keeps its broker (MQTT 5 to its doorbells, Home Assistant and the
console, as broker/local.py or broker/production.conf set it up) and gains a
bridge section that carries only `<root>/<site>/...` topics, each in the
direction a doorbell uses it, to any node of the tier over MQTT 3.1.1 with the
hub's own login and TLS certificate, and a small `Retainer` that gives back
the retain flag MQTT 3.1.1 drops. The section is broker/cluster_hub.conf,
rendered into the hub's bundle by `python -m deploy.provision add-hub`
(deploy/tier.py).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from broker.cluster import ClusterTier
from broker.local import LocalBroker
from deploy.acl import STAGING_PREFIX
from deploy.files import write_private
from fedbell import systemd
from fedbell.wire import house_inboxes
from fedbell.wire.topics import bundle_site

log = logging.getLogger(__name__)

HUB_AUTOSAVE = """
# Saved like broker/production.conf (60 s), not local.conf's 1 s: a hub retains
# the 28 MB backbone, and twenty test hubs rewriting it every second sat in
# disk wait through the bench's round (~19 % of a core; 3 % at 60 s). The
# later line wins.
autosave_interval 60
"""


class Retainer:
    """Republishes, retained, what the bridge staged: everything the aggregator
    publishes is retained (aggregator/service.py), and MQTT 3.1.1 lost the flag.

    The house's secure-aggregation inboxes come in bundles (fedbell/wire/house_inboxes.py):
    it puts each on its doorbell's own inbox topic, and skips a bundle of an earlier round
    than one it passed on.

    A persistent MQTT 5 session on the house broker, so what the bridge staged
    while the retainer restarted is queued for it.

    What it already retained unchanged it does not publish again: a bridge
    that reconnects subscribes again and the tier sends every retained
    message of the site once more, the 28 MB backbone included, which every
    doorbell listening on the backbone would have received again too. After a
    connection on which the house broker had lost its session (and so its
    retained messages), it republishes everything.
    """

    def __init__(self, port: int, client_id: str, host: str = "127.0.0.1") -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self._address = (host, port)
        self._retained: dict[str, bytes] = {}
        """sha256 of what it last retained, by topic."""
        self._newest_bundle: dict[str, int] = {}
        """The latest round of inbox bundles passed on, by house (their topic's prefix)."""

    @classmethod
    def with_login(cls, host: str, port: int, login: str, credentials: Path) -> Retainer:
        """On a production house broker: TLS and the house login of role `retainer`
        (`python -m deploy.provision add-retainer`), from its bundle or from
        $CREDENTIALS_DIRECTORY: mqtt-password, ca.crt, client.crt, client.key."""
        retainer = cls(port, login, host)
        retainer.client.username_pw_set(login, (credentials / "mqtt-password").read_text().strip())
        retainer.client.tls_set(
            ca_certs=str(credentials / "ca.crt"),
            certfile=str(credentials / "client.crt"),
            keyfile=str(credentials / "client.key"),
        )
        return retainer

    def start(self) -> Retainer:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 7 * 24 * 3600
        self.client.connect(*self._address, clean_start=False, properties=properties)
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def _on_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, *_args: Any) -> None:
        if not flags.session_present:
            self._retained.clear()
        client.subscribe(f"{STAGING_PREFIX}#", qos=1)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic.removeprefix(STAGING_PREFIX)
        payload = bytes(message.payload)
        site = bundle_site(topic)
        if site is None:
            self._retain(topic, payload)
            return
        try:
            round_id, inboxes = house_inboxes.unpack(payload)
        except ValueError as err:
            log.warning("%s: %s; not passed on", topic, err)
            return
        house = topic.rpartition("/")[0]
        if round_id < self._newest_bundle.get(house, 0):
            return  # an earlier round's part, sent again after a reconnection
        self._newest_bundle[house] = round_id
        for device, inbox in inboxes:
            self._retain(site.secagg_inbox(device), inbox)

    def _retain(self, topic: str, payload: bytes) -> None:
        digest = hashlib.sha256(payload).digest()
        if self._retained.get(topic) != digest:
            self._retained[topic] = digest
            self.client.publish(topic, payload, 1, retain=True)


class HubBroker(LocalBroker):
    """A test house's Mosquitto (broker/local.conf) with its bridge to `tier` and its Retainer.

    `endpoints`: where the bridge connects instead of the nodes its bundle names
    (a test puts a link it can cut in between).
    """

    def __init__(
        self,
        data_dir: Path,
        tier: ClusterTier,
        house: str,
        endpoints: list[tuple[str, int]] | None = None,
    ) -> None:
        super().__init__(data_dir)
        self.tier = tier
        self.house = house
        self.endpoints = endpoints
        self._house_template = self._template
        self.retainer: Retainer | None = None

    def start(self, timeout: float = 10.0) -> HubBroker:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        login = self.tier.hub_login(self.house)
        # The bundle `provision add-hub` made, as a house would install it.
        bridge = (self.tier.login(login).password_file.parent / "bridge.conf").read_text()
        if self.endpoints is not None:
            addresses = " ".join(f"{host}:{port}" for host, port in self.endpoints)
            bridge = re.sub(r"^address .*$", f"address {addresses}", bridge, count=1, flags=re.M)
        # LocalBroker formats its template with str.format: the bridge has no braces.
        template = self.data_dir / "hub.template.conf"
        write_private(template, (self._house_template.read_text() + HUB_AUTOSAVE + bridge).encode())
        self._template = template
        super().start(timeout)
        self.config_path.chmod(0o600)
        self.retainer = Retainer(self.port, f"{login}-retainer").start()
        return self

    def _signal(self, sig: signal.Signals) -> None:
        if self.retainer is not None:
            self.retainer.stop()
            self.retainer = None
        super()._signal(sig)

    def __enter__(self) -> HubBroker:
        return self.start()


def main(argv: list[str] | None = None) -> int:
    """The Retainer as a service beside the house broker (systemd/fedbell-retainer.service)."""
    parser = argparse.ArgumentParser(
        prog="python -m broker.cluster_hub", description=Retainer.__doc__
    )
    parser.add_argument("--host", default="localhost", help="the house broker")
    parser.add_argument("--port", type=int, default=8883)
    parser.add_argument("--login", default="retainer", help="its house login")
    parser.add_argument(
        "--credentials",
        type=Path,
        default=Path(os.environ.get("CREDENTIALS_DIRECTORY", ".")),
        help="folder of mqtt-password, ca.crt, client.crt, client.key "
        "(default $CREDENTIALS_DIRECTORY)",
    )
    args = parser.parse_args(argv)
    missing = [
        name
        for name in ("mqtt-password", "ca.crt", "client.crt", "client.key")
        if not (args.credentials / name).is_file()
    ]
    if missing:
        parser.error(f"no {', '.join(missing)} in {args.credentials}")
    retainer = Retainer.with_login(args.host, args.port, args.login, args.credentials)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    retainer.start()
    systemd.notify_ready()
    # Pinged while connected: a house broker gone for longer than WatchdogSec
    # gets the Retainer restarted, which costs nothing (its session is kept).
    while not stopping.wait((systemd.watchdog_interval() or 60.0) / 2):
        if retainer.client.is_connected():
            systemd.notify_watchdog()
    systemd.notify_stopping()
    retainer.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
