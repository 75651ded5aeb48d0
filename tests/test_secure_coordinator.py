"""A secure round through the aggregator's coordinator and the doorbells' participants.

The same code the services run (`aggregator.coordinator.Coordinator`,
`edge.secure.SecureParticipant`, `edge.secure.secure_update`), wired to each
other in process by a message queue instead of a broker, so every phase,
refusal and abandonment is checked in well under a second. The real-process
tests (tests/test_secure_rounds.py) check the same over Mosquitto.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import deque
from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.coordinator import Coordinator
from aggregator.export import Exporter
from aggregator.state import StateStore
from edge.secure import SecureParticipant, secure_update
from fedbell.errors import RejectedMessage
from fedbell.wire import dp, masking
from fedbell.wire.codecs import Weights
from fedbell.wire.messages import Signer, parse_global
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, RoundMetrics, to_json
from fedbell.wire.topics import SECAGG_LEAVES
from tests.test_aggregator import MAX_BYTES, SITE, TOPICS, make_config


class InProcessFederation:
    """A coordinator and secure doorbells exchanging messages through one queue."""

    def __init__(self, config: AggregatorConfig, exporter: Exporter, devices: list[str]) -> None:
        self.queue: deque[tuple[str, bytes]] = deque()
        self.seen: list[tuple[str, bytes]] = []
        self.skew = 0.0
        """Seconds the coordinator's clock is ahead of the real one (`after`)."""
        self.config, self.exporter = config, exporter
        self.coordinator = self._coordinator()
        self.participants = {
            device: SecureParticipant(
                device, TOPICS, None, publish=self._publish, on_sent=self._sent
            )
            for device in devices
        }
        self.refused: dict[str, list[str]] = {device: [] for device in devices}
        """What each doorbell refused (reasons), as EdgeNode counts them."""
        self.deltas: dict[str, Weights] = {}
        self.plain: dict[tuple[int, str], np.ndarray] = {}
        """What each doorbell would send unmasked: its clipped subset (no noise here)."""
        self.unclipped: set[str] = set()
        """Compromised doorbells: they mask their delta without clipping it."""
        self.tamper: dict[tuple[str, str], bytes] = {}
        """(leaf, device) -> the payload that doorbell sends instead of its own."""
        self.silent: set[tuple[str, str]] = set()
        """(phase, device): that doorbell says nothing in that phase (it dropped)."""
        self.coordinator.connected()
        for device in devices:
            status = DeviceStatus(state="online", model_version=0)
            self.coordinator.on_message(TOPICS.status(device), to_json(status))
        self.run()

    def _coordinator(self) -> Coordinator:
        return Coordinator(
            self.config,
            self.exporter,
            StateStore(self.config.state_dir),
            publish=self._publish,
            clock=lambda: time.time() + self.skew,
            trusted_keys=None,
        )

    def restart(self) -> None:
        """A new aggregator process on the same state folder (the old one just stops)."""
        self.queue.clear()
        self.coordinator = self._coordinator()
        self.coordinator.connected()
        for device in self.participants:
            status = DeviceStatus(
                state="online", model_version=self.coordinator.federation.model.version
            )
            self.coordinator.on_message(TOPICS.status(device), to_json(status))
        self.run()

    def _publish(self, topic: str, payload: bytes) -> None:
        self.queue.append((topic, payload))

    def _sent(self, number: int, residual: Weights | None) -> None:
        del number, residual  # the node keeps these; nothing to check here

    def run(self) -> None:
        while self.queue:
            topic, payload = self.queue.popleft()
            self.seen.append((topic, payload))
            if topic == TOPICS.round:
                self._announce(RoundAnnouncement.model_validate_json(payload))
            elif topic.startswith(f"{TOPICS.base}/secagg/inbox/"):
                self.participants[topic.rsplit("/", 1)[1]].on_inbox(payload)
            elif topic.startswith(f"{TOPICS.base}/secagg/"):
                leaf, device, _house = TOPICS.secagg_origin(topic)
                self.coordinator.on_message(topic, self.tamper.get((leaf, device), payload))

    def _announce(self, announcement: RoundAnnouncement) -> None:
        for device, participant in self.participants.items():
            if device not in announcement.selected or (announcement.phase, device) in self.silent:
                continue
            if announcement.phase == "keys":
                participant.begin(announcement)
                delta = self.deltas[device]
                assert announcement.secagg is not None
                if device in self.unclipped:  # a patched doorbell that ignores the plan's clip
                    plan = announcement.secagg.model_copy(update={"clip_norm": 1e9})
                    participant.prepare(announcement.model_copy(update={"secagg": plan}), delta)
                else:
                    participant.prepare(announcement, delta)
                flat = np.concatenate([d.ravel() for d in delta])
                subset = masking.shared_subset(
                    announcement.secagg.dimension,
                    announcement.secagg.density,
                    announcement.round,
                    announcement.lineage,
                )
                clipped, _ = dp.clip(flat[subset], announcement.secagg.clip_norm)
                self.plain[announcement.round, device] = clipped
            elif announcement.phase in ("closed", "abandoned"):
                participant.end(announcement.round)
            else:
                try:
                    participant.step(announcement)
                except RejectedMessage as err:  # counted (edge/rounds.py, _secure_step)
                    self.refused[device].append(err.reason)

    def after(self, seconds: float) -> None:
        """Let `seconds` pass for the coordinator (deadlines), then let it act."""
        self.skew += seconds
        self.coordinator.tick()
        self.run()

    def command(self, **command: object) -> None:
        self.coordinator.on_message(TOPICS.control, json.dumps(command).encode())
        self.run()

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p in self.seen if t == topic]

    def metrics(self) -> RoundMetrics:
        return RoundMetrics.model_validate_json(self.payloads(TOPICS.metrics)[-1])

    def head(self) -> Weights:
        payload = self.payloads(TOPICS.global_model)[-1]
        return parse_global(payload, site=SITE, max_bytes=MAX_BYTES, keys=None).weights


DEVICES = [f"d{i}" for i in range(8)]


def federation(
    tmp_path: Path, cache: Path, privacy: dict[str, float] | None = None
) -> InProcessFederation:
    config = make_config(
        tmp_path,
        1,
        cache,
        secure_aggregation=True,
        min_cohort=5,
        max_accuracy_drop=None,
        privacy=privacy or {"epsilon_budget": None},  # 8 houses: too few for noise
    )
    exporter = Exporter(config, Signer("aggregator"))
    fed = InProcessFederation(config, exporter, DEVICES)
    shapes = [w.shape for w in exporter.initial_weights()]
    rng = np.random.default_rng(0)
    fed.deltas = {d: [rng.normal(0, 0.01, s).astype(np.float32) for s in shapes] for d in DEVICES}
    return fed


def published_mean(fed: InProcessFederation, before: Weights, round_id: int) -> np.ndarray:
    announcement = RoundAnnouncement.model_validate_json(fed.payloads(TOPICS.round)[-1])
    plan = announcement.secagg
    assert plan is not None
    subset = masking.shared_subset(plan.dimension, plan.density, round_id, announcement.lineage)
    moved: np.ndarray = np.concatenate(
        [(a - b).ravel() for a, b in zip(fed.head(), before, strict=True)]
    )
    untouched = np.delete(moved, subset)
    assert np.all(untouched == 0), "only the round's subset may move"
    # the server step scales the subset's mean by dimension / size (unbiased random-k)
    return np.asarray(moved[subset] * (plan.size / plan.dimension), dtype=np.float64)


def test_a_secure_round_publishes_the_exact_mean_and_recovers_dropped_doorbells(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    fed = federation(tmp_path, aggregator_cache)
    before = fed.head()
    # two doorbells share their seeds, then drop before masking: their masks are rebuilt
    fed.silent |= {("send", "d6"), ("send", "d7"), ("unmask", "d6"), ("unmask", "d7")}
    fed.command(cmd="start_round")
    fed.after(31)  # the send phase's deadline: d6 and d7 are dropped
    metrics = fed.metrics()
    assert (metrics.outcome, metrics.participants, metrics.secure) == ("published", 6, True)
    assert sorted(metrics.dropped) == ["d6", "d7"]
    expected = np.mean([fed.plain[1, d] for d in DEVICES[:6]], axis=0)
    got = published_mean(fed, before, 1)
    scale = json.loads(fed.payloads(TOPICS.round)[0])["secagg"]["scale"]
    # stochastic rounding: each doorbell's value is within 1/scale of its float
    assert np.max(np.abs(got - expected)) <= 1.0 / scale + 1e-6
    with_dropped = np.mean([fed.plain[1, d] for d in DEVICES], axis=0)
    assert np.max(np.abs(got - with_dropped)) > 100 / scale  # the check can tell them apart
    phases = [json.loads(p)["phase"] for p in fed.payloads(TOPICS.round)]
    assert phases == ["keys", "shares", "send", "unmask", "closed"]
    # what crossed the "broker": no plain update topic, every doorbell on its secagg topics
    assert not [t for t, _ in fed.seen if t.startswith(f"{TOPICS.base}/update/")]
    for leaf in SECAGG_LEAVES:
        assert any(t == TOPICS.secagg(leaf, "d0") for t, _ in fed.seen)


def test_survivors_below_min_cohort_abandon_the_round_and_keep_the_model(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    fed = federation(tmp_path, aggregator_cache)
    before = fed.head()
    fed.silent |= {("send", d) for d in DEVICES[:4]}  # 4 of 8 mask, min_cohort is 5
    fed.command(cmd="start_round")
    fed.after(31)  # the send phase's deadline
    metrics = fed.metrics()
    assert metrics.outcome == "abandoned"
    assert metrics.rejected == {"secagg_below_min_cohort": 1}
    assert "4 of 8" in metrics.detail
    assert "min_cohort is 5" in metrics.detail
    assert json.loads(fed.payloads(TOPICS.round)[-1])["phase"] == "abandoned"
    assert fed.coordinator.federation.model.version == 0
    for now, then in zip(fed.head(), before, strict=True):
        np.testing.assert_array_equal(now, then)


@pytest.mark.parametrize(
    ("leaf", "reason"),
    [("keys", "secagg_replay"), ("shares", "secagg_bad_message"), ("masked", "secagg_wrong_size")],
)
def test_bad_secagg_messages_are_refused_counted_and_the_round_goes_on(
    tmp_path: Path, aggregator_cache: Path, leaf: str, reason: str
) -> None:
    fed = federation(tmp_path, aggregator_cache)
    # d0's message is replaced: an advert of another round (replayed), a share that is
    # not JSON, a masked input of the wrong size; the round goes on without d0
    if leaf == "keys":
        fed.command(cmd="start_round")  # round 1, whose advert d0 replays into round 2
        fed.tamper["keys", "d0"] = fed.payloads(TOPICS.secagg("keys", "d0"))[0]
    elif leaf == "shares":
        fed.tamper["shares", "d0"] = b"\x00not json"
    else:
        values = base64.b64encode(np.zeros(3, "<u4").tobytes()).decode()
        fed.tamper["masked", "d0"] = json.dumps(
            {
                "round": 1,
                "lineage": fed.coordinator.federation.model.lineage,
                "device": "d0",
                "values": values,
            }
        ).encode()
    round_id = fed.coordinator.federation.last_round + 1
    fed.command(cmd="start_round")
    assert fed.coordinator.federation.rejected[reason] == 1, fed.coordinator.federation.rejected
    replies = [json.loads(p) for p in fed.payloads(TOPICS.reply)]
    # counted, not answered: a refusal never costs a retained reply (issue 22)
    assert not [r for r in replies if r["about"] == "secagg" and not r["ok"]], replies
    # the others carry on: the phase ends at its deadline without d0, the round publishes
    for _ in range(4):
        fed.after(31)
    metrics = fed.metrics()
    assert (metrics.round, metrics.outcome) == (round_id, "published"), metrics
    assert metrics.participants == len(DEVICES) - 1
    assert "d0" in metrics.dropped
    if leaf == "keys":  # left out of the roster, d0 knows it was not in this round
        assert fed.refused["d0"] == ["secagg_bad_roster"]


def test_the_client_step_clips_keeps_the_remainder_and_encodes_the_subset() -> None:
    from fedbell.wire.protocol import SecAggPlan

    rng = np.random.default_rng(1)
    delta = [rng.normal(0, 1, (40, 5)).astype(np.float32), rng.normal(0, 1, 5).astype(np.float32)]
    plan = SecAggPlan(
        min_cohort=3,
        neighbours=2,
        threshold=2,
        scale=1e5,
        dimension=205,
        size=41,
        density=0.2,
        clip_norm=1.0,
        noise_std=0.0,
    )
    update = secure_update(delta, plan, 7, "abc", np.random.default_rng(2))
    subset = masking.shared_subset(205, 0.2, 7, "abc")
    flat = np.concatenate([d.ravel() for d in delta])
    sent = masking.decode_sum(update.values, plan.scale)
    assert np.linalg.norm(sent) <= 1.0 + 41 / plan.scale  # clipped on the doorbell
    np.testing.assert_allclose(sent, flat[subset] / np.linalg.norm(flat[subset]), atol=2e-5)
    # nothing stays on the doorbell: the server's rescaling makes the subset unbiased
    assert [r.shape for r in update.residual] == [d.shape for d in delta]
    assert all(np.all(r == 0) for r in update.residual)
    with pytest.raises(ValueError, match="coordinates"):
        secure_update(delta[:1], plan, 7, "abc", np.random.default_rng(2))


def test_an_unclipped_update_is_caught_in_the_sum_and_nothing_is_published(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    """A compromised doorbell masks a delta it did not clip: the aggregator cannot see it,
    but the mean of clipped updates has a norm of at most secure_clip_norm, so the sum shows it."""
    fed = federation(tmp_path, aggregator_cache)
    before = fed.head()
    clip = fed.coordinator.federation.config.rounds.secure_clip_norm
    # subset norm ~60 clip norms, each entry still within the fixed-point range
    # (+/-8 clip norms for a cohort of 8: fedbell.wire.secagg_params.default_scale)
    fed.deltas["d3"] = [d * 150 * clip for d in fed.deltas["d3"]]
    fed.unclipped.add("d3")
    fed.command(cmd="start_round")
    metrics = fed.metrics()
    assert metrics.outcome == "abandoned"
    assert metrics.rejected == {"secagg_sum_out_of_bounds": 1}
    assert "did not clip" in metrics.detail
    assert fed.coordinator.federation.model.version == 0
    for now, then in zip(fed.head(), before, strict=True):
        np.testing.assert_array_equal(now, then)
    # the same doorbell, clipped as the plan says, takes part in the next round
    fed.unclipped.clear()
    fed.command(cmd="start_round")
    assert (fed.metrics().outcome, fed.metrics().participants) == ("published", 8)


def test_epsilon_is_in_every_rounds_metrics_and_the_budget_stops_rounds(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    """House-level DP: noise multiplier 1, 8 of 8 houses a round, delta 1/8: epsilon 1.51
    after one round, 2.68 after two, 3.69 after three (dp-accounting); a budget of 3
    allows two rounds and refuses the third, saying why."""
    fed = federation(
        tmp_path, aggregator_cache, {"noise_multiplier": 1.0, "houses": 8, "epsilon_budget": 3.0}
    )
    announced = []
    for round_id in (1, 2):
        fed.command(cmd="start_round")
        announced.append(RoundAnnouncement.model_validate_json(fed.payloads(TOPICS.round)[0]))
        metrics = fed.metrics()
        assert (metrics.round, metrics.outcome) == (round_id, "published"), metrics
        assert metrics.epsilon == pytest.approx(1.5146, abs=1e-3)
        assert metrics.epsilon_total == pytest.approx((1.5146, 2.6770)[round_id - 1], abs=1e-3)
    plan = announced[0].secagg
    assert plan is not None
    clip = fed.coordinator.federation.config.rounds.secure_clip_norm
    assert plan.noise_std == pytest.approx(1.0 * clip / 5**0.5)  # z C / sqrt(min_cohort)
    fed.command(cmd="start_round")
    reply = json.loads(fed.payloads(TOPICS.reply)[-1])
    assert (reply["ok"], reply["reason"]) == (False, "privacy_budget_spent")
    assert "2.68 to 3.69" in reply["detail"]
    assert fed.coordinator.federation.rejected["privacy_budget_spent"] == 1
    assert fed.coordinator.federation.last_round == 2  # no third round was announced
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["noised_rounds"] == 2  # survives a restart: the ledger is in the state


def test_a_restart_abandons_an_open_secure_round_and_resumes_an_aggregated_one(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    """The key agreement lives in the aggregator's memory: a secure round open at a restart
    cannot be unmasked and is abandoned, saying so. A step-by-step round already unmasked
    (status aggregated) keeps its mean in the state folder and publishes after a restart."""
    fed = federation(tmp_path, aggregator_cache)
    fed.silent |= {("send", d) for d in DEVICES}  # the round waits in its send phase
    fed.command(cmd="start_round")
    fed.restart()
    fed.coordinator.tick()
    fed.run()
    metrics = fed.metrics()
    assert (metrics.round, metrics.outcome) == (1, "abandoned")
    assert "memory only" in metrics.detail
    assert fed.coordinator.federation.model.version == 0

    fed.silent.clear()
    before = fed.head()
    fed.command(cmd="train")  # step by step: the phases run, then it waits for `publish`
    assert fed.metrics().outcome == "aggregated"
    fed.command(cmd="aggregate")
    assert json.loads(fed.payloads(TOPICS.reply)[-1])["reason"] == "bad_state"
    fed.restart()
    fed.command(cmd="publish")
    metrics = fed.metrics()
    assert (metrics.round, metrics.outcome, metrics.participants) == (2, "published", 8)
    expected = np.mean([fed.plain[2, d] for d in DEVICES], axis=0)
    got = published_mean(fed, before, 2)
    assert np.max(np.abs(got - expected)) < 1e-6


def test_junk_secagg_messages_cost_a_count_each_and_no_reply(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    """Issue 22: N junk messages on each secagg leaf (a doorbell's login flooding the
    aggregator) give N counted refusals per leaf and not one published message; the
    round is not disturbed and publishes at its deadline without the silent doorbell."""
    fed = federation(tmp_path, aggregator_cache)
    fed.silent.add(("keys", "d7"))  # the keys phase waits for d7 until its deadline
    fed.command(cmd="start_round")
    coordinator, published = fed.coordinator, len(fed.seen)
    state = coordinator.federation
    before = sum(state.rejected.values())
    junk = 25
    for leaf in SECAGG_LEAVES:
        for index in range(junk):
            coordinator.on_message(TOPICS.secagg(leaf, "d7"), b"\x00junk %d" % index)
    fed.run()
    leaves = len(SECAGG_LEAVES)
    assert sum(state.rejected.values()) - before == junk * leaves, state.rejected
    assert state.round is not None
    assert sum(state.round.rejected.values()) == junk * leaves  # in the round's metrics
    assert fed.seen[published:] == []  # no reply, no retained message per refusal
    fed.after(31)  # the keys phase ends without d7; the round goes on and publishes
    metrics = fed.metrics()
    assert (metrics.outcome, metrics.participants) == ("published", len(DEVICES) - 1), metrics
    assert sum(metrics.rejected.values()) == junk * leaves


@pytest.mark.parametrize(
    ("privacy", "level", "says"),
    [
        (
            {"houses": 2000},
            logging.INFO,
            "house-level DP: epsilon 8 after 60 rounds of 2000 of 2000 houses (delta 1/2000, "
            "budget 8): noise multiplier ",
        ),
        (
            {"houses": 8},
            logging.WARNING,
            "x the clip: too few houses a round for this noise to leave any signal, the "
            "federation will not learn; a site this small sets rounds.privacy.epsilon_budget: "
            "null (no DP)",
        ),
        ({"max_dropout": 0.3}, logging.INFO, "the houses are not known until doorbells come"),
        (None, logging.INFO, "house-level DP is off (rounds.privacy.epsilon_budget: null)"),
    ],
)
def test_the_aggregator_states_its_privacy_at_start_up(
    tmp_path: Path,
    aggregator_cache: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    privacy: dict[str, float] | None,
    level: int,
    says: str,
) -> None:
    """One line before any round: epsilon, delta, z and the noise against the clip, a
    warning saying what to set when the federation is too small for that noise, or that the
    houses are only known once doorbells are online (no provisioned keys)."""
    caplog.set_level(logging.INFO, logger="aggregator")
    federation(tmp_path, aggregator_cache, privacy)
    lines = [r for r in caplog.records if "house-level DP" in r.getMessage()]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == level
    assert says in lines[0].getMessage()
