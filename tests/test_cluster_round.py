"""A round across houses on the clustered tier, with a node SIGKILLed in the middle.

Real processes (tests/cluster_federation.py): three NATS nodes, two house
hubs, the real aggregator service on the tier over MQTT 3.1.1 with failover
(fedbell/tier.py); doorbells reduced to their MQTT behaviour.
"""

from __future__ import annotations

import threading
from pathlib import Path

from aggregator.service import AggregatorService
from tests.cluster_federation import (
    Houses,
    aggregator_config,
    assert_exact_mean,
    doorbells_of,
    houses,
    random_deltas,
)
from tests.mqtt_helpers import wait_until
from tests.test_cluster import pytestmark

__all__ = ["houses", "pytestmark"]  # the fixture; skipped without nats-server


def test_a_round_survives_a_node_killed_mid_round_and_counts_each_update_once(
    houses: Houses, tmp_path: Path, aggregator_cache: Path
) -> None:
    doorbells = doorbells_of(houses.hubs)
    service = AggregatorService(aggregator_config(tmp_path, houses.tier, aggregator_cache))
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
        deltas = random_deltas(base, len(doorbells))

        half = len(doorbells) // 2
        for index in range(half):
            doorbells[index].send_update(base, deltas[index], 1 + index)
        # Node 1 holds the aggregator's connection (its first address) and house1's
        # bridge (the hubs are spread over the nodes, ClusterTier.endpoints_for):
        # lose it while updates are on their way.
        houses.tier.kill_node(0)
        for index in range(half, len(doorbells)):
            doorbells[index].send_update(base, deltas[index], 1 + index)

        wait_until(
            lambda: all(1 in d.models for d in doorbells), 120, "the new model in both houses"
        )
        for doorbell in doorbells:
            assert_exact_mean(doorbell.models[1], base, deltas)
        # Whatever the failover redelivered was refused, not counted: as a
        # duplicate while the round was open, as `no_round` once it had closed.
        assert set(service.coordinator.federation.rejected) <= {"duplicate", "no_round"}
    finally:
        service.stop()
        thread.join(30)
        for doorbell in doorbells:
            doorbell.close()
    assert not thread.is_alive()
