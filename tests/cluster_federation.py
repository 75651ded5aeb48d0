"""Houses on the clustered tier for tests: the tier, two hubs, doorbells, a link to cut.

Real processes: three NATS nodes (broker/cluster.py), two house hubs
(Mosquitto bridged to the tier, broker/cluster_hub.py); doorbells reduced to
their MQTT behaviour, each on its house's hub over MQTT 5. The aggregator is
the tests' own to start: in a thread, or as a process to kill.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from broker.cluster import AGGREGATOR_LOGIN, ClusterTier
from broker.cluster_hub import HubBroker
from broker.local import free_port
from fedbell.wire.backbone import BackboneAssembly, parse_manifest
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import GlobalModel, Signer, TfliteArtifact, build_update, parse_global
from fedbell.wire.protocol import DeviceStatus, to_json
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import wait_until

SITE = "fed"
TOPICS = Topics(SITE)
HOUSES = {"house1": ["a1", "a2", "a3"], "house2": ["b1", "b2", "b3"]}
MAX_BYTES = 1024 * 1024
BACKBONE_BYTES = 128 * 1024 * 1024


class Doorbell:
    """A doorbell's MQTT behaviour on its house's hub: a status, the model, the round, updates."""

    def __init__(self, port: int, name: str) -> None:
        self.name = name
        self.models: dict[int, GlobalModel] = {}
        self.rounds: list[dict[str, object]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
        self.client.on_message = self._record
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe([(TOPICS.global_model, 1), (TOPICS.round, 1)])
        status = to_json(DeviceStatus(state="online", model_version=0))
        self.client.publish(TOPICS.status(name), status, qos=1, retain=True).wait_for_publish(5)

    def _record(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == TOPICS.global_model:
            model = parse_global(bytes(message.payload), site=SITE, max_bytes=MAX_BYTES, keys=None)
            self.models[model.version] = model
        else:
            self.rounds.append(json.loads(message.payload))

    def announced(self, round_id: int) -> bool:
        """The last round message it got is `round_id`'s training phase."""
        last = self.rounds[-1] if self.rounds else {}
        return last.get("round") == round_id and last.get("phase") == "train"

    def send_update(self, base: GlobalModel, delta: Weights, examples: int) -> None:
        payload = build_update(
            site=SITE,
            signer=Signer(self.name),
            round_id=1,
            base_version=base.version,
            num_examples=examples,
            names=base.names,
            delta=delta,
            codec="float32",
        )
        self.client.publish(TOPICS.update(self.name), payload, qos=1).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def doorbells_of(hubs: dict[str, HubBroker]) -> list[Doorbell]:
    """Every doorbell of HOUSES on its house's hub, house1's first."""
    return [Doorbell(hubs[house].port, name) for house, names in HOUSES.items() for name in names]


def random_deltas(base: GlobalModel, count: int) -> list[Weights]:
    rng = np.random.default_rng(0)
    return [
        [(rng.normal(size=w.shape) * 0.005).astype(np.float32) for w in base.weights]
        for _ in range(count)
    ]


def assert_exact_mean(model: GlobalModel, base: GlobalModel, deltas: list[Weights]) -> None:
    """`model` is `base` plus the plain mean of `deltas`.

    Every house weighs the same (rounds.weighting houses), whatever count it
    claims: an update counted twice, or one lost, would move the mean.
    """
    for index, (got, start) in enumerate(zip(model.weights, base.weights, strict=True)):
        mean = sum(delta[index].astype(np.float64) for delta in deltas) / len(deltas)
        np.testing.assert_allclose(got, start + mean, rtol=1e-5, atol=1e-6)


def late_doorbell_backbone(port: int, timeout: float = 120.0) -> TfliteArtifact:
    """What a doorbell that connects now to the hub on `port` assembles: the retained
    manifest and every chunk, each checked against it."""
    assembly = BackboneAssembly()
    artifacts: list[TfliteArtifact] = []

    def receive(_client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        if message.topic == TOPICS.tflite_model:
            manifest = parse_manifest(payload, site=SITE, max_bytes=MAX_BYTES, keys=None)
            assembly.expect(manifest)
        elif (artifact := assembly.add(TOPICS.chunk_index(message.topic), payload)) is not None:
            artifacts.append(artifact)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="late", protocol=mqtt.MQTTv5)
    client.on_message = receive
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        # The manifest first, then the chunks: a chunk before its manifest is ignored.
        client.subscribe(TOPICS.tflite_model, qos=1)
        wait_until(lambda: assembly.manifest is not None, timeout, "the retained manifest")
        client.subscribe(TOPICS.backbone_chunks, qos=1)
        wait_until(lambda: artifacts, timeout, "every retained backbone chunk")
    finally:
        client.disconnect()
        client.loop_stop()
    return artifacts[0]


def aggregator_config(tmp_path: Path, tier: ClusterTier, cache_dir: Path) -> AggregatorConfig:
    """The aggregator on the tier: node 1 first, then the others (fedbell/tier.py)."""
    base = AggregatorConfig.model_validate(
        {
            "site": SITE,
            "state_dir": str(tmp_path / "state"),
            "cache_dir": str(cache_dir),
            "rounds": {
                "codec": "float32",
                "downlink_codec": "float32",
                "timeout_s": 90,
                "min_updates": sum(map(len, HOUSES.values())),
                "auto_pause_s": 0,
            },
            "auto_rounds": 1,
            "evaluation": {"detector": "haar"},
            "threads": 1,
        }
    )
    on_tier = tier.mqtt_settings(AGGREGATOR_LOGIN, keepalive=5)
    return base.model_copy(update={"mqtt": on_tier})


class Link:
    """A TCP link from a local port to `target` that a test can cut and mend.

    Cut, it closes every connection it carries and stops listening: the
    bridge's connections close and new ones are refused, as with a tier out
    of reach. (Accepting and closing at once instead, mid TLS handshake, left
    Mosquitto 2.0.11's bridge, once in three runs, never trying again:
    docs/many-houses.md.)
    """

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server: socket.socket | None = None
        self.mend()

    def mend(self) -> None:
        """Listen again, on the same port."""
        self._server = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._server,), daemon=True).start()

    def sever(self) -> None:
        # shutdown, not only close: a thread blocked in accept or recv on a
        # socket keeps it open after close, and the bridge would notice nothing.
        with self._lock:
            sockets, self._open = self._open, []
        if self._server is not None:
            sockets.append(self._server)
            self._server = None
        for connection in sockets:
            with contextlib.suppress(OSError):  # already closed by its peer
                connection.shutdown(socket.SHUT_RDWR)
            connection.close()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                near, _ = server.accept()
            except OSError:  # closed by `sever`
                return
            try:
                far = socket.create_connection(self.target)
            except OSError:  # the node is down: the bridge tries its next address
                near.close()
                continue
            with self._lock:
                self._open += [near, far]
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy bytes one way until either side closes, then close both."""
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        source.close()
        sink.close()


@dataclass
class Houses:
    """The tier, a hub per house, and the links house2's bridge goes through."""

    tier: ClusterTier
    hubs: dict[str, HubBroker]
    links: list[Link]

    def cut_off(self) -> None:
        """House2's hub loses the tier; its doorbells keep their hub."""
        for link in self.links:
            link.sever()

    def reconnect(self) -> None:
        for link in self.links:
            link.mend()


@dataclass
class OpenRound:
    """Round 1 open on the tier: the aggregator serving in a thread, every doorbell of
    both houses with the base model, and a random delta for each."""

    service: AggregatorService
    doorbells: list[Doorbell]
    base: GlobalModel
    deltas: list[Weights]

    def assert_published_once_each(self) -> None:
        """Every doorbell gets version 1, the exact mean of all the deltas: nothing lost;
        whatever a failover redelivered was refused, not counted (a duplicate while the
        round was open, `no_round` once it had closed). A failover can also redeliver a
        burst of a doorbell's queued status messages, which the aggregator's inbox drops
        past `inbox_per_sender` (`backlog_full`: flow control, not a refusal; seen in a
        CI run, the mean still exact)."""
        wait_until(
            lambda: all(1 in d.models for d in self.doorbells), 120, "the new model in both houses"
        )
        for doorbell in self.doorbells:
            assert_exact_mean(doorbell.models[1], self.base, self.deltas)
        refused = set(self.service.coordinator.federation.rejected)
        assert refused <= {"duplicate", "no_round", "backlog_full"}, refused


@contextlib.contextmanager
def round_on_tier(houses: Houses, tmp_path: Path, cache_dir: Path) -> Iterator[OpenRound]:
    """The aggregator service on the tier in a thread, until round 1 reaches every doorbell."""
    doorbells = doorbells_of(houses.hubs)
    service = AggregatorService(aggregator_config(tmp_path, houses.tier, cache_dir))
    thread = threading.Thread(target=service.run, name="aggregator", daemon=True)
    thread.start()
    try:
        wait_until(
            lambda: all(d.announced(1) for d in doorbells),
            60,
            "every doorbell, in both houses, sees round 1 announced",
        )
        wait_until(lambda: all(0 in d.models for d in doorbells), 30, "the base model")
        base = doorbells[0].models[0]
        yield OpenRound(service, doorbells, base, random_deltas(base, len(doorbells)))
    finally:
        service.stop()
        thread.join(30)
        for doorbell in doorbells:
            doorbell.close()
    assert not thread.is_alive()


@pytest.fixture
def houses(tmp_path: Path) -> Iterator[Houses]:
    """Both houses up on a fresh tier, house2's bridge through links to each node."""
    with ExitStack() as stack:
        tier = stack.enter_context(ClusterTier(tmp_path / "tier", SITE, hubs=list(HOUSES)))
        links = [Link(endpoint) for endpoint in tier.endpoints_for("house2")]
        for link in links:
            stack.callback(link.sever)
        through = [("127.0.0.1", link.port) for link in links]
        hubs = {
            "house1": stack.enter_context(HubBroker(tmp_path / "house1", tier, "house1")),
            "house2": stack.enter_context(HubBroker(tmp_path / "house2", tier, "house2", through)),
        }
        yield Houses(tier, hubs, links)
