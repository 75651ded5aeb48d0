"""The benchmarks' round loop (bench.federated) and what make bench / bench-robust print,
on generated features: no ../shared, no TensorFlow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from aggregator.config import RoundSettings
from aggregator.export import as_received
from bench import robust, suite
from bench.data import scorer, synthetic_bench
from bench.federated import PRODUCT, Arm, Attack, Score, run_arm
from bench.households import Bench
from bench.scale import growth_verdict
from fedbell.faces.embedding import HEAD_NAMES, TrainParams
from fedbell.wire import messages

LEARNS = TrainParams(epochs=3, learning_rate=0.01)
"""Enough to move a 32 -> 16 head on generated people in a few rounds."""


@pytest.fixture(scope="module")
def bench() -> Bench:
    return synthetic_bench(0)


def test_an_arm_measures_the_products_defaults() -> None:
    arm = Arm("default")
    settings = RoundSettings()
    assert (arm.codec, arm.density, arm.strategy) == (
        settings.codec,
        settings.density,
        settings.strategy,
    )
    assert arm.signed
    assert arm.downlink_codec == settings.downlink_codec
    assert arm.codec == "topk"  # the default the suite labels "(default)"
    default = suite.DEFAULT_ARM
    assert "(default)" in default.name
    assert (default.codec, default.density, default.downlink_codec) == (
        PRODUCT.codec,
        PRODUCT.density,
        PRODUCT.downlink_codec,
    )
    reference = suite.FLOAT32_FEDAVG
    assert (reference.codec, reference.downlink_codec) == ("float32", "float32")


def test_as_received_is_the_head_a_doorbell_parses(bench: Bench) -> None:
    moved = [
        bench.start[0]
        + np.float32(0.01)
        * np.sin(np.arange(bench.start[0].size)).reshape(bench.start[0].shape).astype(np.float32)
    ]
    for codec in ("float32", "float16", "int8"):
        payload = messages.build_global(
            site="bench",
            signer=messages.Signer(messages.AGGREGATOR),
            version=1,
            round_id=1,
            names=HEAD_NAMES,
            weights=moved,
            lineage="bench",
            threshold=0.5,
            backbone="0" * 64,
            codec=codec,
        )
        parsed = messages.parse_global(payload, site="bench", max_bytes=1 << 24, keys=None)
        np.testing.assert_array_equal(as_received(HEAD_NAMES, moved, codec)[0], parsed.weights[0])
    step = np.abs(moved[0]).max(axis=0) / 127
    error = np.abs(as_received(HEAD_NAMES, moved, "int8")[0] - moved[0])
    assert np.all(error <= step / 2 + 1e-7)
    assert error.max() > 0  # int8 is lossy: the check above is not vacuous


def test_an_int8_downlink_scores_what_doorbells_hold_and_keeps_the_float_base(
    bench: Bench,
) -> None:
    """Doorbells train from and recognise with the int8-decoded head; the aggregator keeps
    its float head as the next base (re-quantising it would round small rounds away)."""
    scored: list[list[np.ndarray]] = []
    score = scorer(bench)

    def recording(weights: list[np.ndarray]) -> Score:
        scored.append([w.copy() for w in weights])
        return score(weights)

    arm = Arm("int8 down", downlink_codec="int8")
    result = run_arm(bench.train[:6], bench.start, arm, 4, recording, params=LEARNS)
    assert len(scored) == 1 + 4
    held = as_received(HEAD_NAMES, result.weights, "int8")
    np.testing.assert_array_equal(scored[-1][0], held[0])
    assert not np.array_equal(result.weights[0], held[0])  # the base is not re-quantised
    assert result.final_accuracy > result.start.open_set_accuracy + 0.05
    float_down = run_arm(
        bench.train[:6],
        bench.start,
        Arm("float32 down", downlink_codec="float32"),
        4,
        score,
        params=LEARNS,
    )
    assert result.bytes_down_per_node < float_down.bytes_down_per_node


def test_federated_rounds_learn_and_count_every_byte(bench: Bench) -> None:
    houses = bench.train[:8]
    result = run_arm(houses, bench.start, Arm("default"), 6, scorer(bench), params=LEARNS)
    assert [r.round for r in result.rounds] == [1, 2, 3, 4, 5, 6]
    assert result.rejected == 0
    # The figure can fail: it is the scorer's, on never-seen people, and it moves.
    assert result.final_accuracy > result.start.open_set_accuracy + 0.05
    # Up: one signed top-k envelope per doorbell per round.
    assert len(result.update_bytes) == 6 * len(houses)
    # Down: both round messages and the signed global head, per doorbell and round.
    head = messages.build_global(
        site="bench",
        signer=messages.Signer(messages.AGGREGATOR),
        version=0,
        round_id=0,
        names=("head/projection",),
        weights=bench.start,
        lineage="bench",
        threshold=0.5,
        backbone="0" * 64,
        codec=PRODUCT.downlink_codec,
    )
    assert result.bytes_down_per_node > len(head)
    first = result.rounds[0]
    assert first.bytes_down == first.participants * result.down_bytes[0]


def test_codecs_shrink_updates_and_float32_is_exact(bench: Bench) -> None:
    houses = bench.train[:4]
    results = {
        codec: run_arm(
            houses, bench.start, Arm(codec, codec=codec), 2, scorer(bench), params=LEARNS
        )
        for codec in ("float32", "float16", "int8", "topk")
    }
    sizes = {codec: r.bytes_per_update for codec, r in results.items()}
    assert sizes["float32"] > sizes["float16"] > sizes["int8"] > sizes["topk"]
    assert sizes["float32"] > 4 * 0.8 * bench.start[0].size  # float32 is about 4 bytes a weight


def test_poisoned_doorbells_hurt_fedavg_and_multi_krum_holds(bench: Bench) -> None:
    houses = bench.train[:8]
    attack: tuple[Attack, ...] = ("scale", "sign_flip")

    def final(arm: Arm) -> float:
        return run_arm(houses, bench.start, arm, 6, scorer(bench), params=LEARNS).final_accuracy

    # Against the run without the two attackers (what a perfect robust rule reaches, as
    # bench.robust compares): on 8 generated houses, leaving 2 out moves the all-honest
    # figure by a few points either way, so that is no fixed reference.
    absent = final(Arm("attackers absent", codec="float32", left_out=2))
    poisoned = final(Arm("fedavg", codec="float32", attackers=attack))
    krum = final(Arm("krum", codec="float32", strategy="multi_krum", attackers=attack))
    assert poisoned < absent - 0.03
    assert krum > poisoned + 0.03


def test_an_unsigned_update_is_refused_on_a_signed_arm(
    bench: Bench, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop verifies signatures as the aggregator does: unsigned updates are refused
    and the round is abandoned (the head does not move)."""
    real = messages.build_update

    def unsigned(**kwargs: object) -> bytes:
        signer = kwargs["signer"]
        assert isinstance(signer, messages.Signer)
        return real(**{**kwargs, "signer": messages.Signer(signer.name)})  # type: ignore[arg-type]

    monkeypatch.setattr(messages, "build_update", unsigned)
    result = run_arm(bench.train[:2], bench.start, Arm("signed"), 2, scorer(bench))
    assert result.rejected == 4
    assert not result.rounds
    np.testing.assert_array_equal(result.weights[0], bench.start[0])


def test_suite_reports_bytes_per_update_and_down_per_codec(bench: Bench, tmp_path: Path) -> None:
    outcome = suite.learning(
        bench, rounds=2, per_round=4, params=LEARNS, seed=0, jobs=1, more=[synthetic_bench(1)]
    )
    report = suite.learning_report(outcome["codecs"], outcome["baselines"])
    assert {c["name"] for c in report["codecs"]} == {a.name for a in suite.CODEC_ARMS}
    for codec in report["codecs"]:
        assert codec["bytes_per_update"] > 0
        assert codec["bytes_down_per_node"] > codec["bytes_per_update"] / 10
        assert 0.0 <= codec["open_set_accuracy"] <= 1.0
    ratios = {c["name"]: c["traffic_vs_float32_fedavg"] for c in report["codecs"]}
    assert ratios[suite.FLOAT32_FEDAVG.name] == 1.0
    assert ratios[suite.DEFAULT_ARM.name] < 1.0  # a 32x16 head: announcements weigh a lot
    assert set(report["baselines"]) == set(suite.BASELINES)
    bar = outcome["bar"]
    finals = {c["name"]: c["open_set_accuracy"] for c in report["codecs"]}
    assert bar["seeds"] == len(bar["points_per_seed"]) == 2
    assert bar["default_accuracy"][0] == finals[suite.DEFAULT_ARM.name]  # the table's seed
    assert bar["float32_accuracy"][0] == finals[suite.FLOAT32_FEDAVG.name]
    assert bar["traffic_ratio"] < 1.0
    assert bar["points_low_95"] < bar["points_mean"]
    margin = 12.706 * bar["points_sd"] / 2**0.5  # Student's t at 97.5 %, one degree of freedom
    assert bar["points_low_95"] == pytest.approx(bar["points_mean"] - margin, rel=1e-3)
    json.dumps(bar)  # it goes into reports/bench.json
    assert bar["passes"] == (bar["traffic_ratio"] <= 0.2 and bar["points_low_95"] >= -1.0)
    console = Console(record=True, width=200)
    suite.print_learning(outcome["codecs"], outcome["baselines"], 2, 4, console)
    suite.print_bar(bar, console)
    text = console.export_text()
    assert "bytes_down_per_node" in text
    assert "of float32 FedAvg" in text
    assert "local_only" in text
    assert "issue 12 traffic bar" in text
    suite.plot(outcome["codecs"], outcome["baselines"], tmp_path / "codecs.png")
    assert (tmp_path / "codecs.png").stat().st_size > 0


def test_robust_arms_run_as_the_configuration_accepts_them() -> None:
    arms = [robust.runnable(arm, 10) for arm in robust.arms(1.0)]
    assert arms[0].name == "fedavg, all honest"
    assert not arms[0].attackers
    assert all(len(a.attackers) == 2 for a in arms[robust.ROBUST_FROM :])
    for arm in arms:
        RoundSettings(codec=arm.codec, strategy=arm.strategy, max_devices=10, clip_norm=1.0)


def test_benches_say_clearly_when_the_photos_are_absent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = ["--dataset", str(tmp_path / "nothing"), "--strangers", str(tmp_path / "none")]
    assert robust.main([*missing, "--report", str(tmp_path / "r.json")]) == 0
    assert suite.main([*missing, "--skip-scale", "--report", str(tmp_path / "b.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("skipped") == 2
    assert "nothing is not here" in printed


def test_scale_growth_bar_can_fail() -> None:
    rows = [
        {"broker": "loopback", "nodes": 10, "collect_growth_mb": 0.5},
        {"broker": "loopback", "nodes": 1000, "collect_growth_mb": 3.0},
        {"broker": "tls", "nodes": 10, "collect_growth_mb": 0.5},
        {"broker": "tls", "nodes": 1000, "collect_growth_mb": 500.0},
    ]
    verdict = growth_verdict(rows)
    assert verdict[0].startswith("PASS  loopback")
    assert verdict[1].startswith("FAIL  tls")
