"""The rounds' history the retained metrics carry, and the console plotting it at once.

The coordinator runs on a fake clock (tests.test_aggregator_rounds' harness:
the real coordinator, exporter and state store); the page is the real console
in chromium against a real Mosquitto holding the coordinator's retained metrics.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aggregator.export import Exporter
from aggregator.history import history_before
from broker.local import LocalBroker
from console import page_url
from fedbell.wire.protocol import HISTORY_ROUNDS, RoundMetrics, RoundSummary, to_json
from tests.mqtt_helpers import Probe
from tests.test_aggregator_rounds import SITE, TOPICS, Harness, exporter  # noqa: F401 (fixture)
from tests.test_console import browser, expect, vendored  # noqa: F401 (fixtures)


def summary(round_id: int) -> RoundSummary:
    return RoundSummary(
        round=round_id,
        version=round_id,
        outcome="published",
        participants=2,
        accuracy=0.5 + round_id / 1000,
        bytes_up=100 * round_id,
        bytes_down=1000,
    )


def metrics(round_id: int, history: list[RoundSummary]) -> RoundMetrics:
    return RoundMetrics.model_validate(
        {**summary(round_id).model_dump(), "examples": 8, "seconds": 1.0, "history": history}
    )


def automatic(tmp_path: Path, exporter: Exporter, rounds: int) -> Harness:  # noqa: F811
    """A coordinator asked for `rounds` automatic rounds, doorbells a and b online."""
    harness = Harness(tmp_path, exporter)
    harness.online("a", "b")
    harness.command(cmd="auto", rounds=rounds)
    return harness


def test_the_history_is_bounded_and_keeps_a_rounds_last_report() -> None:
    full = [summary(r) for r in range(1, HISTORY_ROUNDS + 1)]
    previous = to_json(metrics(HISTORY_ROUNDS + 1, full))
    after = history_before(previous, HISTORY_ROUNDS + 2)
    assert len(after) == HISTORY_ROUNDS
    assert [r.round for r in after] == list(range(2, HISTORY_ROUNDS + 2))  # oldest dropped
    # Step by step, a round is reported twice: its second report replaces the first.
    assert [r.round for r in history_before(to_json(metrics(3, full[:2])), 3)] == [1, 2]
    assert history_before(None, 1) == []
    assert history_before(b'{"round": "damaged"}', 5) == []  # a damaged record: afresh


def test_each_metrics_message_carries_the_lineages_earlier_rounds(
    tmp_path: Path,
    exporter: Exporter,  # noqa: F811
) -> None:
    harness = automatic(tmp_path, exporter, rounds=3)
    for round_id in (1, 2, 3):
        harness.update("a", round_id)
        harness.update("b", round_id)
    reports = harness.metrics()
    assert [m.round for m in reports] == [1, 2, 3]
    assert reports[-1].history == [m.summary() for m in reports[:2]]

    # Step by step, and across a restart: the history comes from the committed metrics.
    restarted = harness.restart(tmp_path)
    restarted.online("a", "b")
    for step in ("train", "send"):
        restarted.command(cmd=step)
    restarted.update("a", 4)
    restarted.update("b", 4)
    restarted.command(cmd="aggregate")
    restarted.command(cmd="publish")
    *_, aggregated, published = restarted.metrics()  # after round 3's, republished on connect
    assert (aggregated.outcome, published.outcome) == ("aggregated", "published")
    assert published.history == [m.summary() for m in reports]  # round 4 not listed twice


def test_a_console_opened_late_plots_every_round_at_once(
    tmp_path: Path,
    exporter: Exporter,  # noqa: F811
    broker: LocalBroker,
    browser: Any,  # noqa: F811
) -> None:
    harness = automatic(tmp_path, exporter, rounds=4)
    for round_id in (1, 2, 3, 4):
        harness.update("a", round_id)
        if round_id != 3:
            harness.update("b", round_id)
        else:
            harness.now += 61  # b never answers round 3: it closes with one update
            harness.coordinator.tick()
    last = harness.payloads(TOPICS.metrics)[-1]
    writer = Probe(broker.port)
    page = browser.new_page()
    try:
        writer.publish(TOPICS.metrics, last, retain=True)  # what a page opened now meets
        page.goto(page_url("127.0.0.1", broker.ws_port, SITE))
        reports = harness.metrics()
        assert [m.round for m in reports] == [1, 2, 3, 4]
        # (This harness has no evaluation set: no accuracy to plot; the same code plots it.)
        scored = sum(m.accuracy is not None for m in reports)
        for chart, points in (("accuracy", scored), ("bytes", 2 * 4), ("participants", 4)):
            expect(page.locator(f"#{chart}-chart circle")).to_have_count(points)
        expect(page.locator("#rounds tbody tr")).to_have_count(4)
        participants = [m.participants for m in reports]
        assert participants == [2, 2, 1, 2]
        shown = page.locator("#rounds tbody tr td:nth-child(5)").all_inner_texts()
        assert [int(n) for n in reversed(shown)] == participants
    finally:
        page.close()
        writer.close()
