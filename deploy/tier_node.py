"""One node of the federation tier: the nats-server configuration it runs on.

    python -m deploy.provision node-config n1 --listen 0.0.0.0:8883 \\
        --cluster-listen 10.0.0.1:6222 --route 10.0.0.2:6222 --route 10.0.0.3:6222

writes, in the tier folder (deploy/tier.py), the bundle `nodes/<name>/`: what
goes into that machine's /etc/fedbell/tier-node/ for
systemd/fedbell-tier-node.service:

    nats-server.conf       broker/cluster.conf filled in for this node
    accounts.conf          the tier's logins; `add-hub` and `remove-hub` refresh
                           this copy, the operator copies it to the node again
                           and reloads it
    ca.crt server.crt server.key
                           the node's own certificate from the tier's CA, a
                           server for the hubs and the aggregator and both ends
                           of its routes; each node holds its own key only

A route peer must show a certificate from the tier's CA and the tier's route
password (`route.password` in the tier folder, made with the first node's
bundle): every hub holds a certificate from that CA too.

`<name>` is `n1`, `n2`, ...: the order of `init-tier --node`, whose host
(what the hubs and the aggregator dial) the certificate names, with the host
of `--cluster-listen` (what the other nodes route to: nats-server checks a
route peer's certificate against the host it dialled, and refused one
without it: "cannot validate certificate for 127.0.0.1 because it doesn't
contain any IP SANs"). broker/cluster.py renders its loopback nodes here too.
"""

from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

from deploy import pki
from deploy.files import make_dir, write_private, write_public
from deploy.tier import REPO, Address, Tier, TierError

NODE_TEMPLATE = REPO / "broker" / "cluster.conf"
CONFIG_NAME = "nats-server.conf"
DEFAULT_NODE_DIR = "/etc/fedbell/tier-node"
"""Where a node's bundle is installed: the unit's ExecStart reads its config there."""
DEFAULT_STORE = "/var/lib/fedbell-tier-node"
"""The unit's StateDirectory=, owned by the user nats-server runs as."""
DEFAULT_MONITOR = "127.0.0.1:8222"
ACK_WAIT = "5s"
"""QoS 1 redelivery delay (broker/cluster.conf says why not NATS's 30 s)."""
ROUTE_USER = "route"
ROUTE_PASSWORD_FILE = "route.password"  # noqa: S105 - a file name
"""In the tier folder: the password the nodes ask of each other's routes."""
WILDCARDS = frozenset({"0.0.0.0", "::"})  # noqa: S104 - recognised, never bound here
UNSAFE_IN_PATH = ' "\n{}$'


@dataclass(frozen=True)
class NodeListeners:
    """Where one node listens, and the other nodes' route addresses."""

    mqtt: Address
    cluster: Address
    routes: tuple[Address, ...]
    monitor: Address
    client_port: int = -1
    """NATS's own client listener on loopback (no fedbell login uses it); -1: any free port."""


def node_names(tier: Tier) -> list[str]:
    return [f"n{index + 1}" for index in range(len(tier.nodes))]


def registered_address(tier: Tier, name: str) -> Address:
    """Node `name`'s MQTT address as the hubs and the aggregator dial it (init-tier's --node)."""
    if name not in node_names(tier):
        raise TierError(
            f"unknown node {name!r}: this tier's are {', '.join(node_names(tier))} "
            "(init-tier's --node, in order)"
        )
    return Address.parse(tier.nodes[node_names(tier).index(name)])


def node_bundle(root: Path, name: str) -> Path:
    return root / "nodes" / name


def route_password(tier: Tier) -> str:
    """The password every node asks of a route peer, made once per tier.

    The route port also asks for a certificate from the tier's CA, but every hub
    holds one (its client certificate): without this, a hub that reaches a node's
    route port could join as a node and read every house's traffic. Only the
    nodes' configurations (and the operator's tier folder) hold it.
    """
    path = tier.root / ROUTE_PASSWORD_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32).encode())
    return path.read_text().strip()


def write_node_config(
    tier: Tier,
    name: str,
    listeners: NodeListeners,
    store_dir: Path,
    *,
    installed_at: Path | None = None,
    log_file: Path | None = None,
    ack_wait: str = ACK_WAIT,
) -> Path:
    """Node `name`'s bundle: its configuration, certificate and the logins; returns it.

    `installed_at`: where the node's machine puts the bundle (the paths in its
    configuration); None: where it is made (loopback nodes, tests). Run again,
    it replaces the bundle, with a new key.
    """
    public = registered_address(tier, name)
    _check_listeners(listeners, len(tier.nodes))
    bundle = node_bundle(tier.root, name)
    folder = installed_at or bundle.absolute()
    for path in (folder, store_dir, *([log_file] if log_file else [])):
        # nats-server would read a relative path from its working directory.
        if any(char in str(path) for char in UNSAFE_IN_PATH) or not path.is_absolute():
            raise TierError(f"unusable path in a node's configuration (absolute, plain): {path}")
    names = tuple(dict.fromkeys([public.host, listeners.cluster.host]))
    make_dir(bundle, 0o700)
    ca = pki.load(tier.tls_dir / "ca.crt", tier.tls_dir / "ca.key")
    write_public(bundle / "ca.crt", (tier.tls_dir / "ca.crt").read_bytes())
    node_cert = pki.issue(ca, name, "tier node", server_names=names, client_too=True)
    pki.save(node_cert, bundle / "server.crt", bundle / "server.key")
    write_private(bundle / "accounts.conf", tier.accounts.read_bytes())
    password = route_password(tier)
    routes = ",\n".join(
        f'    "nats-route://{ROUTE_USER}:{password}@{route}"' for route in listeners.routes
    )
    config = Template(NODE_TEMPLATE.read_text()).substitute(
        name=name,
        monitor=listeners.monitor,
        cluster_listen=listeners.cluster,
        routes=routes,
        route_user=ROUTE_USER,
        route_password=password,
        mqtt_listen=listeners.mqtt,
        client_port=listeners.client_port,
        store_dir=store_dir,
        tls_dir=folder,
        ack_wait=ack_wait,
    )
    if log_file is not None:  # in production nats-server logs to the journal
        config += f'log_file: "{log_file}"\n'
    # No login's password in it (their bcrypt hashes are in accounts.conf), only
    # the routes' own: readable by whoever runs the tier only.
    write_private(bundle / CONFIG_NAME, config.encode())
    return bundle


def _check_listeners(listeners: NodeListeners, nodes: int) -> None:
    if listeners.cluster.host in WILDCARDS:
        raise TierError(
            f"--cluster-listen {listeners.cluster} is not an address the other nodes can "
            "route to (its host goes into the node's certificate): give this node's own"
        )
    ports = [listeners.mqtt.port, listeners.cluster.port, listeners.monitor.port]
    if len(set(ports)) < len(ports):
        raise TierError(f"duplicate port: MQTT, cluster and monitor listen on {ports}")
    if len(set(listeners.routes)) < len(listeners.routes):
        raise TierError(f"duplicate --route in {[str(route) for route in listeners.routes]}")
    if listeners.cluster in listeners.routes:
        raise TierError(f"--route {listeners.cluster} is this node's own --cluster-listen")
    if len(listeners.routes) != nodes - 1:
        raise TierError(
            f"a node routes to each of the other {nodes - 1} nodes of the tier "
            f"(--route, repeat), not {len(listeners.routes)}"
        )


# ---------------------------------------------------------------- command


def add_command(sub: Any, on_tier: argparse.ArgumentParser) -> None:
    """`provision node-config` (`sub`: its subparsers; `on_tier`: the --tier-dir parent)."""
    p = sub.add_parser(
        "node-config", parents=[on_tier], help="a tier node's nats-server configuration bundle"
    )
    p.add_argument("name", help="n1, n2, ...: the order of init-tier's --node")
    p.add_argument(
        "--listen", help="MQTT host:port (default 0.0.0.0 and the port of init-tier's --node)"
    )
    p.add_argument("--cluster-listen", required=True, help="host:port the other nodes route to")
    p.add_argument(
        "--route", action="append", default=[], help="another node's --cluster-listen (repeat)"
    )
    p.add_argument("--monitor", default=DEFAULT_MONITOR, help="/healthz etc. (%(default)s)")
    p.add_argument("--store", type=Path, default=Path(DEFAULT_STORE), help="JetStream folder")
    p.add_argument(
        "--node-dir",
        type=Path,
        default=Path(DEFAULT_NODE_DIR),
        help="where the node installs its bundle (default %(default)s)",
    )


def run_command(args: argparse.Namespace) -> str:
    tier = Tier.load(args.tier_dir)
    port = registered_address(tier, args.name).port
    listeners = NodeListeners(
        mqtt=Address.parse(args.listen or f"0.0.0.0:{port}"),
        cluster=Address.parse(args.cluster_listen),
        routes=tuple(Address.parse(route) for route in args.route),
        monitor=Address.parse(args.monitor),
    )
    bundle = write_node_config(tier, args.name, listeners, args.store, installed_at=args.node_dir)
    return (
        f"node {args.name}: bundle {bundle}\n"
        f"install it as {args.node_dir} (owner root, group nats, files 0640) on that machine "
        "and start fedbell-tier-node.service (docs/many-houses.md)"
    )
