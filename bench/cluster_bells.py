"""Secure rounds' doorbells for `bench.cluster`: some houses' doorbells, in a child process.

    python -m bench.cluster_bells SPEC_FILE

Each house: one MQTT 5 client on its hub (as `bench.cluster.House`) and one
worker thread, the doorbell's own worker; each of its doorbells answers with
the real doorbell's code, `edge.secure.SecureParticipant` (the client step
`secure_update`, then fedbell.wire.secagg_client's SecAggClient: signed key
advert, encrypted shares, masked update, unmask answer), signed with its own
Ed25519 key, over MQTT through its hub. Instead of training, a random delta,
made once the house's adverts are out (a doorbell advertises, then trains).
A round announcement is parsed and its signature checked once per house (not
once per doorbell: a real doorbell does that on its own CPU, in parallel with
the others; here 1,000 doorbells share two cores). The roster and the inbox
each doorbell's SecAggClient parses itself, as on a doorbell.

Child processes, not threads beside the aggregator: the doorbells' cryptography
is most of a secure round's CPU here (~20 ms a doorbell at 1,000), and one
interpreter runs one thread at a time.

stdin "report" -> one JSON line on stdout: per round and phase, the doorbells'
CPU seconds (each house's worker thread) and the worker's busy wall time,
messages and bytes sent, refusals by reason, and the sum of the encoded values
of its doorbells among the round's survivors (bench.cluster checks the
aggregator's unmasked mean against it: each accepted masked input counted
once). EOF: exit. JSON both ways, nothing pickled.
"""

from __future__ import annotations

import base64
import json
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from edge.plan import PlanLimits, check_announcement
from edge.secure import SecureParticipant
from fedbell.errors import RejectedMessage
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import AGGREGATOR, GlobalModel, parse_global
from fedbell.wire.protocol import MAX_ROUND_BYTES, RoundAnnouncement, parse_json
from fedbell.wire.signing import load_private_key, load_public_key
from fedbell.wire.topics import Topics

MAX_BYTES = 1024 * 1024
DELTA_SCALE = 0.005
"""The random deltas' standard deviation, as bench.cluster's plain updates."""


@dataclass
class PhaseCost:
    cpu_s: float = 0.0
    busy_s: float = 0.0
    sent: int = 0
    bytes: int = 0
    started: float = 0.0
    """Unix time the house's worker took up the phase's announcement."""
    done: float = 0.0
    """Unix time its last doorbell had answered (published)."""


@dataclass
class RoundLog:
    """What one house's doorbells did in one round."""

    phases: dict[str, PhaseCost] = field(default_factory=dict)
    refused: Counter[str] = field(default_factory=Counter)
    survivors_sum: np.ndarray | None = None
    """uint32 sum (mod 2^32) of the encoded values of this house's doorbells among the
    unmask phase's survivors."""


class SecureHouse:
    """One house's doorbells in secure rounds (see the module docstring)."""

    def __init__(
        self,
        site: str,
        name: str,
        port: int,
        devices: list[str],
        *,
        keys: Path,
        aggregator: Path,
        seed: int,
    ) -> None:
        self.topics = Topics(site)
        self.site = site
        self.aggregator_key = load_public_key(aggregator)
        self.models: dict[int, GlobalModel] = {}
        self.rounds: dict[int, RoundLog] = {}
        self.announcements: dict[str, RoundAnnouncement] = {}
        """The last announcement of each phase this house's doorbells answered."""
        self.lock = threading.Lock()
        self._work: queue.Queue[bytes | None] = queue.Queue()
        self._rng = np.random.default_rng(seed)
        self._sent_values: dict[tuple[int, str], np.ndarray] = {}
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"bells-{name}", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(1000)
        self._bytes = self._messages = 0
        self.doorbells = {
            device: SecureParticipant(
                device,
                self.topics,
                load_private_key(keys / f"{device}.key"),
                publish=self._publish,
                on_sent=lambda _number, _residual: None,
            )
            for device in devices
        }
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        inboxes = f"{self.topics.base}/secagg/inbox/+"
        self.client.subscribe([(self.topics.round, 1), (self.topics.global_model, 1), (inboxes, 1)])
        self._worker = threading.Thread(target=self._run, name=f"house-{name}", daemon=True)
        self._worker.start()

    def _publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)
        self._bytes += len(payload)
        self._messages += 1

    def _on_message(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        if message.topic == self.topics.round:
            self._work.put(payload)
        elif message.topic == self.topics.global_model:
            keys = {AGGREGATOR: self.aggregator_key}
            model = parse_global(payload, site=self.site, max_bytes=MAX_BYTES, keys=keys)
            with self.lock:
                self.models[model.version] = model
        elif (doorbell := self.doorbells.get(message.topic.rsplit("/", 1)[1])) is not None:
            doorbell.on_inbox(payload)

    def _run(self) -> None:
        while (payload := self._work.get()) is not None:
            started, cpu, wall = time.monotonic(), time.thread_time(), time.time()
            announcement = parse_json(payload, RoundAnnouncement, max_bytes=MAX_ROUND_BYTES)
            check_announcement(
                announcement,
                site=self.site,
                aggregator_key=self.aggregator_key,
                require_signature=True,
                limits=PlanLimits(),
            )
            if announcement.secagg is None:
                continue
            self.announcements[announcement.phase] = announcement
            self._bytes = self._messages = 0
            self._answer(announcement)
            with self.lock:
                log = self.rounds.setdefault(announcement.round, RoundLog())
                cost = log.phases.setdefault(announcement.phase, PhaseCost())
                cost.cpu_s += time.thread_time() - cpu
                cost.busy_s += time.monotonic() - started
                cost.started, cost.done = cost.started or wall, time.time()
                cost.sent += self._messages
                cost.bytes += self._bytes

    def _answer(self, announcement: RoundAnnouncement) -> None:
        """Each of this house's selected doorbells takes its part in the announced phase."""
        number, phase = announcement.round, announcement.phase
        if phase in ("closed", "abandoned"):
            for doorbell in self.doorbells.values():
                doorbell.end(number)
            return
        mine = [device for device in announcement.selected if device in self.doorbells]
        if phase == "keys":  # as a doorbell: its advert first, then it trains
            self._each(number, mine, lambda doorbell: doorbell.begin(announcement))
            self._each(number, mine, lambda doorbell: self._prepare(doorbell, announcement))
        else:
            self._each(number, mine, lambda doorbell: doorbell.step(announcement))
        if phase == "unmask" and announcement.secagg is not None:
            self._sum_survivors(number, announcement.secagg.survivors)

    def _each(
        self, number: int, devices: list[str], act: Callable[[SecureParticipant], None]
    ) -> None:
        """`act` on each of the doorbells; a refusal counted, the others go on."""
        for device in devices:
            try:
                act(self.doorbells[device])
            except RejectedMessage as err:
                with self.lock:
                    self.rounds.setdefault(number, RoundLog()).refused[err.reason] += 1

    def _prepare(self, doorbell: SecureParticipant, announcement: RoundAnnouncement) -> None:
        """Instead of training: a random delta, then the doorbell's own client step."""
        doorbell.prepare(announcement, self._delta(announcement.base_version))
        if (update := doorbell.update) is not None:  # for the survivors' sum
            self._sent_values[(announcement.round, doorbell.device)] = update.values

    def _delta(self, version: int) -> Weights:
        with self.lock:
            base = self.models[version]
        return [
            (self._rng.normal(size=w.shape) * DELTA_SCALE).astype(np.float32) for w in base.weights
        ]

    def _sum_survivors(self, number: int, survivors: tuple[str, ...]) -> None:
        total: np.ndarray | None = None
        for device in survivors:
            values = self._sent_values.get((number, device))
            if values is not None:
                total = values.copy() if total is None else total + values
        with self.lock:
            self.rounds.setdefault(number, RoundLog()).survivors_sum = total

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {
                str(number): {
                    "phases": {name: vars(cost) for name, cost in log.phases.items()},
                    "refused": dict(log.refused),
                    "survivors_sum": None
                    if log.survivors_sum is None
                    else base64.b64encode(log.survivors_sum.astype("<u4").tobytes()).decode(),
                }
                for number, log in self.rounds.items()
            }

    def close(self) -> None:
        self._work.put(None)
        self._worker.join(10)
        self.client.disconnect()
        self.client.loop_stop()


def main() -> int:
    """`python -m bench.cluster_bells SPEC_FILE` (see the module docstring)."""
    spec = json.loads(Path(sys.argv[1]).read_text())
    keys, aggregator = Path(spec["keys_dir"]), Path(spec["aggregator_key"])
    houses = {
        house["name"]: SecureHouse(
            spec["site"],
            house["name"],
            house["port"],
            house["devices"],
            keys=keys,
            aggregator=aggregator,
            seed=spec["seed"] + index,
        )
        for index, house in enumerate(spec["houses"])
    }
    deadline = time.monotonic() + 120
    while not all(house.models for house in houses.values()):  # subscribed: the model came
        if time.monotonic() > deadline:
            raise TimeoutError("no retained global model at some hub in 120 s")
        time.sleep(0.05)
    print(json.dumps({"ready": len(houses)}), flush=True)
    for line in sys.stdin:
        if line.strip() == "report":
            report = {name: house.report() for name, house in houses.items()}
            print(json.dumps(report), flush=True)
    for house in houses.values():
        house.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
