"""The accuracy bars a release must clear before it is published: one function for the
coordinator and the benchmarks (`bench.drift`).

A release is compared with the published version (`max_accuracy_drop`: a collapse
in one round) and with the lineage's start (`max_accuracy_loss`: a reference small
steps cannot walk down, issue 18 item 2), both scored on the same evaluation set.
"""

from __future__ import annotations

from dataclasses import dataclass

from aggregator.config import RoundSettings


@dataclass(frozen=True)
class Refusal:
    reason: str
    """`accuracy_drop` or `accuracy_loss`: the counter and the setting (rounds.max_<reason>)."""
    bar: float
    reference: float
    """The score the release fell too far below."""


def accuracy_bar(
    accuracy: float, published: float | None, start: float | None, settings: RoundSettings
) -> Refusal | None:
    """Why a release scoring `accuracy` must not be published, or None if it may."""
    for bar, reason, reference in (
        (settings.max_accuracy_drop, "accuracy_drop", published),
        (settings.max_accuracy_loss, "accuracy_loss", start),
    ):
        if bar is not None and reference is not None and accuracy < reference - bar:
            return Refusal(reason, bar, reference)
    return None
