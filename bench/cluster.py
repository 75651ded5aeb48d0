"""`make bench-cluster`: rounds across many houses on the clustered tier (issue 23).

Real processes: three NATS nodes (broker/cluster.py) and one Mosquitto hub per
house, bridged to the tier (broker/cluster_hub.py); the real aggregator service
on the tier over MQTT 3.1.1 (fedbell/tier.py), with signing on (its key, one
trusted key per doorbell) and the shipped config's rounds
(config/aggregator.yaml): by default the product's round, a secure one (secure
aggregation, house-level DP at its default budget). Once the backbone is
retained at every hub, one MQTT 5 client per house publishes a retained status
for each of its doorbells; once the aggregator has every status, a round is
started (the operator's `start_round`, put in the aggregator's inbox: no login
may write the control topic on the tier). So round 1 is timed with the
federation at rest, not behind 28 MB of backbone to every hub and 10,000
statuses.

Secure rounds (bench/cluster_secure.py): the doorbells run in child processes
(bench/cluster_bells.py), each with the real doorbell's secure-round code over
MQTT through its hub; per phase, its time, the doorbells' and the aggregator's
CPU, and where the time went; the unmasked mean is checked against what the
survivors masked. `--plain`: plain rounds, each house's client sends one
signed top-k update per selected doorbell (a random small delta).

Measured per round: its time (announcement seen in the houses -> new model seen
in all of them), updates/s, bytes into and out of each node (NATS /varz),
memory of each node; and of this process (the aggregator runs in it, with the
house clients). `--kill-node` runs a second round in the same run and SIGKILLs
node 1 (the aggregator's, and a third of the hubs') once half the doorbells
have sent (secure: half the masked updates are in); it must still count each
update once. Exit status 1 when a round's participants are not the round's size.

    make bench-cluster ARGS="--houses 20 --doorbells 50 --round 200 --no-kill-node"
"""

from __future__ import annotations

import argparse
import json
import shutil
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService, Incoming
from bench.cluster_secure import (
    AggregatorCpu,
    Bells,
    PhaseWatch,
    doorbell_costs,
    kill_when,
    masked_count,
    phase_times,
    sum_check,
    survivors_sum,
    where_time_went,
)
from broker.cluster import AGGREGATOR_LOGIN, OBSERVER_LOGIN, ClusterTier
from broker.cluster_hub import HubBroker
from deploy.pki import create_signing_key
from fedbell.wire.backbone import parse_manifest
from fedbell.wire.messages import GlobalModel, Signer, build_update, parse_global
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, to_json
from fedbell.wire.topics import Topics

SITE = "bench"
TOPICS = Topics(SITE)
MAX_BYTES = 1024 * 1024
REPO = Path(__file__).resolve().parents[1]
BACKBONE_CACHES = (REPO / ".pytest_cache/d/fedbell-backbone", REPO / "reports/cache")


class House:
    """One house's doorbells, simulated by one MQTT 5 client on the house's hub."""

    def __init__(
        self, port: int, name: str, doorbells: list[str], trusted: Path, keys: Path | None = None
    ) -> None:
        """`keys`: also write each doorbell's private key there, for bench.cluster_bells."""
        self.name = name
        self.port = port
        self.keys = {device: Ed25519PrivateKey.generate() for device in doorbells}
        for device, key in self.keys.items():
            public = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
            (trusted / f"{device}.pub").write_bytes(public)
            if keys is not None:
                private = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
                (keys / f"{device}.key").write_bytes(private)
        self.doorbells = doorbells
        self.announcement: RoundAnnouncement | None = None
        self.announcements: dict[str, RoundAnnouncement] = {}
        """The last announcement of each phase (a secure round's plans)."""
        self.on_phase: Callable[[str], None] = lambda _key: None
        """Called with "round<n>:<phase>" when this hub first sees a phase announced."""
        self.models: dict[int, GlobalModel] = {}
        self.seen_at: dict[str, float] = {}
        self.last_chunk: str | None = None
        """The backbone's last chunk topic: retained here, the whole backbone is."""
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"house-{name}", protocol=mqtt.MQTTv5
        )
        self.client.max_inflight_messages_set(1000)
        self.client.on_message = self._record
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe(
            [(TOPICS.round, 1), (TOPICS.global_model, 1), (TOPICS.tflite_model, 1)]
        )

    def come_online(self) -> None:
        """A retained status from each doorbell: the aggregator selects among them."""
        online = to_json(DeviceStatus(state="online", model_version=0))
        for device in self.doorbells:
            self.client.publish(TOPICS.status(device), online, qos=1, retain=True)

    def _record(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == TOPICS.tflite_model:
            # The chunks follow their manifest in order: the last one's arrival
            # says the backbone is at the hub, without carrying 28 MB into here.
            payload = bytes(message.payload)
            manifest = parse_manifest(payload, site=SITE, max_bytes=MAX_BYTES, keys=None)
            self.last_chunk = TOPICS.backbone_chunk(len(manifest.chunks) - 1)
            self.client.subscribe(self.last_chunk, qos=1)
        elif message.topic == self.last_chunk:
            self.seen_at.setdefault("backbone", time.monotonic())
        elif message.topic == TOPICS.round:
            announcement = RoundAnnouncement.model_validate_json(message.payload)
            key = f"round{announcement.round}:{announcement.phase}"
            if key not in self.seen_at:
                self.seen_at[key] = time.monotonic()
                self.announcements[announcement.phase] = announcement
                self.on_phase(key)
            if announcement.phase in ("train", "keys"):  # a plain or a secure round begins
                self.announcement = announcement
                self.seen_at.setdefault(f"round{announcement.round}", time.monotonic())
        else:
            model = parse_global(bytes(message.payload), site=SITE, max_bytes=MAX_BYTES, keys=None)
            self.models[model.version] = model
            key = f"model{model.version}"
            if key not in self.seen_at:
                self.seen_at[key] = time.monotonic()
                self.on_phase(key)

    def send_updates(self, seed: int) -> tuple[int, int]:
        """A signed update from each selected doorbell of this house: (count, bytes)."""
        assert self.announcement is not None
        base = self.models[self.announcement.base_version]
        rng = np.random.default_rng(seed)
        sent, size, last = 0, 0, None
        for device in self.announcement.selected:
            if device not in self.keys:
                continue
            delta = [(rng.normal(size=w.shape) * 0.005).astype(np.float32) for w in base.weights]
            payload = build_update(
                site=SITE,
                signer=Signer(device, self.keys[device]),
                round_id=self.announcement.round,
                base_version=base.version,
                num_examples=5,
                names=base.names,
                delta=delta,
                codec=self.announcement.codec,
                density=self.announcement.density,
            )
            last = self.client.publish(TOPICS.update(device), payload, qos=1)
            sent, size = sent + 1, size + len(payload)
        if last is not None:
            last.wait_for_publish(60)
        return sent, size

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout}s")
        time.sleep(0.05)


def node_figures(tier: ClusterTier) -> list[dict[str, Any]]:
    """Bytes in and out and resident memory of every running node (its /varz)."""
    figures = []
    for node in tier.nodes:
        if node.process is None:
            figures.append({"node": node.name, "state": "killed"})
            continue
        url = f"http://127.0.0.1:{node.http_port}/varz"
        with urllib.request.urlopen(url, timeout=5) as response:
            varz = json.load(response)
        figures.append(
            {
                "node": node.name,
                "in_mb": varz["in_bytes"] / 1e6,
                "out_mb": varz["out_bytes"] / 1e6,
                "rss_mb": round(varz["mem"] / 1e6, 1),
            }
        )
    return figures


def round_figures(
    before: list[dict[str, Any]], after: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each node's bytes during the round (after minus before) and its memory after it."""
    figures = []
    for start, end in zip(before, after, strict=True):
        if "rss_mb" not in end:
            figures.append(end)
            continue
        figures.append(
            {
                "node": end["node"],
                "round_in_mb": round(end["in_mb"] - start.get("in_mb", 0.0), 2),
                "round_out_mb": round(end["out_mb"] - start.get("out_mb", 0.0), 2),
                "rss_mb": end["rss_mb"],
            }
        )
    return figures


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def at_rest(service: AggregatorService, members: list[House]) -> float:
    """Wait for the backbone at every hub, then every doorbell's status at the aggregator.

    Returns how long the backbone took to reach every hub from the aggregator's start.
    """
    serving = time.monotonic()
    wait_until(lambda: all("backbone" in h.seen_at for h in members), 600, "backbone")
    backbone_s = max(h.seen_at["backbone"] for h in members) - serving
    for house in members:
        house.come_online()
    everyone = sum(len(house.doorbells) for house in members)
    wait_until(lambda: len(service.coordinator.federation.online) == everyone, 600, "statuses")
    return backbone_s


def timed_round(
    number: int,
    tier: ClusterTier,
    service: AggregatorService,
    members: list[House],
    metrics: list[dict[str, Any]],
    *,
    kill_node: bool,
) -> dict[str, Any]:
    """Round `number` from its announcement to its model in every house; node 1 killed
    once half the houses have sent, if `kill_node`."""
    start = Incoming(TOPICS.control, b'{"cmd": "start_round"}')
    service.inbox.put(start, TOPICS.control, commands=True)
    key = f"round{number}"
    wait_until(lambda: all(key in h.seen_at for h in members), 600, f"round {number} announced")
    wait_until(lambda: all(number - 1 in h.models for h in members), 120, "base model")
    announced = min(h.seen_at[key] for h in members)
    before = node_figures(tier)
    sent, update_bytes = 0, 0
    for index, house in enumerate(members):
        count, size = house.send_updates(seed=number * len(members) + index)
        sent, update_bytes = sent + count, update_bytes + size
        if kill_node and index == len(members) // 2:
            tier.kill_node(0)
    wait_until(lambda: all(number in h.models for h in members), 600, "new model")
    done = max(h.seen_at[f"model{number}"] for h in members)
    wait_until(lambda: any(m.get("round") == number for m in metrics), 60, "round metrics")
    last = [m for m in metrics if m.get("round") == number][-1]
    round_s = done - announced
    return {
        "round": number,
        "node_killed": kill_node,
        "round_s": round(round_s, 2),
        "updates_per_s": round(sent / round_s, 1),
        "updates_sent": sent,
        "participants": last.get("participants"),
        "rejected": last.get("rejected"),
        "update_kb_mean": round(update_bytes / max(sent, 1) / 1024, 1),
        "nodes": round_figures(before, node_figures(tier)),
    }


def secure_round(
    number: int,
    tier: ClusterTier,
    service: AggregatorService,
    members: list[House],
    metrics: list[dict[str, Any]],
    *,
    bells: Bells,
    cpu: AggregatorCpu,
    on_tier: dict[str, float],
    watch: PhaseWatch,
    kill_node: bool,
) -> dict[str, Any]:
    """Secure round `number`: the doorbells (bells) answer each phase on their own; node 1
    killed once half the selected doorbells' masked updates are in, if `kill_node`."""
    federation = service.coordinator.federation
    before = [w.copy() for w in federation.model.weights]
    nodes_before = node_figures(tier)
    start = Incoming(TOPICS.control, b'{"cmd": "start_round"}')
    service.inbox.put(start, TOPICS.control, commands=True)
    key = f"round{number}"
    wait_until(lambda: all(key in h.seen_at for h in members), 600, f"round {number} announced")
    announced = min(h.seen_at[key] for h in members)
    selected = len(members[0].announcements["keys"].selected)
    killed_at = None
    if kill_node:
        kill_when(lambda: masked_count(service) >= selected // 2, lambda: tier.kill_node(0), 900)
        killed_at = {
            "masked_in": masked_count(service),
            "s": round(time.monotonic() - announced, 2),
        }

    def ended() -> bool:
        closed = any(f"round{number}:abandoned" in h.seen_at for h in members)
        return closed or all(number in h.models for h in members)

    wait_until(ended, 900, f"round {number}'s new model at every hub (or its abandonment)")
    wait_until(lambda: any(m.get("round") == number for m in metrics), 60, "round metrics")
    last = [m for m in metrics if m.get("round") == number][-1]
    report = bells.report()
    costs = doorbell_costs(report, number)
    result: dict[str, Any] = {
        "round": number,
        "secure": True,
        "node_killed": killed_at,
        "outcome": last.get("outcome"),
        "detail": last.get("detail"),
        "participants": last.get("participants"),
        "rejected": last.get("rejected"),
        "dropped": len(last.get("dropped", [])),
        "epsilon": last.get("epsilon"),
        "phases": phase_times(number, list(members), cpu),
        "doorbells": costs,
        "announcement_kb": {
            phase: round(len(a.model_dump_json()) / 1000, 1)
            for phase, a in members[0].announcements.items()
            if a.round == number
        },
        "nodes": round_figures(nodes_before, node_figures(tier)),
        "bells_rss_mb": bells.rss_mb(),
    }
    if last.get("outcome") == "published":
        done = max(h.seen_at[f"model{number}"] for h in members)
        model_at = time.time() - (time.monotonic() - done)
        result["split"] = where_time_went(number, on_tier, watch.all_in, costs, model_at)
        result["round_s"] = round(done - announced, 2)
        result["updates_per_s"] = round(last["participants"] / (done - announced), 1)
        result["sum"] = sum_check(
            before,
            list(federation.model.weights),
            members[0].announcements["unmask"],
            survivors_sum(report, number),
        )
    return result


def aggregator_config(
    folder: Path, tier: ClusterTier, selected: int, *, secure: bool, phase_timeout: float | None
) -> AggregatorConfig:
    """The product's rounds (config/aggregator.yaml: codec, secure aggregation and its
    house-level DP, clipping...), a round of `selected`, signing on; `secure` False: the
    same with secure aggregation off (plain signed top-k updates, the baseline)."""
    cache = next((path for path in BACKBONE_CACHES if path.is_dir()), folder / "cache")
    key, _public = folder / "aggregator.key", folder / "aggregator.pub"
    create_signing_key(key, _public)
    shipped = yaml.safe_load((REPO / "config" / "aggregator.yaml").read_text())["rounds"]
    rounds = shipped | {"secure_aggregation": secure, "max_devices": selected, "auto_pause_s": 0}
    if phase_timeout is not None:  # a phase (a plain round) waits this long for stragglers
        rounds["timeout_s"] = phase_timeout
    if not secure:
        rounds["min_updates"] = selected  # the round closes once every update is in
    base = AggregatorConfig.model_validate(
        {
            "site": SITE,
            "state_dir": str(folder / "state"),
            "cache_dir": str(cache),
            "signing": {
                "private_key_file": str(key),
                "trusted_keys_dir": str(folder / "trusted"),
            },
            "rounds": rounds,
            "evaluation": {"detector": "haar"},
        }
    )
    on_tier = tier.mqtt_settings(AGGREGATOR_LOGIN, keepalive=10)
    return base.model_copy(update={"mqtt": on_tier})


def tier_observer(
    tier: ClusterTier, metrics: list[dict[str, Any]], on_tier: dict[str, float]
) -> mqtt.Client:
    """A client on node 3 that keeps each round's metrics and, in `on_tier`, when it first
    saw each phase of a round announced ("round<n>:<phase>": Unix time)."""
    observer = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    login = tier.login(OBSERVER_LOGIN)
    observer.username_pw_set(login.name, login.password())
    observer.tls_set(str(login.ca_file), str(login.cert_file), str(login.key_file))

    def observe(_client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        body = json.loads(message.payload)
        if message.topic == TOPICS.metrics:
            metrics.append(body)
        else:
            on_tier.setdefault(f"round{body['round']}:{body['phase']}", time.time())

    observer.on_message = observe
    observer.connect(*tier.mqtt_endpoints[-1])
    observer.loop_start()
    observer.subscribe([(TOPICS.metrics, 1), (TOPICS.round, 1)])
    return observer


def run(folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    names = [f"h{index}" for index in range(args.houses)]
    secure = not args.plain
    (folder / "trusted").mkdir(parents=True, exist_ok=True)
    keys = folder / "keys" if secure else None
    if keys is not None:
        keys.mkdir()
    with ExitStack() as stack:
        started = time.monotonic()
        tier = stack.enter_context(
            ClusterTier(folder / "tier", SITE, hubs=names, ack_wait=args.ack_wait)
        )
        hubs = [stack.enter_context(HubBroker(folder / name, tier, name)) for name in names]
        up_s = time.monotonic() - started
        members = [
            House(
                hub.port,
                name,
                [f"{name}d{i}" for i in range(args.doorbells)],
                folder / "trusted",
                keys,
            )
            for hub, name in zip(hubs, names, strict=True)
        ]
        for house in members:
            stack.callback(house.close)
        metrics: list[dict[str, Any]] = []
        on_tier: dict[str, float] = {}
        observer = tier_observer(tier, metrics, on_tier)

        config = aggregator_config(
            folder, tier, args.round, secure=secure, phase_timeout=args.phase_timeout
        )
        service = AggregatorService(config)
        thread = threading.Thread(target=service.run, name="aggregator", daemon=True)
        thread.start()
        cpu = AggregatorCpu(thread)
        for house in members:
            house.on_phase = cpu.mark
        try:
            backbone_s = at_rest(service, members)
            kills = (False, True) if args.kill_node else (False,)
            if secure:
                assert keys is not None
                bells = Bells(
                    folder / "bells",
                    SITE,
                    list(members),
                    keys_dir=keys,
                    aggregator_key=folder / "aggregator.pub",
                    processes=args.processes,
                )
                stack.callback(bells.close)
                watch = PhaseWatch(service)
                stack.callback(watch.close)
                rounds = []
                for number, kill in enumerate(kills, start=1):
                    measured = secure_round(
                        number,
                        tier,
                        service,
                        members,
                        metrics,
                        bells=bells,
                        cpu=cpu,
                        on_tier=on_tier,
                        watch=watch,
                        kill_node=kill,
                    )
                    rounds.append(measured)
            else:
                rounds = [
                    timed_round(number, tier, service, members, metrics, kill_node=kill)
                    for number, kill in enumerate(kills, start=1)
                ]
        finally:
            service.stop()
            thread.join(60)
            observer.loop_stop()
            observer.disconnect()
    return {
        "houses": args.houses,
        "doorbells": args.houses * args.doorbells,
        "real_hubs": args.houses,
        "selected": args.round,
        "secure": secure,
        "rounds_config": {
            k: v
            for k, v in config.rounds.model_dump().items()
            if k
            in (
                "codec",
                "density",
                "downlink_codec",
                "secure_density",
                "secure_clip_norm",
                "min_cohort",
                "timeout_s",
                "privacy",
            )
        },
        "ack_wait": args.ack_wait,
        "tier_up_s": round(up_s, 1),
        "backbone_at_every_hub_s": round(backbone_s, 1),
        "rounds": rounds,
        "bench_process_rss_mb": rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__)
    # The defaults are issue 23's: 10,000 doorbells, a round of 1,000, a node lost.
    parser.add_argument("--houses", type=int, default=20, help="real hubs (Mosquitto each)")
    parser.add_argument("--doorbells", type=int, default=500, help="simulated per house")
    parser.add_argument("--round", type=int, default=1000, help="doorbells selected")
    parser.add_argument(
        "--kill-node",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="a second round, node 1 SIGKILLed mid-round",
    )
    parser.add_argument(
        "--plain", action="store_true", help="plain signed top-k rounds, secure aggregation off"
    )
    parser.add_argument(
        "--processes", type=int, default=2, help="secure rounds: processes running the doorbells"
    )
    parser.add_argument(
        "--phase-timeout",
        type=float,
        help="rounds.timeout_s: how long a phase waits for stragglers (s; default: the "
        "shipped config's)",
    )
    parser.add_argument("--ack-wait", default="5s", help="the tier's QoS 1 redelivery delay")
    parser.add_argument(
        "--dir",
        type=Path,
        default=REPO / "reports" / "cluster",
        help="each run in a new folder here (~2 GB: the nodes' JetStream, the hubs' stores), "
        "deleted at the end unless --keep",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the run's folder (logs, stores) afterwards"
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "cluster.json")
    args = parser.parse_args(argv)
    if args.round > args.houses * args.doorbells:
        parser.error("--round is larger than houses x doorbells")
    args.dir.mkdir(parents=True, exist_ok=True)
    folder = args.dir / time.strftime("%Y%m%d-%H%M%S")
    try:
        result = run(folder, args)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(done["participants"] == args.round for done in result["rounds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
