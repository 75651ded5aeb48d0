"""A tier node's production configuration (`provision node-config`, deploy/tier_node.py).

Three nodes' bundles made by the operator's command on 127.0.0.1 with distinct
ports, and three real nats-server processes started from exactly those files:
the routes form (TLS, each node with its own certificate), and a hub's login
over TLS on one node publishes a retained message a client on another node
reads. Then the refusals of bad input.
"""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from broker.cluster import AGGREGATOR_LOGIN, TierLogin, find_nats_server
from broker.local import free_port, signal_and_wait
from deploy import provision
from deploy.tier import Tier, TierError, TierRole, add_login, hub_login, init_tier
from deploy.tier_node import (
    CONFIG_NAME,
    DEFAULT_NODE_DIR,
    DEFAULT_STORE,
    ROUTE_PASSWORD_FILE,
    ROUTE_USER,
    node_bundle,
)
from tests.test_cluster import SITE, TierClient
from tests.test_cluster import pytestmark as needs_nats_server

BASE = f"fedbell/{SITE}"


@dataclass(frozen=True)
class NodePorts:
    mqtt: int
    cluster: int
    monitor: int


def node_config(root: Path, name: str, *options: str) -> str:
    return provision.run(["node-config", name, "--tier-dir", str(root), *options])


def loopback_options(root: Path, name: str, ports: NodePorts, others: list[NodePorts]) -> list[str]:
    """node-config's options for a node on 127.0.0.1, its bundle used where it is made."""
    return [
        f"--listen=127.0.0.1:{ports.mqtt}",
        f"--cluster-listen=127.0.0.1:{ports.cluster}",
        *[f"--route=127.0.0.1:{other.cluster}" for other in others],
        f"--monitor=127.0.0.1:{ports.monitor}",
        f"--store={root / 'jetstream' / name}",
        f"--node-dir={node_bundle(root, name)}",
    ]


def bundle_login(root: Path, name: str) -> TierLogin:
    folder = root / "logins" / name
    return TierLogin(
        name, folder / "password", folder / "client.crt", folder / "client.key", folder / "ca.crt"
    )


def monitor(port: int, path: str) -> dict[str, object] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{path}", timeout=2) as answer:
            data: dict[str, object] = json.load(answer)
            return data
    except (urllib.error.URLError, OSError, ValueError):
        return None


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[list[NodePorts]]:
    """A tier with a hub and the aggregator, its three nodes running from node-config's files."""
    ports = [NodePorts(free_port(), free_port(), free_port()) for _ in range(3)]
    init_tier(tmp_path, SITE, "fedbell", [f"127.0.0.1:{node.mqtt}" for node in ports])
    provision.run(["add-hub", "house1", "--tier-dir", str(tmp_path)])
    add_login(Tier.load(tmp_path), AGGREGATOR_LOGIN, TierRole.AGGREGATOR)
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index, node in enumerate(ports):
            name = f"n{index + 1}"
            others = [other for other in ports if other is not node]
            node_config(tmp_path, name, *loopback_options(tmp_path, name, node, others))
            with (tmp_path / f"{name}.log").open("wb") as log:
                processes.append(
                    subprocess.Popen(
                        [find_nats_server(), "-c", str(node_bundle(tmp_path, name) / CONFIG_NAME)],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield ports
    finally:
        for process in processes:
            signal_and_wait(process, signal.SIGTERM, timeout=15)


@needs_nats_server
def test_three_nodes_from_node_config_form_a_tier_that_carries_retained_mqtt(
    three_nodes: list[NodePorts], tmp_path: Path
) -> None:
    deadline = time.monotonic() + 60
    routes: list[object] = []
    while time.monotonic() < deadline:
        routes = [(monitor(node.monitor, "routez") or {}).get("num_routes") for node in three_nodes]
        if routes == [2, 2, 2]:
            break
        time.sleep(0.2)
    logs = "".join(path.read_text() for path in sorted(tmp_path.glob("n*.log")))
    assert routes == [2, 2, 2], logs  # every node routed to both others, over TLS
    # The MQTT streams are made once JetStream has a leader: right after the routes
    # form a publish can be lost (broker/cluster.py's wait_ready), so try again.
    first, _, last = three_nodes
    received = None
    attempt = 0
    while received is None and time.monotonic() < deadline:
        attempt += 1
        token = f"update-{attempt}".encode()
        hub = TierClient(bundle_login(tmp_path, hub_login("house1")), first.mqtt, f"hub-{attempt}")
        try:
            hub.publish(f"{BASE}/update/cam1", token, retain=True)
        except (RuntimeError, ValueError):
            continue  # not connected yet
        finally:
            hub.close()
        reader = TierClient(bundle_login(tmp_path, AGGREGATOR_LOGIN), last.mqtt, f"agg-{attempt}")
        try:
            reader.subscribe(f"{BASE}/update/+")
            message = reader.wait_for(f"{BASE}/update/+", timeout=5)
            if message is not None and message.payload == token:
                received = message
        except AssertionError:
            continue  # no SUBACK yet
        finally:
            reader.close()
    assert received is not None, logs
    assert received.retain  # kept by the tier after the hub left, served by another node


def route_handshake(root: Path, port: int, login: TierLogin, password: str | None) -> str:
    """What a node answers a route peer that shows `login`'s certificate (from the tier's
    CA) and `password` as the route login, then pings: NATS 2.9's route protocol, TLS
    first, then the node's INFO, CONNECT and PING."""
    context = ssl.create_default_context(cafile=str(login.ca_file))
    context.check_hostname = False
    context.load_cert_chain(str(login.cert_file), str(login.key_file))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw) as tls,
    ):
        fields: dict[str, object] = {"verbose": False, "pedantic": False, "name": "probe"}
        fields |= {"tls_required": True, "cluster": "fedbell"}
        if password is not None:
            fields |= {"user": ROUTE_USER, "pass": password}
        tls.sendall(f"CONNECT {json.dumps(fields)}\r\nPING\r\n".encode())
        answer = b""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and b"PONG" not in answer and b"-ERR" not in answer:
            try:
                chunk = tls.recv(4096)
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            answer += chunk
        return answer.decode(errors="replace")


@needs_nats_server
def test_a_hubs_certificate_alone_cannot_join_the_tier_as_a_node(
    three_nodes: list[NodePorts], tmp_path: Path
) -> None:
    hub = bundle_login(tmp_path, hub_login("house1"))
    first = three_nodes[0]
    refused = route_handshake(tmp_path, first.cluster, hub, password=None)
    assert "Authorization Violation" in refused
    guessed = route_handshake(tmp_path, first.cluster, hub, password="not-the-route-password")
    assert "Authorization Violation" in guessed
    # The same handshake with the route password is a route (the probe can pass).
    password = (tmp_path / ROUTE_PASSWORD_FILE).read_text()
    assert "PONG" in route_handshake(tmp_path, first.cluster, hub, password=password)


def test_node_config_writes_a_bundle_for_the_installed_node(tmp_path: Path) -> None:
    nodes = ["n1.example.org:8883", "n2.example.org:8883", "n3.example.org:8883"]
    init_tier(tmp_path, SITE, "fedbell", nodes)
    report = node_config(
        tmp_path,
        "n2",
        "--cluster-listen=10.0.0.2:6222",
        "--route=10.0.0.1:6222",
        "--route=10.0.0.3:6222",
    )
    bundle = node_bundle(tmp_path, "n2")
    assert str(bundle) in report
    assert {path.name for path in bundle.iterdir()} == {
        CONFIG_NAME,
        "accounts.conf",
        "ca.crt",
        "server.crt",
        "server.key",
    }
    assert (bundle / "server.key").stat().st_mode & 0o077 == 0
    config = (bundle / CONFIG_NAME).read_text()
    assert 'listen: "0.0.0.0:8883"' in config  # init-tier's port for n2, every interface
    assert 'listen: "10.0.0.2:6222"' in config
    password = (tmp_path / ROUTE_PASSWORD_FILE).read_text()
    assert (tmp_path / ROUTE_PASSWORD_FILE).stat().st_mode & 0o077 == 0
    assert (
        f'"nats-route://route:{password}@10.0.0.1:6222",\n'
        f'    "nats-route://route:{password}@10.0.0.3:6222"'
    ) in config
    assert f'password: "{password}"' in config  # what this node asks of its route peers
    assert f'store_dir: "{DEFAULT_STORE}"' in config
    assert f'cert_file: "{DEFAULT_NODE_DIR}/server.crt"' in config
    assert "log_file" not in config  # to the journal
    cert = x509.load_pem_x509_certificate((bundle / "server.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    # What the hubs dial and what the other nodes route to; not the other nodes' names.
    assert [str(name.value) for name in names] == ["n2.example.org", "10.0.0.2"]
    # add-hub refreshes the copy of accounts.conf the node's configuration includes.
    provision.run(["add-hub", "house1", "--tier-dir", str(tmp_path)])
    accounts = (tmp_path / "accounts.conf").read_text()
    assert hub_login("house1") in accounts
    assert (bundle / "accounts.conf").read_text() == accounts


@pytest.mark.parametrize(
    ("name", "options", "error"),
    [
        ("n4", ["--cluster-listen=10.0.0.4:6222"], "unknown node 'n4'"),
        ("n1", ["--cluster-listen=0.0.0.0:6222"], "not an address the other nodes can route to"),
        ("n1", ["--cluster-listen=10.0.0.1"], "host:port, not '10.0.0.1'"),
        ("n1", ["--cluster-listen=10.0.0.1:6222", "--route=n2 x:6222"], "not 'n2 x:6222'"),
        ("n1", ["--cluster-listen=10.0.0.1:6222", "--route=n2:99999"], "not 'n2:99999'"),
        ("n1", ["--cluster-listen=10.0.0.1:6222", "--route=n2:6222"], "other 2 nodes"),
        ("n1", ["--cluster-listen=h:1", "--route=n2:1", "--route=n2:1"], "duplicate --route"),
        ("n1", ["--cluster-listen=h:1", "--route=h:1", "--route=n2:1"], "own --cluster-listen"),
        ("n1", ["--cluster-listen=h:8883", "--route=a:1", "--route=b:1"], "duplicate port"),
        ("n1", ["--cluster-listen=h:1", "--route=a:1", "--route=b:1", "--store=/a b"], "path"),
        ("n1", ["--cluster-listen=h:1", "--route=a:1", "--route=b:1", "--store=js"], "absolute"),
    ],
)
def test_node_config_refuses_bad_input_and_writes_nothing(
    tmp_path: Path, name: str, options: list[str], error: str
) -> None:
    init_tier(tmp_path, SITE, "fedbell", ["n1.example.org:8883", "n2:8883", "n3:8883"])
    with pytest.raises(TierError, match=error):
        node_config(tmp_path, name, *options)
    assert not (tmp_path / "nodes").exists()


def test_node_config_needs_a_tier(tmp_path: Path) -> None:
    with pytest.raises(TierError, match="no tier in"):
        node_config(tmp_path, "n1", "--cluster-listen=10.0.0.1:6222")
