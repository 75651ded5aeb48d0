"""The federation tier for many houses: a three-node NATS JetStream cluster speaking MQTT.

Like broker/local.py does for one Mosquitto, `ClusterTier` provisions the tier
with deploy/tier.py exactly as an operator would (a CA, one login per hub and
the aggregator, accounts.conf with their bcrypt hashes and permissions, a
bundle with bridge.conf per hub), renders each node's bundle as
`provision node-config` does (deploy/tier_node.py: broker/cluster.conf and
the node's certificate) on free loopback ports,
starts the nodes and waits until the cluster really carries MQTT. Used by the
tests and by `make bench-cluster`; issue 23 and docs/many-houses.md say why NATS.

Who may publish and subscribe what comes from deploy/tier.py, which takes it
from deploy/acl.py: a hub gets what a doorbell of its site may do on the
federation's topics (so nothing under `doorbell/` or `homeassistant/`), the
aggregator what it may do on a house broker.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import BrokerError, Service, free_ports, signal_and_wait
from deploy.tier import (
    PROBE_TOPIC,
    Address,
    Tier,
    TierRole,
    add_login,
    hub_login,
    init_tier,
    spread,
)
from deploy.tier_node import CONFIG_NAME, NodeListeners, node_bundle, write_node_config
from fedbell.config import TlsSettings
from fedbell.tier import TierMqttSettings

LOOPBACK = "127.0.0.1"
AGGREGATOR_LOGIN = "aggregator"
PROBE_LOGIN = "cluster-probe"
OBSERVER_LOGIN = "observer"
"""Reads everything on the tier, writes nothing: tests and the bench count what crossed."""


def find_nats_server() -> str:
    """Path of the nats-server binary, or a clear error saying how to install it."""
    for candidate in ("/usr/sbin/nats-server", "/usr/bin/nats-server"):
        if Path(candidate).exists():
            return candidate
    raise BrokerError(
        "nats-server is not installed: run `sudo apt-get install nats-server` "
        "(or `make broker-deps`, which does it when run as root)"
    )


@dataclass(frozen=True)
class TierLogin:
    """What one client of the tier needs: a user name, its password, its certificate."""

    name: str
    password_file: Path
    cert_file: Path
    key_file: Path
    ca_file: Path

    def password(self) -> str:
        return self.password_file.read_text().strip()


@dataclass
class NatsNode:
    """One node's ports and process; the ports survive a kill and a restart."""

    name: str
    cluster_port: int
    http_port: int
    mqtt_port: int
    client_port: int
    """NATS's own client listener: chosen here with the others rather than left to
    nats-server, whose pick could take a port chosen for another listener."""
    process: subprocess.Popen[bytes] | None = None


class ClusterTier(Service):
    """Three NATS nodes with MQTT, JetStream replicas 3, TLS and one login per hub."""

    def __init__(
        self,
        work_dir: Path,
        site: str,
        hubs: Sequence[str] = (),
        *,
        topic_root: str = "fedbell",
        nodes: int = 3,
        ack_wait: str = "5s",
    ) -> None:
        self.work_dir = work_dir
        self.site = site
        self.topic_root = topic_root
        self.base = f"{topic_root}/{site}"
        self.hubs = list(hubs)
        ports = iter(free_ports(4 * nodes))
        self.nodes = [
            NatsNode(f"n{i + 1}", next(ports), next(ports), next(ports), next(ports))
            for i in range(nodes)
        ]
        self.tls_dir = work_dir / "tls"
        if not ack_wait[:-1].isdigit() or ack_wait[-1] not in "sm":
            raise ValueError(f"ack_wait {ack_wait!r} is not like 5s or 1m")
        self.ack_wait = ack_wait

    @property
    def mqtt_endpoints(self) -> list[tuple[str, int]]:
        """(host, port) of every node's MQTT listener, in node order."""
        return [(LOOPBACK, node.mqtt_port) for node in self.nodes]

    def endpoints_for(self, house: str) -> list[tuple[str, int]]:
        """Every node's MQTT listener, starting at `house`'s own (deploy.tier.spread)."""
        return spread(self.mqtt_endpoints, self.hubs.index(house))

    def login(self, name: str) -> TierLogin:
        """The credentials of `name`: one of the *_LOGIN names or `hub_login(house)`."""
        folder = self.work_dir / "logins" / name
        return TierLogin(
            name,
            folder / "password",
            folder / "client.crt",
            folder / "client.key",
            self.tls_dir / "ca.crt",
        )

    def mqtt_settings(self, name: str, keepalive: int = 30) -> TierMqttSettings:
        """How login `name` connects: node 1 first, the others to fail over to."""
        login = self.login(name)
        (host, port), *others = self.mqtt_endpoints
        return TierMqttSettings(
            host=host,
            port=port,
            failover=tuple(f"{other}:{number}" for other, number in others),
            username=login.name,
            password_file=login.password_file,
            tls=TlsSettings(
                ca_file=login.ca_file, cert_file=login.cert_file, key_file=login.key_file
            ),
            keepalive=keepalive,
        )

    @staticmethod
    def hub_login(house: str) -> str:
        return hub_login(house)

    def start(self, timeout: float = 60.0) -> ClusterTier:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        tier = self._provision()
        for node in self.nodes:
            self._write_config(tier, node)
        try:
            for index in range(len(self.nodes)):
                self.start_node(index)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()  # `with` never reaches __exit__ when __enter__ raises
            raise
        return self

    def start_node(self, index: int) -> None:
        node = self.nodes[index]
        node.process = subprocess.Popen(
            [find_nats_server(), "-c", str(self._config_path(node))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def kill_node(self, index: int) -> None:
        """SIGKILL: a node lost, not shut down."""
        self._signal(self.nodes[index], signal.SIGKILL)

    def stop(self) -> None:
        for node in self.nodes:
            self._signal(node, signal.SIGTERM)

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every running node healthy, then one QoS 1 message carried across the cluster.

        /healthz alone is not enough: right after start it answers ok while the
        MQTT streams are still being created, and QoS 1 messages published then
        were lost (the lead's spike). A message that goes from the last node to a
        subscriber on the first proves the streams and the routes work.
        """
        deadline = time.monotonic() + timeout
        running = [node for node in self.nodes if node.process is not None]
        for node in running:
            self._wait_healthy(node, deadline)
        while time.monotonic() < deadline:
            if self._probe(running[0], running[-1], min(5.0, deadline - time.monotonic())):
                return
        raise BrokerError(f"the cluster carried no MQTT message within {timeout}s{self._logs()}")

    def _provision(self) -> Tier:
        """The tier's files, through deploy/tier.py: made once, then a login for each
        hub that has none. A tier restarted with one more `--hub` keeps the others'
        passwords and certificates; the nodes' addresses (new free ports) are
        written into every hub's bridge.conf again."""
        nodes = [f"{host}:{port}" for host, port in self.mqtt_endpoints]
        if (self.work_dir / "tier.json").exists():
            tier = Tier.load(self.work_dir)
            tier.nodes = nodes
        else:
            tier = init_tier(self.work_dir, self.site, self.topic_root, nodes)
        logins = {
            AGGREGATOR_LOGIN: TierRole.AGGREGATOR,
            PROBE_LOGIN: TierRole.PROBE,
            OBSERVER_LOGIN: TierRole.OBSERVER,
            **{hub_login(house): TierRole.HUB for house in self.hubs},
        }
        for name, role in logins.items():
            if name not in tier.roles:
                add_login(tier, name, role)
        tier.save()
        return tier

    def reloads(self) -> dict[str, int]:
        """How many times each running node has re-read its configuration (its log says)."""
        counts = {}
        for node in self.nodes:
            if node.process is not None:
                log = self.work_dir / f"{node.name}.log"
                text = log.read_text() if log.exists() else ""
                counts[node.name] = text.count("Reloaded server configuration")
        return counts

    def wait_reloaded(self, before: dict[str, int], timeout: float = 120.0) -> None:
        """Wait until every node counted in `before` has reloaded once more (the SIGHUP
        of `provision add-hub --node-pid`), then until the cluster carries MQTT again.

        A reload is not free: nats-server 2.9 logs "Reloaded: cluster" every time,
        and after it JetStream requests time out, so a connection made then is
        refused ("loading session record"; seen here), usually for a few seconds,
        once for more than a minute on a loaded machine (CI): hence two minutes.
        """
        deadline = time.monotonic() + timeout
        while any(self.reloads().get(name, 0) <= count for name, count in before.items()):
            if time.monotonic() > deadline:
                raise BrokerError(f"the nodes did not reload within {timeout}s{self._logs()}")
            time.sleep(0.1)
        self.wait_ready(deadline - time.monotonic())

    def _config_path(self, node: NatsNode) -> Path:
        return node_bundle(self.work_dir, node.name) / CONFIG_NAME

    def _write_config(self, tier: Tier, node: NatsNode) -> None:
        listeners = NodeListeners(
            mqtt=Address(LOOPBACK, node.mqtt_port),
            cluster=Address(LOOPBACK, node.cluster_port),
            routes=tuple(Address(LOOPBACK, n.cluster_port) for n in self.nodes if n is not node),
            monitor=Address(LOOPBACK, node.http_port),
            client_port=node.client_port,
        )
        write_node_config(
            tier,
            node.name,
            listeners,
            self.work_dir.absolute() / node.name,
            log_file=self.work_dir.absolute() / f"{node.name}.log",
            ack_wait=self.ack_wait,
        )

    def _wait_healthy(self, node: NatsNode, deadline: float) -> None:
        url = f"http://{LOOPBACK}:{node.http_port}/healthz"
        while time.monotonic() < deadline:
            if node.process is not None and node.process.poll() is not None:
                raise BrokerError(f"nats-server {node.name} exited{self._logs()}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise BrokerError(f"nats-server {node.name} was not healthy in time{self._logs()}")

    def _probe(self, subscribe_on: NatsNode, publish_on: NatsNode, timeout: float) -> bool:
        received: list[bytes] = []
        token = secrets.token_hex(8).encode()
        # A client id of its own each time: a refused attempt's session may still be
        # loading ("other session with client ID ... is in the process of connecting").
        listener = self.connect_probe(subscribe_on, f"probe-sub-{token.decode()}")
        sender = self.connect_probe(publish_on, f"probe-pub-{token.decode()}")
        try:
            listener.on_message = lambda _c, _u, message: received.append(bytes(message.payload))
            listener.subscribe(PROBE_TOPIC, qos=1)
            end = time.monotonic() + timeout
            time.sleep(0.2)  # the subscription's consumer, before the message
            sender.publish(PROBE_TOPIC, token, qos=1)
            while time.monotonic() < end and token not in received:
                time.sleep(0.05)
            return token in received
        finally:
            for client in (listener, sender):
                client.loop_stop()
                client.disconnect()

    def connect_probe(self, node: NatsNode, client_id: str) -> mqtt.Client:
        """A connected MQTT 3.1.1 client of the probe login on `node` (clean session)."""
        login = self.login(PROBE_LOGIN)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        client.username_pw_set(login.name, login.password())
        client.tls_set(
            ca_certs=str(login.ca_file), certfile=str(login.cert_file), keyfile=str(login.key_file)
        )
        # Not listening yet: the probe fails and wait_ready tries again.
        with contextlib.suppress(OSError):
            client.connect(LOOPBACK, node.mqtt_port, keepalive=10)
        client.loop_start()
        return client

    def _logs(self) -> str:
        tails = []
        for node in self.nodes:
            log = self.work_dir / f"{node.name}.log"
            if log.exists():
                tail = "\n".join(log.read_text().splitlines()[-15:])
                tails.append(f"\n--- {node.name}.log\n{tail}")
        return "".join(tails)

    @staticmethod
    def _signal(node: NatsNode, sig: signal.Signals) -> None:
        if node.process is None:
            return
        signal_and_wait(node.process, sig, timeout=15)
        node.process = None


def main(argv: list[str] | None = None) -> int:
    """`make cluster`: start a tier on loopback and keep it up until Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m broker.cluster", description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("cluster"), help="work folder")
    parser.add_argument("--site", default="demo", help="the federation's site id")
    parser.add_argument("--hub", action="append", default=[], help="a house's name (repeat)")
    args = parser.parse_args(argv)
    # systemd or `timeout` stop it with SIGTERM: leave through `with`, stopping the nodes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ClusterTier(args.dir, args.site, hubs=args.hub) as tier:
        endpoints = " ".join(f"{host}:{port}" for host, port in tier.mqtt_endpoints)
        print(f"federation tier up: MQTT 3.1.1 over TLS on {endpoints}")
        print(f"logins (password, client.crt, client.key) under {args.dir / 'logins'}")
        print(f"CA: {tier.tls_dir / 'ca.crt'}; Ctrl-C stops the three nodes")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
