"""A round across houses on the clustered tier, with a node SIGKILLed in the middle.

Real processes (tests/cluster_federation.py): three NATS nodes, two house
hubs, the real aggregator service on the tier over MQTT 3.1.1 with failover
(fedbell/tier.py); doorbells reduced to their MQTT behaviour.
"""

from __future__ import annotations

from pathlib import Path

from tests.cluster_federation import Houses, houses, round_on_tier
from tests.test_cluster import pytestmark

__all__ = ["houses", "pytestmark"]  # the fixture; skipped without nats-server


def test_a_round_survives_a_node_killed_mid_round_and_counts_each_update_once(
    houses: Houses, tmp_path: Path, aggregator_cache: Path
) -> None:
    with round_on_tier(houses, tmp_path, aggregator_cache) as opened:
        doorbells, base, deltas = opened.doorbells, opened.base, opened.deltas
        half = len(doorbells) // 2
        for index in range(half):
            doorbells[index].send_update(base, deltas[index], 1 + index)
        # Node 1 holds the aggregator's connection (its first address) and house1's
        # bridge (the hubs are spread over the nodes, ClusterTier.endpoints_for):
        # lose it while updates are on their way.
        houses.tier.kill_node(0)
        for index in range(half, len(doorbells)):
            doorbells[index].send_update(base, deltas[index], 1 + index)
        opened.assert_published_once_each()
