"""The coordinator's seams: its parts share one state, and the functions they export.

`aggregator.coordinator.Coordinator` wires `Intake`, `RoundMachine`,
`SecureRounds` and `Releases` around one `Federation`; `secagg_plan` is the
secure round's plan the coordinator and the in-process bench loop announce.
The rounds themselves are tested through the coordinator (test_aggregator*.py,
test_secure_coordinator.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from aggregator.config import DEFAULT_MAX_DROPOUT
from aggregator.coordinator import Coordinator
from aggregator.export import Exporter
from aggregator.round_machine import AutoRounds
from aggregator.secure_rounds import secagg_plan
from aggregator.state import StateStore
from bench import federated
from fedbell.errors import RejectedMessage
from fedbell.wire import masking
from fedbell.wire.messages import Signer
from fedbell.wire.protocol import DeviceStatus, SecAggPlan, to_json
from tests.test_aggregator import TOPICS, make_config

LINEAGE = "0123456789abcdef"


def plan(
    lineage: str = LINEAGE,
    cohort: int = 8,
    noise_multiplier: float = 1.0,
    max_dropout: float = DEFAULT_MAX_DROPOUT,
) -> SecAggPlan:
    """Round 3's plan for a head of 2000 values, a quarter of them sent, min_cohort 4."""
    return secagg_plan(
        round_id=3,
        lineage=lineage,
        dimension=2000,
        cohort=cohort,
        density=0.25,
        clip_norm=2.0,
        noise_multiplier=noise_multiplier,
        min_cohort=4,
        max_dropout=max_dropout,
    )


def test_secagg_plan_subsets_masks_and_splits_the_noise() -> None:
    announced = plan()
    subset = masking.shared_subset(2000, 0.25, 3, LINEAGE)
    assert (announced.dimension, announced.size, announced.density) == (2000, len(subset), 0.25)
    assert announced.clip_norm == 2.0
    # with noise, the round may lose 30 % of its 8 (max_dropout): the 5 that must remain
    # share the noise, z C / sqrt(5), and fewer than 5 are never unmasked
    assert announced.noise_std == pytest.approx(1.0 * 2.0 / 5**0.5)
    assert announced.min_cohort == 5
    assert plan(noise_multiplier=0.0).min_cohort == 4  # no noise to protect: min_cohort
    assert 0 < announced.threshold <= announced.neighbours < 8
    assert plan() == announced
    # a cohort smaller than min_cohort (the bench's small runs) masks among itself
    assert plan(cohort=3).min_cohort == 3
    assert plan(noise_multiplier=0.0).noise_std == 0.0


def test_the_noise_of_a_large_round_is_split_among_the_survivors_it_needs() -> None:
    """Issue 22: split among min_cohort (4) doorbells, a round of 100 that all answer would
    carry 5 times the noise its guarantee needs; split among the 70 that must survive, 1.2."""
    large = plan(cohort=100)
    assert large.min_cohort == 70
    assert large.noise_std == pytest.approx(2.0 / 70**0.5)
    everyone = large.noise_std * 100**0.5
    assert 2.0 <= everyone <= 1.2 * 2.0  # the sum of all 100 against z C
    strict = plan(cohort=100, max_dropout=0.0)
    assert strict.min_cohort == 100
    assert strict.noise_std == pytest.approx(2.0 / 10)


def test_the_bench_announces_the_aggregators_plan() -> None:
    secure = federated.Secure(clip_norm=2.0, noise_multiplier=1.0, min_cohort=4, density=0.25)
    assert federated.secagg_plan(secure, 2000, 3, 8) == plan(lineage=federated.LINEAGE)


def test_automatic_rounds_are_armed_once_and_pause_after_each_round() -> None:
    now = [100.0]
    auto = AutoRounds(remaining=2, pause_s=5.0, clock=lambda: now[0])
    assert auto.next_at == float("inf")  # not before the aggregator is connected
    auto.arm()
    assert auto.next_at == 105.0
    now[0] = 103.0
    auto.arm()  # a reconnection does not postpone the next round
    assert auto.next_at == 105.0
    auto.round_ended()
    assert auto.next_at == 108.0


@pytest.fixture
def coordinator(tmp_path: Path, aggregator_cache: Path) -> tuple[Coordinator, list[str]]:
    config = make_config(tmp_path, 1, aggregator_cache)
    published: list[str] = []
    state = tmp_path / "state" / "state.json"

    def publish(topic: str, payload: bytes) -> None:
        del payload
        if topic == TOPICS.round:  # committed before it is published
            assert json.loads(state.read_text())["round"] is not None
        published.append(topic)

    coordinator = Coordinator(
        config,
        Exporter(config, Signer("aggregator")),
        StateStore(config.state_dir),
        publish=publish,
        clock=time.time,
        trusted_keys=None,
    )
    return coordinator, published


def test_the_parts_share_one_federation_that_commits_before_it_publishes(
    coordinator: tuple[Coordinator, list[str]],
) -> None:
    coord, published = coordinator
    fed = coord.federation
    parts = (coord.intake, coord.rounds, coord.secure, coord.releases)
    assert all(part.federation is fed for part in parts)
    coord.connected()
    for device in ("a", "b"):
        coord.on_message(TOPICS.status(device), to_json(DeviceStatus(state="online")))
    assert sorted(fed.online) == ["a", "b"]
    fed.count("bad_topic")  # no round open: counted since start only
    coord.on_message(TOPICS.control, b'{"cmd": "start_round"}')
    assert TOPICS.round in published  # the publish hook found the round on disk first
    assert fed.round is not None
    assert fed.last_round == 1
    fed.count("bad_topic")
    assert fed.rejected["bad_topic"] == 2
    assert fed.round.rejected == {"bad_topic": 1}


def test_the_backbone_is_not_sent_again_to_a_broker_that_kept_the_session(
    coordinator: tuple[Coordinator, list[str]],
) -> None:
    """A reconnection that resumed the session finds the retained backbone where it was
    (issue 23: republished after a node kill, the tier pushed 28 MB to every house)."""
    coord, published = coordinator
    chunks = f"{TOPICS.tflite_model}/"

    def sent_after(session_kept: bool) -> list[str]:
        del published[:]
        coord.connected(session_kept=session_kept)
        return list(published)

    first = sent_after(session_kept=True)  # a new process: its first connection sends all
    assert TOPICS.tflite_model in first
    assert any(topic.startswith(chunks) for topic in first)
    resumed = sent_after(session_kept=True)
    assert TOPICS.global_model in resumed  # the small state is still republished
    assert TOPICS.tflite_model not in resumed
    assert not [topic for topic in resumed if topic.startswith(chunks)]
    lost = sent_after(session_kept=False)  # a broker that lost the session lost the rest too
    assert sorted(lost) == sorted(first)


def test_a_refusal_is_counted_and_logged_never_published(
    coordinator: tuple[Coordinator, list[str]],
) -> None:
    coord, published = coordinator
    before = len(published)
    for _ in range(50):
        coord.federation.reject(RejectedMessage("bad_json", "junk"), "a test")
        coord.on_message(TOPICS.update("x"), b"junk")
    assert coord.federation.rejected["bad_json"] == 50
    assert sum(coord.federation.rejected.values()) == 100
    assert len(published) == before
