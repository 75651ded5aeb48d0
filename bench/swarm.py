"""Many simulated doorbells in one process, for the scale benchmark.

Each doorbell is a real MQTT v5 connection with its own client id (and, on
the TLS production broker, its own login and password, and a client
certificate of the site CA): it publishes a retained online status (with an
offline last will), subscribes to the round topic and, when the round that
selects it is announced, publishes one update envelope of the federated head
(the retained global model's tensors), signed with its own Ed25519 key, that
was built before the round (so the machine is busy with the aggregator, not
with training). The base model is checked against the aggregator's key.

A thousand paho network threads would measure the scheduler, not fedbell, so
one process drives a few hundred clients from a single `poll()` loop with
paho's manual `loop_read`/`loop_write`/`loop_misc` calls. `bench.scale` starts
a handful of these processes (`python -m bench.swarm SPEC_JSON`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import select
import ssl
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench.devices import doorbell_client, publish_online
from fedbell.wire.envelope import Codec
from fedbell.wire.messages import AGGREGATOR, GlobalModel, Signer, build_update, parse_global
from fedbell.wire.protocol import RoundAnnouncement
from fedbell.wire.signing import load_private_key, load_public_key
from fedbell.wire.topics import Topics

log = logging.getLogger("bench.swarm")

MAX_BYTES = 16 * 1024 * 1024
DELTA_SCALE = 0.01
"""Standard deviation of the simulated deltas: about what a couple of epochs of
Adam at lr 1e-3 move a weight (a few dozen steps of ~1e-3, partly cancelling)."""
MISC_EVERY_S = 1.0
"""How often every client's keep-alive bookkeeping (`loop_misc`) runs."""


@dataclass(frozen=True)
class SwarmSpec:
    """What one worker process simulates."""

    port: int
    site: str
    codec: Codec
    density: float
    devices: tuple[str, ...]
    seed: int
    round_id: int = 1
    base_version: int = 0
    host: str = "127.0.0.1"
    keys_dir: str | None = None
    """`<device>.key` (Ed25519 PEM) per device: updates are signed with them."""
    aggregator_key: str | None = None
    """The aggregator's public key (PEM): the base model must verify against it."""
    tls: dict[str, str] | None = None
    """{"ca": ..., "cert": ..., "key": ...}: connect over TLS with this client certificate."""
    passwords: str | None = None
    """A JSON file {device: password}: each device logs in as itself."""


def connect_options(spec: SwarmSpec, client: mqtt.Client, login: str) -> None:
    """TLS and the login of `login` on `client`, as the spec says."""
    if spec.passwords is not None:
        passwords: dict[str, str] = json.loads(Path(spec.passwords).read_text())
        client.username_pw_set(login, passwords[login])
    if spec.tls is not None:
        client.tls_set(
            ca_certs=spec.tls["ca"],
            certfile=spec.tls["cert"],
            keyfile=spec.tls["key"],
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )


@dataclass(frozen=True)
class SwarmReport:
    """What a worker sends back: how many updates it published and got PUBACKs for."""

    devices: int
    sent: int
    acked: int
    first_sent: float
    last_sent: float
    errors: tuple[str, ...]


class _Device:
    """One doorbell's client and its update (built before the round)."""

    def __init__(self, spec: SwarmSpec, topics: Topics, name: str, update: bytes) -> None:
        self.name = name
        self.topics = topics
        self.spec = spec
        self.update = update
        self.connected = False
        self.sent_at: float | None = None
        self.acked = False
        self.client = doorbell_client(name, topics)
        connect_options(spec, self.client, name)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self._update_mid: int | None = None

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            raise RuntimeError(f"{self.name}: broker refused the connection: {reason}")
        self.connected = True
        client.subscribe(self.topics.round, qos=1)
        publish_online(client, self.topics, self.name)

    def _on_message(self, client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        announcement = _parse_round(bytes(message.payload))
        if (
            self.sent_at is None
            and announcement.round == self.spec.round_id
            and announcement.phase == "train"
            and self.name in announcement.selected
        ):
            info = client.publish(self.topics.update(self.name), self.update, qos=1)
            self._update_mid = info.mid
            self.sent_at = time.time()

    def _on_publish(
        self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _properties: Any
    ) -> None:
        if mid == self._update_mid:
            self.acked = True


@functools.lru_cache(maxsize=8)
def _parse_round(payload: bytes) -> RoundAnnouncement:
    """Parsed once per process: real doorbells parse it in parallel on their own Pis,
    here a few hundred would do it one after the other (a 1000-name list each)."""
    return RoundAnnouncement.model_validate_json(payload)


def _base_model(spec: SwarmSpec, topics: Topics, timeout: float) -> GlobalModel:
    """The retained global model the updates are deltas against."""
    got: list[GlobalModel] = []

    keys = None
    if spec.aggregator_key is not None:
        keys = {AGGREGATOR: load_public_key(Path(spec.aggregator_key))}

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        model = parse_global(bytes(message.payload), site=spec.site, max_bytes=MAX_BYTES, keys=keys)
        if model.version == spec.base_version:
            got.append(model)

    # Logged in as the first of its devices (before that device connects: one session a login).
    login = spec.devices[0]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=login, protocol=mqtt.MQTTv5)
    connect_options(spec, client, login)
    client.on_message = on_message
    client.on_connect = lambda c, *_a: c.subscribe(topics.global_model, qos=1)
    client.connect(spec.host, spec.port, keepalive=60)
    deadline = time.monotonic() + timeout
    while not got:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no global model version {spec.base_version} in {timeout}s")
        client.loop(timeout=0.2)
    client.disconnect()
    return got[0]


def build_updates(spec: SwarmSpec, base: GlobalModel) -> list[bytes]:
    """One envelope per device: its own random delta, encoded with its own name and
    signed with its own key."""
    rng = np.random.default_rng(spec.seed)
    payloads = []
    for index, name in enumerate(spec.devices):
        key = None
        if spec.keys_dir is not None:
            key = load_private_key(Path(spec.keys_dir) / f"{name}.key")
        delta = [
            rng.normal(0.0, DELTA_SCALE, size=w.shape).astype(np.float32) for w in base.weights
        ]
        payloads.append(
            build_update(
                site=spec.site,
                signer=Signer(name, key),
                round_id=spec.round_id,
                base_version=spec.base_version,
                num_examples=10 + index % 20,
                names=base.names,
                delta=delta,
                codec=spec.codec,
                density=spec.density,
            )
        )
    return payloads


def pump(devices: list[_Device], until: Callable[[], bool], timeout: float) -> None:
    """Drive every client's network I/O from one poll() loop until `until()` or timeout."""
    poller = select.poll()
    by_fd: dict[int, _Device] = {}
    wanted: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    next_misc = 0.0
    while not until():
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"swarm: condition not met in {timeout}s")
        for device in devices:
            sock = device.client.socket()
            if sock is None:
                continue
            fd = sock.fileno()
            mask = select.POLLIN | (select.POLLOUT if device.client.want_write() else 0)
            if fd not in by_fd:
                poller.register(fd, mask)
            elif wanted[fd] != mask:
                poller.modify(fd, mask)
            by_fd[fd], wanted[fd] = device, mask
        for fd, event in poller.poll(20):
            client = by_fd[fd].client
            if event & (select.POLLIN | select.POLLERR | select.POLLHUP):
                client.loop_read()
            if event & select.POLLOUT:
                client.loop_write()
        if now >= next_misc:
            for device in devices:
                device.client.loop_misc()
            next_misc = now + MISC_EVERY_S


def run_swarm(spec: SwarmSpec, stop: threading.Event, timeout: float = 900.0) -> SwarmReport:
    """Build updates, connect, say "ready" on stdout, answer the round until `stop`."""
    topics = Topics(spec.site)
    errors: list[str] = []
    devices: list[_Device] = []
    try:
        base = _base_model(spec, topics, timeout=120)
        devices = [
            _Device(spec, topics, name, payload)
            for name, payload in zip(spec.devices, build_updates(spec, base), strict=True)
        ]
        for device in devices:
            device.client.connect(spec.host, spec.port, keepalive=60)
        pump(devices, lambda: all(d.connected for d in devices), timeout=120)
        pump(devices, lambda: not any(d.client.want_write() for d in devices), timeout=60)
        print(json.dumps({"ready": len(devices)}), flush=True)
        pump(devices, stop.is_set, timeout=timeout)
    except Exception as err:  # reported to the parent, which fails the run
        errors.append(f"{type(err).__name__}: {err}")
    sent = [d.sent_at for d in devices if d.sent_at is not None]
    for device in devices:
        device.client.disconnect()
    return SwarmReport(
        devices=len(spec.devices),
        sent=len(sent),
        acked=sum(d.acked for d in devices),
        first_sent=min(sent, default=0.0),
        last_sent=max(sent, default=0.0),
        errors=tuple(errors),
    )


def main() -> int:
    """`python -m bench.swarm SPEC_JSON`: stdout gets a ready line, then the report
    line after "stop" arrives on stdin (JSON both ways: nothing is pickled)."""
    logging.basicConfig(level=logging.WARNING)
    raw = json.loads(sys.argv[1])
    spec = SwarmSpec(**{**raw, "devices": tuple(raw["devices"])})
    stop = threading.Event()

    def wait_for_stop() -> None:
        sys.stdin.readline()  # a line or EOF: the parent is done (or gone)
        stop.set()

    threading.Thread(target=wait_for_stop, daemon=True).start()
    report = run_swarm(spec, stop)
    print(json.dumps(dataclasses.asdict(report)), flush=True)
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
