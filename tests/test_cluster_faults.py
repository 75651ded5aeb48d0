"""Faults on the clustered tier beyond a node kill (issue 23, item 3).

A hub cut off from the tier and back mid-round, and the aggregator SIGKILLed
mid-round and started again: no accepted update lost or counted twice, the
retained model and backbone still served, every doorbell on the latest
version. Real processes: tests/cluster_federation.py's houses, and the
aggregator in a thread or as `python -m aggregator`.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import yaml

from aggregator.state import StateStore
from tests.cluster_federation import (
    HOUSES,
    Doorbell,
    Houses,
    aggregator_config,
    assert_exact_mean,
    doorbells_of,
    houses,
    late_doorbell_backbone,
    random_deltas,
    round_on_tier,
)
from tests.federation import READY, STARTUP, Process
from tests.mqtt_helpers import wait_until
from tests.test_aggregator import received
from tests.test_cluster import pytestmark

__all__ = ["houses", "pytestmark"]  # the fixture; skipped without nats-server

CUT_OFF_S = 5.0
"""How long house2 stays cut off once house1's updates are in: ample for its
queued updates to have arrived, had the cut let anything through."""


def test_a_hub_cut_off_mid_round_serves_its_doorbells_and_delivers_once_back(
    houses: Houses, tmp_path: Path, aggregator_cache: Path
) -> None:
    with round_on_tier(houses, tmp_path, aggregator_cache) as opened:
        doorbells = opened.doorbells
        houses.cut_off()
        # A doorbell of the cut-off house restarts: its hub alone gives it the
        # house's retained model and round.
        doorbells[3].close()
        doorbells[3] = Doorbell(houses.hubs["house2"].port, "b1")
        wait_until(
            lambda: 0 in doorbells[3].models and doorbells[3].announced(1),
            30,
            "the model and the round from the cut-off hub",
        )
        for index, doorbell in enumerate(doorbells):
            doorbell.send_update(opened.base, opened.deltas[index], 1 + index)  # its hub acks
        wait_until(lambda: len(received(opened.service)) == 3, 60, "house1's three updates")
        time.sleep(CUT_OFF_S)
        assert sorted(received(opened.service)) == ["a1", "a2", "a3"]  # house2's wait at its hub

        houses.reconnect()
        opened.assert_published_once_each()


def accepted(log: str) -> list[str]:
    """The doorbells whose updates an aggregator's log says it accepted, in order."""
    return re.findall(r"accepted update from (\S+) ", log)


def persisted(state_dir: Path) -> list[str]:
    """The doorbells whose updates the open round in `state_dir` has committed."""
    record = StateStore(state_dir).load()
    assert record is not None
    assert record.round is not None
    return list(record.round.received)


def test_the_aggregator_killed_mid_round_loses_and_repeats_no_update(
    houses: Houses, tmp_path: Path, aggregator_cache: Path, processes: list[Process]
) -> None:
    config = aggregator_config(tmp_path, houses.tier, aggregator_cache)
    config_file = tmp_path / "aggregator.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    aggregator = Process(tmp_path / "aggregator.log", "aggregator", "--config", str(config_file))
    processes.append(aggregator)
    aggregator.start().wait_log(READY, STARTUP)
    doorbells = doorbells_of(houses.hubs)
    try:
        wait_until(lambda: all(d.announced(1) for d in doorbells), 60, "round 1 announced")
        wait_until(lambda: all(0 in d.models for d in doorbells), 30, "the base model")
        base = doorbells[0].models[0]
        deltas = random_deltas(base, len(doorbells))

        # Two updates committed to the state folder (and so acknowledged), a
        # third accepted in memory only, when the aggregator is killed.
        for index in range(2):
            doorbells[index].send_update(base, deltas[index], 1 + index)
        wait_until(lambda: sorted(persisted(config.state_dir)) == ["a1", "a2"], 30, "two committed")
        doorbells[2].send_update(base, deltas[2], 3)
        aggregator.wait_log("3/6 updates", 60)
        aggregator.kill()  # SIGKILL: what it had not committed is gone
        committed = persisted(config.state_dir)
        for index in range(3, len(doorbells)):
            # Stored by the tier in the aggregator's session while it is down.
            doorbells[index].send_update(base, deltas[index], 1 + index)
        aggregator.start().wait_log(READY, STARTUP)

        wait_until(
            lambda: all(1 in d.models for d in doorbells), 120, "the new model in both houses"
        )
        for doorbell in doorbells:
            assert set(doorbell.models) == {0, 1}
            assert_exact_mean(doorbell.models[1], base, deltas)
        # The second life accepts exactly what the first had not committed: a
        # committed update the tier redelivers is refused as a duplicate, an
        # uncommitted one (never acknowledged) comes again and counts.
        names = [name for house in HOUSES.values() for name in house]
        assert sorted(accepted(aggregator.log())) == sorted(set(names) - set(committed))

        # Still served after the restart, to a doorbell that was not there:
        # the new model, and the whole backbone it names.
        late = Doorbell(houses.hubs["house2"].port, "b4")
        doorbells.append(late)
        wait_until(lambda: 1 in late.models, 30, "the retained model, to a late doorbell")
        backbone = late_doorbell_backbone(houses.hubs["house2"].port)
        assert hashlib.sha256(backbone.float_model).hexdigest() == late.models[1].backbone
    finally:
        for doorbell in doorbells:
            doorbell.close()
