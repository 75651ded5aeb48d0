"""A secure round on the aggregator: the phases between the announcement and the sum.

The coordinator announces a secure round in phase `keys` and hands this module
every message on the doorbells' secagg topics. Each phase collects one message
per expected doorbell (`expected`) until all have answered or its deadline
passes; the coordinator then moves to the next phase, or abandons the round if
fewer than `min_cohort` doorbells remain (fail closed: no sum of fewer houses is
ever unmasked).

    keys    selected doorbells publish signed key adverts     -> roster in the announcement
    shares  advertised doorbells publish encrypted seed shares -> routed to each one's inbox
    send    doorbells that shared publish their masked update  -> survivors and dropped
    unmask  survivors answer the unmask request                -> the round's sum

The cryptography is `fedbell.wire.secagg`'s (SecAggServer); this module is
phases, bookkeeping and the server step that turns the unmasked sum into the
round's delta. The server's key-agreement state lives in memory only: an
aggregator restarted during a secure round abandons it (`Coordinator.tick`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedbell.errors import RejectedMessage
from fedbell.wire import masking
from fedbell.wire.codecs import Weights
from fedbell.wire.protocol import Phase, SecAggPlan
from fedbell.wire.secagg import SecAggServer
from fedbell.wire.topics import SecAggLeaf

LEAF_OF_PHASE: Final[Mapping[Phase, SecAggLeaf]] = {
    "keys": "keys",
    "shares": "shares",
    "send": "masked",
    "unmask": "unmask",
}
"""Which doorbell message each phase of a secure round collects."""
WAITS_FOR: Final[Mapping[Phase, SecAggLeaf]] = {
    "shares": "keys",
    "send": "shares",
    "unmask": "masked",
}
"""A phase waits for the doorbells whose message the phase before accepted."""
NEXT_PHASE: Final[Mapping[Phase, Phase]] = {"keys": "shares", "shares": "send", "send": "unmask"}


@dataclass
class SecurePhases:
    """The server side of one secure round: who answered which phase, and the SecAgg state."""

    plan: SecAggPlan
    server: SecAggServer
    selected: tuple[str, ...]
    phase: Phase = "keys"
    answered: dict[SecAggLeaf, list[str]] = field(default_factory=dict)
    bytes_up: int = 0
    """Payload bytes of every accepted secagg message (adverts, shares, masked, unmask)."""
    bytes_down: int = 0
    """Payload bytes of the inboxes routed to the doorbells (each to its own)."""
    unmasked: bool = False
    """The round's sum was unmasked (the aggregator has seen it, published or not)."""
    houses: dict[str, str] = field(default_factory=dict)
    """The house whose hub carried each doorbell's accepted key advert across the
    federation tier (none on a house's own broker): its inbox goes to that house's hub."""

    @classmethod
    def start(
        cls,
        plan: SecAggPlan,
        round_id: int,
        lineage: str,
        selected: Sequence[str],
        device_keys: Mapping[str, Ed25519PublicKey] | None,
    ) -> SecurePhases:
        keys = None if device_keys is None else dict(device_keys)
        server = SecAggServer(plan.params(round_id, lineage), keys, tuple(selected))
        return cls(plan=plan, server=server, selected=tuple(selected))

    @property
    def leaf(self) -> SecAggLeaf:
        return LEAF_OF_PHASE[self.phase]

    def expected(self) -> tuple[str, ...]:
        """The doorbells the current phase waits for."""
        before = WAITS_FOR.get(self.phase)
        return self.selected if before is None else self.done(before)

    def done(self, leaf: SecAggLeaf) -> tuple[str, ...]:
        return tuple(self.answered.get(leaf, []))

    def complete(self) -> bool:
        return set(self.expected()) <= set(self.done(self.leaf))

    def handle(
        self, leaf: SecAggLeaf, device: str, payload: bytes, house: str | None = None
    ) -> None:
        """Take one doorbell message; RejectedMessage (SecAggError, its reason saying why:
        wrong phase, unknown device, bad signature, wrong round or size, a share that does
        not match its commitment...) and nothing changed if the library refuses it. A
        redelivered copy is accepted once; a different second message is refused.
        `house`: the hub that carried it (fedbell.wire.topics.SecAggOrigin)."""
        handlers = {
            "keys": self.server.add_advert,
            "shares": self.server.add_shares,
            "masked": self.server.add_masked,
            "unmask": self.server.add_unmask,
        }
        handlers[leaf](device, payload)
        if device not in self.done(leaf):
            self.answered.setdefault(leaf, []).append(device)
            self.bytes_up += len(payload)
            if house is not None:
                self.houses[device] = house

    def sum_ready(self) -> bool:
        """Unmask phase: the survivors who answered already rebuild every seed (the others
        need not answer); False while more shares are needed, True on any other outcome,
        which `server.result()` then reports."""
        if self.phase != "unmask":
            return False
        try:
            self.server.result()
        except RejectedMessage as err:
            return err.reason != "secagg_unrecoverable"
        return True

    def advance(self) -> Phase:
        """The next phase (the caller checked the cohort and publishes what it needs)."""
        self.phase = NEXT_PHASE[self.phase]
        return self.phase


def mean_bound(plan: SecAggPlan, survivors: int) -> float:
    """The largest L2 norm the mean of `survivors` honest doorbells' inputs can have.

    Each honest input is clipped to clip_norm, so their mean is too (triangle
    inequality); to that the noise adds, per coordinate, noise_std x sqrt(m) / m
    (norm ~ noise_std x sqrt(size / m), taken with a 20 % margin: a chi with
    hundreds of degrees of freedom stays within a few % of its mean), and stochastic
    rounding less than 1/scale. A larger mean means a doorbell masked a value it
    never clipped (a compromised one): its push is bounded by this check, not by
    the fixed-point range (which would let it set each coordinate anywhere within
    +/- clip_norm + 8 noise_std).
    """
    noise = 1.2 * plan.noise_std * math.sqrt(plan.size / survivors)
    return plan.clip_norm + noise + math.sqrt(plan.size) / plan.scale


def mean_delta(
    total: npt.NDArray[np.uint32],
    survivors: int,
    plan: SecAggPlan,
    indices: npt.NDArray[np.int64],
    shapes: Sequence[tuple[int, ...]],
) -> Weights:
    """The server step: the unmasked fixed-point sum of a round, as the round's delta.

    Every house weighs the same (the aggregator cannot see example counts). The
    mean over the round's shared subset, scaled by dimension / size, is scattered
    back onto a zero delta of the head's shapes (coordinates outside the subset do
    not move): each coordinate is in a round's subset with probability size /
    dimension, so over rounds the head moves as by the whole mean delta (random-k
    sparsification made unbiased; doorbells keep no remainder, see edge/secure.py
    for why and what it measured). The norm check comes first, on the mean itself.
    """
    if survivors < 1:
        raise ValueError("a secure round's sum needs at least one doorbell")
    mean = masking.decode_sum(total, plan.scale) / survivors
    norm, bound = float(np.linalg.norm(mean)), mean_bound(plan, survivors)
    if norm > bound:
        raise RejectedMessage(
            "secagg_sum_out_of_bounds",
            f"the mean of {survivors} doorbells has L2 norm {norm:.4g}, more than the "
            f"{bound:.4g} clipped updates and their noise can reach: a doorbell masked an "
            "update it did not clip; nothing is published",
        )
    flat = np.zeros(plan.dimension, dtype=np.float64)
    flat[indices] = mean * (plan.dimension / plan.size)
    delta: Weights = []
    offset = 0
    for shape in shapes:
        count = int(np.prod(shape))
        delta.append(flat[offset : offset + count].reshape(shape).astype(np.float32))
        offset += count
    return delta
