"""Rounds without a broker: selection, round checks, and the coordinator on a fake clock.

The coordinator gets a list as its publisher and a clock the test moves, so
deadlines, automatic rounds and restarts are tested without sleeping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.accumulator import make_accumulator
from aggregator.config import AggregatorConfig, RoundSettings
from aggregator.coordinator import Coordinator
from aggregator.export import Exporter
from aggregator.rounds import Round, announce, select_devices
from aggregator.state import ModelRecord, StateRecord, StateStore
from fedbell.errors import RejectedMessage
from fedbell.wire.messages import AGGREGATOR, Signer, Update, build_update, parse_global
from fedbell.wire.protocol import DeviceStatus, RoundMetrics, to_json
from fedbell.wire.topics import Topics

SITE = "unit"
TOPICS = Topics(SITE)


def test_selection_is_online_requested_and_seeded() -> None:
    online = ["d1", "d2", "d3", "d4", "d5"]
    assert select_devices(online, None, None, 0, 1) == tuple(online)
    assert select_devices(online, ["d2", "d9"], None, 0, 1) == ("d2",)
    first = select_devices(online, None, 2, seed=7, round_id=3)
    assert len(first) == 2
    assert set(first) <= set(online)
    assert select_devices(reversed(online), None, 2, seed=7, round_id=3) == first
    picks = {select_devices(online, None, 2, seed=7, round_id=r) for r in range(1, 20)}
    assert len(picks) > 1  # rounds rotate through the devices


def _round(manual: bool = False) -> Round:
    settings = RoundSettings(codec="float32", timeout_s=10, min_updates=1)
    announcement = announce(
        round_id=4,
        base_version=2,
        lineage="0123456789abcdef",
        selected=("a", "b"),
        now=100.0,
        settings=settings,
        manual=manual,
    )
    return Round(
        announcement=announcement,
        manual=manual,
        started_at=100.0,
        accumulator=make_accumulator(settings, [(2,)], sparse=False),
    )


def _update(device: str = "a", **changes: Any) -> Update:
    fields: dict[str, Any] = {
        "device": device,
        "round": 4,
        "base_version": 2,
        "num_examples": 3,
        "codec": "float32",
        "delta": [np.ones(2, dtype=np.float32)],
    }
    return Update(**{**fields, **changes})


@pytest.mark.parametrize(
    ("update", "now", "reason"),
    [
        (_update(round=5), 101.0, "wrong_round"),
        (_update(base_version=1), 101.0, "wrong_base"),
        (_update(device="z"), 101.0, "not_selected"),
        (_update(codec="int8"), 101.0, "wrong_codec"),
        (_update(), 111.0, "late"),
        (_update(delta=[np.full(2, 1e4, dtype=np.float32)]), 101.0, "norm_too_large"),
    ],
)
def test_round_checks(update: Update, now: float, reason: str) -> None:
    current = _round()
    with pytest.raises(RejectedMessage) as caught:
        current.check(update, now, max_norm=1000.0)
    assert caught.value.reason == reason
    assert current.received == []


def test_duplicates_and_closing_rules() -> None:
    current = _round()
    current.check(_update(), 101.0, 1000.0)
    current.accept(_update(), 500)
    with pytest.raises(RejectedMessage, match="duplicate"):
        current.check(_update(), 101.0, 1000.0)
    assert current.next_step(105.0, quorum=1) == "wait"
    assert current.next_step(111.0, quorum=1) == "aggregate"
    assert current.next_step(111.0, quorum=2) == "abandon"
    current.accept(_update("b"), 500)
    assert current.next_step(105.0, quorum=2) == "aggregate"  # everyone answered
    assert current.bytes_up == 1000

    manual = _round(manual=True)
    manual.accept(_update(), 500)
    assert manual.next_step(111.0, quorum=1) == "wait"  # the operator aggregates
    assert manual.next_step(111.0, quorum=2) == "abandon"  # can no longer reach quorum


def harness_config(tmp_path: Path, cache_dir: Path, **rounds: Any) -> AggregatorConfig:
    return AggregatorConfig.model_validate(
        {
            "site": SITE,
            "state_dir": str(tmp_path / "state"),
            "cache_dir": str(cache_dir),
            "rounds": {"codec": "float32", "timeout_s": 60, "auto_pause_s": 0, **rounds},
            "threads": 1,
        }
    )


@pytest.fixture(scope="module")
def exporter(aggregator_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Exporter:
    """One exporter for the module: loading dlib's network and the backbone is the slow part."""
    config = harness_config(tmp_path_factory.mktemp("unused"), aggregator_cache)
    return Exporter(config, Signer(AGGREGATOR))


class Harness:
    """A coordinator on a fake clock, publishing into a list.

    A subclass with other settings (its site, an evaluation set) overrides `configure`."""

    def __init__(self, tmp_path: Path, exporter: Exporter, **rounds: Any) -> None:
        self.now = 1000.0
        assert exporter.config.cache_dir is not None
        self.rounds = rounds
        self.config = self.configure(tmp_path, exporter.config.cache_dir, **rounds)
        self.topics = Topics(self.config.site)
        self.exporter = exporter
        self.published: list[tuple[str, bytes]] = []
        self.coordinator = Coordinator(
            self.config,
            self.exporter,
            StateStore(self.config.state_dir),
            publish=lambda topic, payload: self.published.append((topic, payload)),
            clock=lambda: self.now,
            trusted_keys=None,
        )
        self.coordinator.connected()

    @staticmethod
    def configure(tmp_path: Path, cache_dir: Path, **rounds: Any) -> AggregatorConfig:
        return harness_config(tmp_path, cache_dir, **rounds)

    def restart(self, tmp_path: Path, **changed: Any) -> Harness:
        """The same coordinator started again on the same state folder (with `changed`
        rounds settings, as after an edited config)."""
        return type(self)(tmp_path, self.exporter, **{**self.rounds, **changed})

    def send(self, topic: str, payload: bytes) -> None:
        self.coordinator.on_message(topic, payload)
        self.coordinator.tick()
        # The service persists accepted updates in batches, before it acks them; with
        # no broker here to redeliver, every message is as if its batch was persisted.
        self.coordinator.persist()

    def command(self, **command: Any) -> None:
        self.send(self.topics.control, json.dumps(command).encode())

    def online(self, *devices: str) -> None:
        for device in devices:
            self.send(self.topics.status(device), to_json(DeviceStatus(state="online")))

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p in self.published if t == topic]

    def versions(self) -> list[int]:
        return [
            parse_global(p, site=self.config.site, max_bytes=1 << 24, keys=None).version
            for p in self.payloads(self.topics.global_model)
        ]

    def metrics(self) -> list[RoundMetrics]:
        return [RoundMetrics.model_validate_json(p) for p in self.payloads(self.topics.metrics)]

    def update(self, device: str, round_id: int, examples: int = 2, scale: float = 0.01) -> None:
        model = self.coordinator.federation.model
        delta = [np.full(w.shape, scale, dtype=np.float32) for w in model.weights]
        self.send(
            self.topics.update(device),
            build_update(
                site=self.config.site,
                signer=Signer(device),
                round_id=round_id,
                base_version=model.version,
                num_examples=examples,
                names=self.exporter.names,
                delta=delta,
                codec="float32",
            ),
        )


def test_auto_runs_n_rounds_back_to_back_and_stop_ends_it(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = Harness(tmp_path, exporter)
    harness.online("a", "b")
    harness.command(cmd="auto", rounds=2)
    assert harness.coordinator.federation.round is not None
    for round_id in (1, 2):
        harness.update("a", round_id)
        harness.update("b", round_id)
    assert harness.versions() == [0, 1, 2]
    assert harness.coordinator.federation.round is not None
    assert harness.coordinator.federation.round.status == "closed"  # no third round
    harness.now += 10
    harness.coordinator.tick()
    assert harness.coordinator.federation.last_round == 2

    harness.command(cmd="auto", rounds=5)
    assert harness.coordinator.federation.last_round == 3
    harness.command(cmd="stop")
    harness.update("a", 3)
    harness.update("b", 3)
    harness.coordinator.tick()
    # the open round finished, no more started
    assert harness.coordinator.federation.last_round == 3
    assert harness.versions()[-1] == 3


def test_auto_waits_for_devices_and_quorum_abandons_on_the_clock(
    tmp_path: Path, exporter: Exporter
) -> None:
    harness = Harness(tmp_path, exporter, min_updates=2)
    harness.command(cmd="auto", rounds=1)
    assert harness.coordinator.federation.round is None  # nobody online yet
    harness.online("a", "b")
    harness.now += 1.5
    harness.coordinator.tick()
    assert harness.coordinator.federation.last_round == 1
    harness.update("a", 1)
    harness.now += 61
    harness.coordinator.tick()
    assert [m.outcome for m in harness.metrics()] == ["abandoned"]
    assert harness.versions() == [0]
    assert harness.coordinator.auto_remaining == 0


def test_pending_aggregate_survives_a_restart(tmp_path: Path, exporter: Exporter) -> None:
    harness = Harness(tmp_path, exporter, clip_norm=None)  # the 0.5 step must arrive whole
    harness.online("a")
    harness.command(cmd="train")
    harness.command(cmd="send")
    harness.update("a", 1, scale=0.5)
    harness.command(cmd="aggregate")
    assert [m.outcome for m in harness.metrics()] == ["aggregated"]
    assert harness.versions() == [0]

    restarted = harness.restart(tmp_path)
    assert restarted.coordinator.federation.pending is not None
    restarted.command(cmd="publish")
    assert restarted.versions() == [0, 1]  # the republished v0, then the new one
    new = parse_global(
        restarted.payloads(TOPICS.global_model)[-1], site=SITE, max_bytes=1 << 24, keys=None
    )
    base = harness.coordinator.federation.model.weights
    kept = restarted.coordinator.federation.model.weights
    for got, old, exact in zip(new.weights, base, kept, strict=True):
        # The aggregator keeps the exact head as the next base...
        np.testing.assert_allclose(exact, old + 0.5, rtol=1e-6, atol=1e-6)
        # ...and doorbells receive it in int8 (the default downlink): per column, within
        # half a step of the exact head (re-quantised afresh each version, never drifting).
        step = np.abs(exact).max(axis=0) / 127
        assert np.all(np.abs(got - exact) <= step / 2 + 1e-6)
        assert not np.array_equal(got, exact)
    assert [m.outcome for m in restarted.metrics()] == ["aggregated", "published"]


def test_a_round_saved_before_rounds_weighting_existed_resumes_weighing_by_examples(
    tmp_path: Path, exporter: Exporter
) -> None:
    """Such a round's running sum was built weighing by examples: the rest of it must be too
    (the config, weighing every house the same, applies from the next round on)."""
    harness = Harness(tmp_path, exporter, weighting="examples")  # as the code before it did
    harness.online("a", "b")
    harness.command(cmd="start_round")
    harness.update("a", 1, examples=3, scale=0.004)  # norm 0.72: under the clip norm
    state = tmp_path / "state" / "state.json"
    record = json.loads(state.read_text())
    assert record["round"].pop("weighting") == "examples"  # as that code wrote the record
    state.write_text(json.dumps(record))

    restarted = harness.restart(tmp_path, weighting="houses")  # the config now says houses
    assert restarted.coordinator.federation.round is not None
    assert restarted.coordinator.federation.round.weighting == "examples"
    restarted.update("b", 1, examples=1, scale=0.0)
    assert restarted.versions() == [0, 1]
    step = (
        restarted.coordinator.federation.model.weights[0]
        - harness.coordinator.federation.model.weights[0]
    )
    np.testing.assert_allclose(step, 3 * 0.004 / 4, atol=1e-6)  # houses: 0.002
    restarted.online("a", "b")  # no broker here to hand it the retained statuses
    restarted.command(cmd="start_round")
    second = restarted.coordinator.federation.round
    assert second is not None
    assert (second.id, second.weighting) == (2, "houses")


def test_a_state_of_another_model_starts_a_new_lineage(
    tmp_path: Path, exporter: Exporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A saved model that is not this head (here: the closed-set CNN's tensors) is not
    loaded into it and is no error either: a new lineage starts at version 0."""
    store = StateStore(tmp_path / "state")
    old = store.write_arrays("model", [np.ones((3, 3, 1, 16), np.float32), np.ones(16, np.float32)])
    store.commit(
        StateRecord(
            model=ModelRecord(version=7, round=7, names=("conv1/kernel", "conv1/bias"), file=old),
            last_round=7,
        )
    )
    with caplog.at_level("WARNING", logger="aggregator"):
        harness = Harness(tmp_path, exporter)
    assert "starting a new lineage" in caplog.text
    model = harness.coordinator.federation.model
    assert (model.version, harness.coordinator.federation.last_round) == (0, 0)
    assert [w.shape for w in model.weights] == [(256, 128)]
    first = model.lineage
    assert first

    # Once started, the lineage is the state: a restart keeps it, version and all.
    harness.online("a")
    harness.command(cmd="start_round")
    harness.update("a", 1)
    again = Harness(tmp_path, exporter)
    model = again.coordinator.federation.model
    assert (model.lineage, model.version) == (first, 1)
    published = parse_global(
        again.payloads(TOPICS.global_model)[-1], site=SITE, max_bytes=1 << 24, keys=None
    )
    assert (published.lineage, published.version) == (first, 1)

    # A head of another shape (e.g. written by a later embedding size) is left behind too.
    record = store.load()
    assert record is not None
    store.commit(
        record.model_copy(
            update={
                "model": record.model.model_copy(
                    update={"file": store.write_arrays("model", [np.ones((256, 64), np.float32)])}
                )
            }
        )
    )
    fresh = Harness(tmp_path, exporter)
    assert fresh.coordinator.federation.model.version == 0
    assert fresh.coordinator.federation.model.lineage not in ("", first)


def test_state_commits_are_all_or_nothing(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    assert store.load() is None
    first = store.write_arrays("model", [np.arange(3, dtype=np.float32)])
    store.commit(StateRecord(model=ModelRecord(version=0, round=0, names=("w",), file=first)))
    (tmp_path / "unrelated.npz").write_bytes(b"not ours")

    # A crash after writing the next model but before committing it:
    store.write_arrays("model", [np.zeros(3, dtype=np.float32)])
    loaded = store.load()
    assert loaded is not None
    assert loaded.model.version == 0
    np.testing.assert_array_equal(store.read_arrays(loaded.model.file)[0], [0, 1, 2])

    second = store.write_arrays("model", [np.ones(3, dtype=np.float32)])
    store.commit(StateRecord(model=ModelRecord(version=1, round=1, names=("w",), file=second)))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["state.json", second, "unrelated.npz"]
    )
