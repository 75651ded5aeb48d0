"""Calibration rounds in process (aggregator/calibration.py): the real coordinator and the
doorbells' real secure client step, exchanging messages through one queue
(test_secure_coordinator's `InProcessFederation`), with constructed histogram vectors, so
each way a candidate can be refused is reached on purpose. The whole path with real
processes and real faces is test_federated_calibration.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aggregator.config import AggregatorConfig
from aggregator.export import Exporter
from fedbell.faces import histograms
from fedbell.faces.histograms import COUNT_CAP, MISNAMED
from fedbell.wire.messages import Signer
from fedbell.wire.protocol import RoundAnnouncement, RoundMetrics
from tests.test_aggregator import TOPICS, make_config
from tests.test_secure_coordinator import DEVICES, InProcessFederation


class CalibratingFederation(InProcessFederation):
    """Doorbells that answer a calibration round with the vector the test gives each."""

    vectors: dict[str, np.ndarray]

    def _announce(self, announcement: RoundAnnouncement) -> None:
        if announcement.calibrate is None or announcement.phase != "keys":
            super()._announce(announcement)
            return
        for device in announcement.selected:
            if ("keys", device) in self.silent:
                continue
            self.participants[device].begin(announcement)
            self.participants[device].prepare_calibration(announcement, self.vectors[device])

    def metrics_of(self, round_id: int) -> RoundMetrics:
        payloads = [RoundMetrics.model_validate_json(p) for p in self.payloads(TOPICS.metrics)]
        return [m for m in payloads if m.round == round_id][-1]


def vector(start_genuine: np.ndarray, genuine: np.ndarray, seed: int) -> np.ndarray:
    """A house of 60 strangers whose residents score `genuine` under the candidate."""
    strangers = np.random.default_rng(seed).normal(0.5, 0.12, 60).clip(-1, 1)
    parts = [histograms.histogram(s) for s in (strangers, genuine, strangers, start_genuine)]
    return np.concatenate([*parts, [len(strangers) / COUNT_CAP]])


def bare(tmp_path: Path, cache: Path, privacy: dict[str, float] | None = None) -> AggregatorConfig:
    # Without `privacy`, no noise: eight houses are far too few for house-level DP
    # (its default) to leave the 1 % tail of their strangers measurable.
    settings = make_config(
        tmp_path,
        1,
        cache,
        secure_aggregation=True,
        min_cohort=5,
        privacy=privacy or {"epsilon_budget": None},
    ).model_dump(mode="json")
    settings["evaluation"]["require_calibration"] = True
    return AggregatorConfig.model_validate(settings)


def federation(tmp_path: Path, cache: Path, **privacy: float) -> CalibratingFederation:
    config = bare(tmp_path, cache, privacy)
    fed = CalibratingFederation(config, Exporter(config, Signer("aggregator")), DEVICES)
    shapes = [w.shape for w in fed.exporter.initial_weights()]
    rng = np.random.default_rng(0)
    fed.deltas = {d: [rng.normal(0, 0.01, s).astype(np.float32) for s in shapes] for d in DEVICES}
    return fed


def train_and_calibrate(fed: CalibratingFederation) -> RoundMetrics:
    fed.command(cmd="start_round")
    assert fed.metrics_of(1).outcome == "aggregated"
    fed.after(0)  # the coordinator's tick starts the calibration round at once
    return fed.metrics_of(2)


GOOD = np.full(10, 0.9)


def test_a_candidate_that_names_fewer_residents_than_the_start_head_is_refused(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    fed = federation(tmp_path, aggregator_cache)
    worse = np.array([0.9] * 5 + [MISNAMED] * 5)  # half its residents named wrong
    fed.vectors = {d: vector(GOOD, worse, seed) for seed, d in enumerate(DEVICES)}
    metrics = train_and_calibrate(fed)
    assert metrics.outcome == "abandoned", metrics.detail
    assert metrics.rejected == {"accuracy_loss": 1}
    assert "names 50.0 % of residents (start head: 100.0 %" in metrics.detail
    assert fed.coordinator.federation.model.version == 0


def test_a_hostile_vector_in_the_sum_is_refused_and_an_honest_one_publishes(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    """A doorbell masking its strangers twenty times over (to drag the threshold) is caught
    by the sum's mass; the next candidate, from honest doorbells, is published with the
    threshold of their sum."""
    fed = federation(tmp_path, aggregator_cache)
    fed.vectors = {d: vector(GOOD, GOOD, seed) for seed, d in enumerate(DEVICES)}
    honest = dict(fed.vectors)
    fed.vectors["d0"] = fed.vectors["d0"] * 20
    metrics = train_and_calibrate(fed)
    assert metrics.outcome == "abandoned", metrics.detail
    assert metrics.rejected == {"calibration_sum_out_of_bounds": 1}
    fed.vectors = honest
    fed.command(cmd="start_round")
    fed.after(0)
    published = fed.metrics_of(4)
    assert published.outcome == "published", published.detail
    expected = histograms.calibrate(np.sum(list(honest.values()), axis=0), 0.01)
    # each doorbell's values are rounded to the fixed-point grid: equal to a bin edge
    assert published.threshold == pytest.approx(expected.threshold, abs=1e-9)
    assert fed.coordinator.federation.model.version == 1


def test_with_privacy_noise_the_calibration_round_is_noised_and_counted(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    """The calibration round's plan carries the same noise multiplier (clip norm: the
    largest a house's vector can be), the ledger counts it as a round, and eight houses'
    sum under z = 1 cannot resolve a 1 % tail: refused, saying so."""
    fed = federation(tmp_path, aggregator_cache, noise_multiplier=1.0)
    fed.vectors = {d: vector(GOOD, GOOD, seed) for seed, d in enumerate(DEVICES)}
    metrics = train_and_calibrate(fed)
    calibration = [RoundAnnouncement.model_validate_json(p) for p in fed.payloads(TOPICS.round)][-1]
    assert calibration.round == 2
    assert calibration.secagg is not None
    assert calibration.secagg.clip_norm == pytest.approx(histograms.VECTOR_NORM)
    assert calibration.secagg.noise_std > 0
    assert fed.coordinator.federation.privacy.rounds == 2
    assert metrics.epsilon is not None
    assert metrics.outcome == "abandoned", metrics.detail
    assert metrics.rejected == {"calibration_too_noisy": 1}


def test_a_calibration_round_short_of_doorbells_is_not_repeated(
    tmp_path: Path, aggregator_cache: Path
) -> None:
    """Four of eight doorbells do not answer the calibration round's keys phase (min_cohort
    5): the round is abandoned, the candidate with it, and the next round trains again
    instead of calibrating the same candidate forever."""
    fed = federation(tmp_path, aggregator_cache)
    fed.vectors = {d: vector(GOOD, GOOD, seed) for seed, d in enumerate(DEVICES)}
    fed.command(cmd="start_round")
    fed.silent |= {("keys", d) for d in DEVICES[:4]}
    fed.after(0)  # the calibration round starts
    fed.after(31)  # its keys phase's deadline: four answered
    assert fed.metrics_of(2).rejected == {"secagg_below_min_cohort": 1}
    fed.after(31)
    rounds = [RoundAnnouncement.model_validate_json(p) for p in fed.payloads(TOPICS.round)]
    assert [(a.round, a.phase) for a in rounds if a.round > 2] == []
    fed.silent.clear()
    fed.command(cmd="start_round")
    third = RoundAnnouncement.model_validate_json(fed.payloads(TOPICS.round)[-1])
    assert third.round == 3
    assert third.calibrate is None
    assert fed.coordinator.federation.model.version == 0
