"""The product's round steps as the benchmarks call them, in one process.

`open_round` opens a round as the coordinator does (its announcement, an empty
accumulator), `Intake` takes an update in as `Coordinator._on_update` does
(parse, signature, the round's checks, the accumulator), `answer` is a
doorbell's signed update for an announced round. `bench.federated`'s loop,
`bench.fuzz` and `bench.devices` share them, so there is one copy of each path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from aggregator.accumulator import Accumulator
from aggregator.config import RoundSettings
from aggregator.rounds import Round, announce
from fedbell.wire import messages
from fedbell.wire.envelope import TensorSpec
from fedbell.wire.protocol import RoundAnnouncement


def open_round(
    settings: RoundSettings,
    round_id: int,
    selected: Sequence[str],
    accumulator: Accumulator,
    *,
    lineage: str,
) -> Round:
    """The round as the coordinator opens it: its announcement, an empty accumulator."""
    now = time.time()
    announcement = announce(
        round_id=round_id,
        base_version=round_id - 1,
        lineage=lineage,
        selected=selected,
        now=now,
        settings=settings,
        manual=False,
    )
    return Round(
        announcement=announcement,
        manual=False,
        started_at=now,
        accumulator=accumulator,
        strategy=settings.strategy,
        weighting=settings.weighting,
    )


@dataclass(frozen=True)
class Intake:
    """The aggregator's intake of updates (`Coordinator._on_update`'s path): what it checks
    an update against."""

    site: str
    max_bytes: int
    specs: Sequence[TensorSpec]
    keys: Mapping[str, Ed25519PublicKey] | None
    """The doorbells' public keys (None: an unsigned set-up)."""
    max_norm: float

    def take(self, current: Round, payload: bytes, device: str) -> messages.Update:
        """Parse (envelope, signature, specs, values), the round's checks, then the
        accumulator. Raises `RejectedMessage` or `InconsistentUpdate` for what the
        aggregator refuses."""
        update = messages.parse_update(
            payload,
            site=self.site,
            device=device,
            expected=self.specs,
            max_bytes=self.max_bytes,
            keys=self.keys,
        )
        current.check(update, time.time(), self.max_norm)
        current.accept(update, len(payload))
        return update


def answer(
    announcement: RoundAnnouncement,
    *,
    site: str,
    signer: messages.Signer,
    num_examples: int,
    names: Sequence[str],
    delta: Sequence[np.ndarray],
) -> bytes:
    """A doorbell's signed update for an announced round, in the round's codec."""
    return messages.build_update(
        site=site,
        signer=signer,
        round_id=announcement.round,
        base_version=announcement.base_version,
        num_examples=num_examples,
        names=names,
        delta=delta,
        codec=announcement.codec,
        density=announcement.density,
    )
