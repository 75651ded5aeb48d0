"""Light-weight simulated doorbells: real MQTT clients, no TensorFlow.

Each device is its own paho client (own client id, last will, retained
online status) that answers every round it is selected for with a real
`build_update` envelope of the federated head: a fixed small random delta of
the retained global model's tensors against the round's base version, in the
round's codec, signed with the device's Ed25519 key when it has one (and the
global model checked against the aggregator's key). Used by the soak
(`bench/soak.py`, many rounds in one process) and by the fault tests, which
run a fleet as its own process so it can be SIGKILLed:

    python -m bench.devices --port 1883 --site soak --names d00,d01 [--delay 2]
                            [--keys-dir DIR --aggregator-key PEM]
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from paho.mqtt.enums import CallbackAPIVersion

from bench.steps import answer
from fedbell.errors import RejectedMessage
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import AGGREGATOR, Signer, parse_global
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, parse_json, to_json
from fedbell.wire.signing import load_private_key, load_public_key
from fedbell.wire.topics import Topics

log = logging.getLogger("bench.devices")

MAX_BYTES = 16 * 1024 * 1024
DELTA_SCALE = 1e-3


def doorbell_client(name: str, topics: Topics) -> mqtt.Client:
    """A simulated doorbell's MQTT v5 client: its own id, its offline status as last will."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5)
    client.will_set(topics.status(name), to_json(DeviceStatus(state="offline")), qos=1, retain=True)
    return client


def publish_online(client: mqtt.Client, topics: Topics, name: str) -> None:
    """The retained status a simulated doorbell publishes on connecting: online, model 0."""
    status = DeviceStatus(state="online", model_version=0)
    client.publish(topics.status(name), to_json(status), qos=1, retain=True)


class SimulatedDoorbell:
    """One device: status, the model's tensor layout, one update per selected round."""

    def __init__(
        self,
        name: str,
        port: int,
        site: str,
        *,
        delay_s: float = 0.0,
        examples: int = 10,
        seed: int = 0,
        key: Ed25519PrivateKey | None = None,
        trusted: Mapping[str, Ed25519PublicKey] | None = None,
    ) -> None:
        self.name = name
        self.key = key
        """Signs this device's updates (None: unsigned, for an open test site)."""
        self.trusted = trusted
        """The aggregator's key a global model must verify against (None: not checked)."""
        self.site = site
        self.topics = Topics(site)
        self.delay_s = delay_s
        self.examples = examples
        self.seed = seed
        self.sent: list[int] = []
        """Rounds this device sent an update for."""
        self._layout: tuple[list[str], Weights] | None = None  # names, fixed delta
        self._answered: set[int] = set()
        self._lock = threading.Lock()
        self.client = doorbell_client(name, self.topics)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            return
        client.subscribe([(self.topics.global_model, 1), (self.topics.round, 1)])
        publish_online(client, self.topics, self.name)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            if message.topic == self.topics.global_model and message.payload:
                self._on_global(bytes(message.payload))
            elif message.topic == self.topics.round and message.payload:
                self._on_round(parse_json(bytes(message.payload), RoundAnnouncement))
        except RejectedMessage as err:
            log.warning("%s dropped a message on %s: %s", self.name, message.topic, err)

    def _on_global(self, payload: bytes) -> None:
        if self._layout is not None:
            return  # the layout never changes; only the first model is decoded
        model = parse_global(payload, site=self.site, max_bytes=MAX_BYTES, keys=self.trusted)
        rng = np.random.default_rng(self.seed)
        delta = [(rng.normal(size=w.shape) * DELTA_SCALE).astype(np.float32) for w in model.weights]
        self._layout = (list(model.names), delta)

    def _on_round(self, announcement: RoundAnnouncement) -> None:
        number = announcement.round
        with self._lock:
            if (
                announcement.phase != "train"
                or self.name not in announcement.selected
                or number in self._answered
                or self._layout is None
            ):
                return
            self._answered.add(number)
        if self.delay_s > 0:
            threading.Timer(self.delay_s, self._answer, (announcement,)).start()
        else:
            self._answer(announcement)

    def _answer(self, announcement: RoundAnnouncement) -> None:
        assert self._layout is not None
        names, delta = self._layout
        payload = answer(
            announcement,
            site=self.site,
            signer=Signer(self.name, self.key),
            num_examples=self.examples,
            names=names,
            delta=delta,
        )
        self.client.publish(self.topics.update(self.name), payload, qos=1)
        self.sent.append(announcement.round)

    def ready(self) -> bool:
        return self.client.is_connected() and self._layout is not None

    def close(self) -> None:
        self.client.publish(
            self.topics.status(self.name),
            to_json(DeviceStatus(state="offline")),
            qos=1,
            retain=True,
        )
        self.client.disconnect()
        self.client.loop_stop()


class Fleet:
    """Many simulated doorbells in one process."""

    def __init__(
        self,
        names: Sequence[str],
        port: int,
        site: str,
        delay_s: float = 0.0,
        *,
        keys_dir: Path | None = None,
        aggregator_key: Path | None = None,
    ) -> None:
        """`keys_dir`: `<name>.key` per device (Ed25519 PEM) to sign updates with;
        `aggregator_key`: the public key global models must verify against."""
        trusted = None
        if aggregator_key is not None:
            trusted = {AGGREGATOR: load_public_key(aggregator_key)}
        self.devices = [
            SimulatedDoorbell(
                name,
                port,
                site,
                delay_s=delay_s,
                seed=index,
                key=None if keys_dir is None else load_private_key(keys_dir / f"{name}.key"),
                trusted=trusted,
            )
            for index, name in enumerate(names)
        ]

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not all(device.ready() for device in self.devices):
            if time.monotonic() > deadline:
                waiting = [d.name for d in self.devices if not d.ready()]
                raise TimeoutError(f"devices without a model after {timeout}s: {waiting}")
            time.sleep(0.05)

    def close(self) -> None:
        for device in self.devices:
            device.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run simulated doorbells until SIGTERM.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--site", required=True)
    parser.add_argument("--names", required=True, help="comma-separated device ids")
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="seconds between a round's announcement and the answer",
    )
    parser.add_argument("--keys-dir", type=Path, default=None, help="<name>.key signing keys")
    parser.add_argument(
        "--aggregator-key", type=Path, default=None, help="the aggregator's public key (PEM)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
    fleet = Fleet(
        args.names.split(","),
        args.port,
        args.site,
        args.delay,
        keys_dir=args.keys_dir,
        aggregator_key=args.aggregator_key,
    )
    fleet.wait_ready()
    print("ready", flush=True)
    stop.wait()
    fleet.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
