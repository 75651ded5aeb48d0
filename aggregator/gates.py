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


def bars_finer_than_a_face(faces: int, settings: RoundSettings) -> list[str]:
    """The accuracy bars (`max_accuracy_drop`, `max_accuracy_loss`) finer than one face of an
    evaluation set of `faces`: accuracy on N faces moves in steps of about 1/N, so such a bar
    refuses a round because a single face was named differently, and a small site's
    federation stalls with nothing wrong."""
    step = 1.0 / max(faces, 1)
    return [
        f"rounds.max_{reason} ({bar:.3g})"
        for bar, reason in (
            (settings.max_accuracy_drop, "accuracy_drop"),
            (settings.max_accuracy_loss, "accuracy_loss"),
        )
        if bar is not None and bar < step
    ]
