"""Provision the federation tier: its CA, its logins, and one bundle per house hub.

What a federation operator keeps, beside each house's own site folder
(deploy/provision.py), in one tier folder:

    tier.json              registry: site, topic root, the nodes' MQTT addresses,
                           each login's role and bcrypt hash (owner-only)
    tls/                   ca.crt ca.key: the tier's CA
    nodes/<name>/          one bundle per node (deploy/tier_node.py): its
                           nats-server.conf, certificate and accounts.conf
    accounts.conf          NATS's `accounts` section: one user per login, its
                           bcrypt hash and its permissions; every node's
                           configuration includes a copy, and re-reads it on SIGHUP
    logins/<name>/         one bundle per login, to copy to its machine:
                           ca.crt client.crt client.key password
                           (+ for a hub: bridge.conf for its Mosquitto and
                           the Retainer's unit, systemd/fedbell-retainer.service)

A hub is a login named `hub-<house>` whose permissions are what a doorbell of
the site may do on the federation's topics (deploy/acl.py), so nothing under
`doorbell/` or `homeassistant/` and nothing of another site. Its bridge.conf
(broker/cluster_hub.conf) lists every node, the hub's certificate and its
password: Mosquitto must send the password, so the bundle holds it in clear,
readable by its owner only; the nodes only hold its bcrypt hash.

The hashes are bcrypt's `$2b$`, which nats-server 2.9 accepts.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from string import Template
from typing import Any, TypeVar

import bcrypt

from deploy import pki
from deploy.acl import STAGING_PREFIX, Role, rules
from deploy.files import make_dir, write_private, write_public
from fedbell.wire.topics import Topics

REPO = Path(__file__).resolve().parents[1]
BRIDGE_TEMPLATE = REPO / "broker" / "cluster_hub.conf"
RETAINER_UNIT = REPO / "systemd" / "fedbell-retainer.service"
DEFAULT_HUB_DIR = "/etc/fedbell/site/broker/tier"
"""Where `add-hub` tells each house to install its hub bundle."""
PROBE_TOPIC = "_fedbell/ready"
"""The readiness probe's topic: outside every site, only a probe login may use it."""
BCRYPT_ROUNDS = 6
"""Cheap on purpose: every password is 192 random bits, which no work factor
makes harder to guess; the hash keeps a copied node configuration from being
a login. Each MQTT connection costs the node one check, and after a node is
lost every hub and the aggregator reconnect at once."""
HOST_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


Node = TypeVar("Node")


class TierError(RuntimeError):
    """A tier provisioning step cannot be done; the message says what to do."""


class TierRole(StrEnum):
    HUB = "hub"
    AGGREGATOR = "aggregator"
    OBSERVER = "observer"
    """Reads everything, writes nothing: tests and benchmarks count what crossed."""
    PROBE = "probe"
    """The readiness check's login (broker/cluster.py)."""


@dataclass(frozen=True)
class Address:
    """A host (name, IPv4, or IPv6 without brackets) and a TCP port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Address:
        host, _, port = text.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not port.isdigit() or not 0 < int(port) < 65536 or not _valid_host(host):
            raise TierError(f"an address is host:port, not {text!r}")
        return cls(host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return HOST_RE.fullmatch(host) is not None
    return True


def hub_login(house: str) -> str:
    return f"hub-{house}"


def subject(topic: str) -> str:
    """The NATS subject an MQTT topic filter is on."""
    return topic.replace("/", ".").replace("+", "*").replace("#", ">")


def federation_rules(role: Role, name: str, base: str) -> list[tuple[str, str]]:
    """deploy/acl.py's (access, topic) rules of a login, on the federation's topics only."""
    return [(access, topic) for access, topic in rules(role, name, base) if topic.startswith(base)]


def hub_rules(base: str, house: str) -> list[tuple[str, str]]:
    """What a house hub carries: what any doorbell of the site may do on `base`, but key
    adverts only under its own house, and instead of the doorbells' inboxes the bundles
    of its own house's (fedbell/wire/topics.py)."""
    topics = _topics(base)
    adverts = topics.house_adverts(None) + "+"
    rules = []
    for access, topic in federation_rules(Role.DEVICE, "+", base):
        if topic == adverts:
            rules.append((access, topics.house_adverts(house) + "+"))
        elif topic == f"{topics.base}/secagg/inbox/+":
            rules.append((access, topics.house_inboxes(house)))
        else:
            rules.append((access, topic))
    return rules


def _topics(base: str) -> Topics:
    root, _, site = base.rpartition("/")
    return Topics(site=site, root=root)


def permissions(role: TierRole, name: str, base: str) -> list[tuple[str, str]]:
    match role:
        case TierRole.HUB:
            return hub_rules(base, name.removeprefix(hub_login("")))
        case TierRole.AGGREGATOR:
            return federation_rules(Role.AGGREGATOR, "aggregator", base)
        case TierRole.OBSERVER:
            return [("read", "#")]
        case TierRole.PROBE:
            return [("read", PROBE_TOPIC), ("write", PROBE_TOPIC)]
    raise ValueError(f"unknown tier role {role!r}")  # pragma: no cover - exhaustive match


def spread(nodes: list[Node], index: int) -> list[Node]:
    """Every node, starting at the `index`-th hub's own, so the hubs spread evenly.

    A bridge connects to its first address and moves on only when that node
    is lost. With every hub on node 1, killing it made all of them reconnect
    at once, each re-sent the retained backbone (28 MB) by the two nodes left;
    spread, a lost node moves a third of them.
    """
    start = index % len(nodes)
    return nodes[start:] + nodes[:start]


def bridge_topics(base: str, house: str) -> list[str]:
    """The bridge's `topic` lines: a doorbell's writes go out, its reads come in.

    What comes in lands under STAGING_PREFIX, not on the doorbells' topics: the
    tier speaks MQTT 3.1.1, which clears the retain flag of every message it
    forwards live (only a new subscription gets retained ones flagged), so a
    model published while the bridge is up would reach the doorbells connected
    then but not be kept for the next. The Retainer restores it.

    Out at QoS 1 (an update is stored on the tier before the hub forgets it),
    in at QoS 0: everything that comes down is retained on the tier (the
    aggregator retains all it publishes), and a bridge that (re)subscribes is
    sent the latest of each topic, which is all a doorbell uses. At QoS 1 NATS
    kept a replicated JetStream consumer per topic line and hub (five per hub,
    100 raft groups for 20 hubs), which the surviving nodes of a killed one
    had to re-elect while the round's updates poured in (docs/many-houses.md).

    A doorbell's key advert goes up under the house (the bridge swaps the prefix:
    `topic + out 1 <in the house> <on the tier>`), and its house's inbox bundles come
    down (the Retainer gives each doorbell its own): the hub is sent its own doorbells'
    inboxes only, in a few messages (every hub all 1,000 of a round, one message
    each, took ~10 s of the round; docs/many-houses.md).
    """
    topics = _topics(base)
    lines = []
    for access, topic in hub_rules(base, house):
        if topic.startswith(topics.house_adverts(house)):
            lines.append(
                f"topic + out 1 {topics.house_adverts(None)} {topics.house_adverts(house)}"
            )
        elif access == "write":
            lines.append(f"topic {topic} out 1")
        else:
            lines.append(f'topic {topic} in 0 {STAGING_PREFIX} ""')
    return lines


@dataclass
class Tier:
    """The registry (tier.json) and the folder layout around it."""

    root: Path
    site: str
    topic_root: str
    nodes: list[str]
    """host:port of every node's MQTT listener, in node order."""
    hub_dir: str | None = None
    """Where each house installs its hub's bundle (bridge.conf names its files
    there); None: where the bundle is made (a hub on the operator's machine, tests)."""
    roles: dict[str, TierRole] = field(default_factory=dict)
    hashes: dict[str, str] = field(default_factory=dict)
    """bcrypt hash of each login's password."""

    @property
    def base(self) -> str:
        return f"{self.topic_root}/{self.site}"

    @property
    def tls_dir(self) -> Path:
        return self.root / "tls"

    @property
    def accounts(self) -> Path:
        return self.root / "accounts.conf"

    def bundle(self, name: str) -> Path:
        return self.root / "logins" / name

    def hubs(self) -> list[str]:
        """The houses with a hub, in the order they were added (which spreads them)."""
        prefix = hub_login("")
        return [
            name.removeprefix(prefix) for name, role in self.roles.items() if role is TierRole.HUB
        ]

    @classmethod
    def load(cls, root: Path) -> Tier:
        path = root / "tier.json"
        if not path.exists():
            raise TierError(f"no tier in {root}: run `python -m deploy.provision init-tier` first")
        data = json.loads(path.read_text())
        return cls(
            root,
            data["site"],
            data["topic_root"],
            list(data["nodes"]),
            data["hub_dir"],
            {name: TierRole(login["role"]) for name, login in data["logins"].items()},
            {name: login["bcrypt"] for name, login in data["logins"].items()},
        )

    def save(self) -> None:
        """The registry, then what is made from it: accounts.conf and every hub's bridge.conf."""
        logins = {
            name: {"role": role.value, "bcrypt": self.hashes[name]}
            for name, role in self.roles.items()
        }
        data = {
            "site": self.site,
            "topic_root": self.topic_root,
            "nodes": self.nodes,
            "hub_dir": self.hub_dir,
            "logins": logins,
        }
        write_private(self.root / "tier.json", (json.dumps(data, indent=2) + "\n").encode())
        accounts = render_accounts(self).encode()
        write_private(self.accounts, accounts)
        # Each node's bundle holds the copy its configuration includes.
        for node in (self.root / "nodes").glob("*"):
            if node.is_dir():
                write_private(node / "accounts.conf", accounts)
        for index, house in enumerate(self.hubs()):
            name = hub_login(house)
            bridge = render_bridge(self, house, spread(self.nodes, index))
            write_private(self.bundle(name) / "bridge.conf", bridge.encode())


def init_tier(
    root: Path, site: str, topic_root: str, nodes: list[str], hub_dir: str | None = None
) -> Tier:
    """The tier's CA and registry; `nodes`: each node's MQTT host:port, as clients dial it.

    Each node's own certificate comes with its configuration (deploy/tier_node.py).
    """
    if (root / "tier.json").exists():
        raise TierError(f"{root} already holds a tier; nothing changed")
    if not nodes:
        raise TierError("a tier needs its nodes' MQTT addresses (--node host:port, repeat)")
    for node in nodes:
        Address.parse(node)
    tier = Tier(root, site, topic_root, list(nodes), hub_dir)
    make_dir(root, 0o700)
    make_dir(tier.tls_dir, 0o700)
    ca = pki.create_ca(f"{site} federation tier")
    pki.save(ca, tier.tls_dir / "ca.crt", tier.tls_dir / "ca.key")
    tier.save()
    return tier


def password_hash(password: str) -> str:
    """The `$2b$...` bcrypt hash a node checks `password` against."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()


def add_login(tier: Tier, name: str, role: TierRole) -> Path:
    """A certificate, a password (its bcrypt hash to the nodes); returns the bundle."""
    if name in tier.roles:
        raise TierError(f"{name!r} already exists on the tier (as {tier.roles[name].value})")
    bundle = tier.bundle(name)
    if bundle.exists():
        shutil.rmtree(bundle)
    make_dir(bundle, 0o700)
    write_public(bundle / "ca.crt", (tier.tls_dir / "ca.crt").read_bytes())
    ca = pki.load(tier.tls_dir / "ca.crt", tier.tls_dir / "ca.key")
    pki.save(pki.issue(ca, name, "tier"), bundle / "client.crt", bundle / "client.key")
    password = secrets.token_urlsafe(24)
    write_private(bundle / "password", password.encode())
    tier.hashes[name] = password_hash(password)
    tier.roles[name] = role
    tier.save()
    return bundle


def add_hub(tier: Tier, house: str) -> Path:
    """The hub's login and bundle (bridge.conf, the Retainer's unit); returns the bundle."""
    bundle = add_login(tier, hub_login(house), TierRole.HUB)
    write_public(bundle / RETAINER_UNIT.name, RETAINER_UNIT.read_bytes())
    return bundle


def remove_hub(tier: Tier, house: str) -> None:
    name = hub_login(house)
    if tier.roles.get(name) is not TierRole.HUB:
        raise TierError(f"no hub for house {house!r} in {tier.root}")
    del tier.roles[name]
    del tier.hashes[name]
    tier.save()
    shutil.rmtree(tier.bundle(name), ignore_errors=True)


def render_accounts(tier: Tier) -> str:
    """One account for the federation: MQTT's streams live per account, so the
    hubs and the aggregator must share one to see each other's messages. Each
    login is a user of it whose permissions stop at its role's topics."""
    users = []
    for name, role in tier.roles.items():
        allowed = permissions(role, name, tier.base)
        publish = [subject(topic) for access, topic in allowed if access == "write"]
        # A QoS 1 subscription is delivered from a JetStream consumer on
        # $MQTT.sub.<id>: without that permission NATS refuses to create it.
        receive = [subject(topic) for access, topic in allowed if access == "read"]
        receive.append("$MQTT.sub.>")
        users.append(
            f'      {{ user: "{name}", password: "{tier.hashes[name]}",\n'
            # MQTT only: over NATS's own protocol a login could subscribe
            # to $MQTT.sub.> and read every other client's deliveries.
            '        allowed_connection_types: ["MQTT"],\n'
            f"        permissions: {{ publish: {_nats_list(publish)},"
            f" subscribe: {_nats_list(receive)} }} }}"
        )
    lines = "\n".join(users)
    return (
        "# Generated by `python -m deploy.provision` from tier.json (deploy/tier.py).\n"
        "accounts {\n  FEDBELL {\n    jetstream: enabled\n    users: [\n"
        f"{lines}\n    ]\n  }}\n  SYS {{\n    users: [ ]\n  }}\n}}\nsystem_account: SYS\n"
    )


def render_bridge(tier: Tier, house: str, nodes: list[str]) -> str:
    """The bridge section of `house`'s Mosquitto, pointing at its bundle's files."""
    name = hub_login(house)
    bundle = tier.bundle(name)
    installed = Path(tier.hub_dir) if tier.hub_dir else bundle
    values = {
        "house": house,
        "addresses": " ".join(nodes),
        "login": name,
        "password": (bundle / "password").read_text().strip(),
        "ca_file": installed / "ca.crt",
        "cert_file": installed / "client.crt",
        "key_file": installed / "client.key",
        "topics": "\n".join(bridge_topics(tier.base, house)),
    }
    for key, value in values.items():
        # Mosquitto reads an option up to the end of its line and does not quote.
        if key not in {"topics", "addresses"} and any(char in str(value) for char in " \n{}"):
            raise TierError(f"unusable {key} in a bridge configuration: {value!r}")
    return Template(BRIDGE_TEMPLATE.read_text()).substitute(values)


def _nats_list(subjects: list[str]) -> str:
    return "[" + ", ".join(f'"{item}"' for item in subjects) + "]"


# ---------------------------------------------------------------- commands


def add_commands(sub: Any, on_tier: argparse.ArgumentParser) -> None:
    """`provision`'s tier commands (`sub`: its subparsers; `on_tier`: the --tier-dir parent)."""
    node_pids = argparse.ArgumentParser(add_help=False)
    node_pids.add_argument(
        "--node-pid", type=int, action="append", default=[], help="SIGHUP this node (repeat)"
    )
    p = sub.add_parser("init-tier", parents=[on_tier], help="create the federation tier's CA")
    p.add_argument("--site", default="home", help="site (federation) id")
    p.add_argument("--topic-root", default="fedbell")
    p.add_argument(
        "--node", action="append", default=[], help="a node's MQTT host:port (repeat, in order)"
    )
    p.add_argument(
        "--hub-dir",
        default=DEFAULT_HUB_DIR,
        help="where each house installs its hub bundle (default %(default)s)",
    )
    p = sub.add_parser(
        "add-hub", parents=[on_tier, node_pids], help="a house hub's tier login and bundle"
    )
    p.add_argument("house")
    p = sub.add_parser("remove-hub", parents=[on_tier, node_pids], help="revoke a hub")
    p.add_argument("house")


def reload_nodes(pids: list[int]) -> str:
    """Make the tier's nodes re-read accounts.conf (nats-server reloads on SIGHUP)."""
    for pid in pids:
        os.kill(pid, signal.SIGHUP)
    if pids:
        return f"sent SIGHUP to tier node pids {', '.join(map(str, pids))}"
    return (
        "tier not reloaded: copy accounts.conf to every node's /etc/fedbell/tier-node/ and run "
        "`systemctl reload fedbell-tier-node` there (or pass --node-pid for local nodes)"
    )
