"""A secure round (the product's default) across houses on the clustered tier, a node killed.

Real processes (tests/cluster_federation.py): three NATS nodes, two house hubs;
the real aggregator service on the tier, signing on, the shipped config's
secure rounds (secure aggregation, house-level DP at its default budget). Each
house's doorbells answer with the real doorbell's secure-round code
(`bench.cluster_bells.SecureHouse`: edge.secure.SecureParticipant, each
doorbell its own Ed25519 key) over MQTT 5 through their hub. Node 1 (the
aggregator's, and house1's bridge) is SIGKILLed once masked updates arrive.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import yaml

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService, Incoming
from bench.cluster_bells import SecureHouse
from bench.cluster_secure import kill_when, masked_count, sum_check, survivors_sum
from broker.cluster import AGGREGATOR_LOGIN, ClusterTier
from deploy.pki import create_signing_key
from tests.cluster_federation import HOUSES, SITE, TOPICS, Doorbell, Houses, houses
from tests.mqtt_helpers import wait_until
from tests.test_cluster import pytestmark

__all__ = ["houses", "pytestmark"]  # the fixture; skipped without nats-server

SHIPPED = Path(__file__).resolve().parents[1] / "config" / "aggregator.yaml"


def secure_config(folder: Path, tier: ClusterTier, cache_dir: Path) -> AggregatorConfig:
    """The shipped rounds (secure aggregation and DP on), signing with every doorbell's key;
    a phase waits 30 s for stragglers (a node's failover takes a few)."""
    rounds: dict[str, Any] = yaml.safe_load(SHIPPED.read_text())["rounds"]
    config = AggregatorConfig.model_validate(
        {
            "site": SITE,
            "state_dir": str(folder / "state"),
            "cache_dir": str(cache_dir),
            "signing": {
                "private_key_file": str(folder / "aggregator.key"),
                "trusted_keys_dir": str(folder / "trusted"),
            },
            "rounds": rounds | {"timeout_s": 30, "auto_pause_s": 0},
            "evaluation": {"detector": "haar"},
            "threads": 1,
        }
    )
    assert config.rounds.secure_aggregation
    return config.model_copy(update={"mqtt": tier.mqtt_settings(AGGREGATOR_LOGIN, keepalive=5)})


@contextmanager
def secure_federation(
    houses: Houses, folder: Path, cache_dir: Path
) -> Iterator[tuple[AggregatorService, list[Doorbell], dict[str, SecureHouse]]]:
    """The aggregator on the tier in a thread; every doorbell online (its status) and its
    secure-round worker on its house's hub, with the base model."""
    for sub in ("keys", "trusted"):
        (folder / sub).mkdir(parents=True)
    create_signing_key(folder / "aggregator.key", folder / "aggregator.pub")
    for names in HOUSES.values():
        for name in names:
            create_signing_key(folder / "keys" / f"{name}.key", folder / "trusted" / f"{name}.pub")
    service = AggregatorService(secure_config(folder, houses.tier, cache_dir))
    with ExitStack() as stack:
        stack.enter_context(_running(service))
        bells = {
            house: SecureHouse(
                SITE,
                house,
                houses.hubs[house].port,
                names,
                keys=folder / "keys",
                aggregator=folder / "aggregator.pub",
                seed=index,
            )
            for index, (house, names) in enumerate(HOUSES.items())
        }
        for house in bells.values():
            stack.callback(house.close)
        doorbells = [
            Doorbell(houses.hubs[house].port, name)
            for house, names in HOUSES.items()
            for name in names
        ]
        for doorbell in doorbells:
            stack.callback(doorbell.close)
        online = service.coordinator.federation.online
        wait_until(lambda: len(online) == len(doorbells), 60, "every doorbell online")
        wait_until(lambda: all(0 in h.models for h in bells.values()), 60, "the base model")
        yield service, doorbells, bells


@contextmanager
def _running(service: AggregatorService) -> Iterator[None]:
    thread = threading.Thread(target=service.run, name="aggregator", daemon=True)
    thread.start()
    try:
        yield
    finally:
        service.stop()
        thread.join(30)
    assert not thread.is_alive()


def test_a_secure_round_survives_a_node_killed_mid_round_and_counts_each_masked_input_once(
    houses: Houses, tmp_path: Path, aggregator_cache: Path
) -> None:
    with secure_federation(houses, tmp_path / "fed", aggregator_cache) as (service, doors, bells):
        federation = service.coordinator.federation
        before = [w.copy() for w in federation.model.weights]
        service.inbox.put(
            Incoming(TOPICS.control, b'{"cmd": "start_round"}'), TOPICS.control, commands=True
        )
        # Node 1 holds the aggregator's connection and house1's bridge: lose it while
        # the masked updates come in (or, if they were quicker, before the unmask).
        kill_when(lambda: masked_count(service) >= 3, lambda: houses.tier.kill_node(0), 60)
        wait_until(lambda: all(1 in d.models for d in doors), 120, "the new model in both houses")

        house = bells["house1"]
        report = {name: bell.report() for name, bell in bells.items()}
        check = sum_check(
            before,
            list(federation.model.weights),
            house.announcements["unmask"],
            survivors_sum(report, 1),
        )
        # Every doorbell's masked input made it through the failover, and the unmasked sum
        # is exactly theirs: none lost, none counted twice.
        assert check["survivors"] == sum(map(len, HOUSES.values()))
        assert check["counted_once"], check
        # What the failover redelivered was refused and counted, never added: a copy of an
        # answer already taken, or one of a phase that had ended (secagg_wrong_phase).
        assert set(federation.rejected) <= {"duplicate", "no_round", "late", "secagg_wrong_phase"}
