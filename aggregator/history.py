"""The bounded history of rounds that each retained metrics message carries.

The retained metrics message is the only record of the rounds: each new one
carries the previous one's history plus the previous round itself, bounded,
so a console opened at any time plots the lineage's rounds at once. A round
reported twice (step by step: aggregated, then published) keeps its last report.
"""

from __future__ import annotations

from fedbell.errors import RejectedMessage
from fedbell.wire.protocol import HISTORY_ROUNDS, RoundMetrics, RoundSummary, parse_json


def history_before(previous: bytes | None, round_id: int) -> list[RoundSummary]:
    """The history for round `round_id`'s metrics, from the previous retained metrics."""
    if previous is None:
        return []
    try:
        last = parse_json(previous, RoundMetrics)
    except RejectedMessage:  # from an older aggregator or damaged: start afresh
        return []
    rounds = [*last.history, last.summary()]
    return [r for r in rounds if r.round != round_id][-HISTORY_ROUNDS:]
