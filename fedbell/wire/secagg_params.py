"""A secure-aggregation round's parameters, their defaults, and the neighbour graph.

SecAgg+ (Bell et al. 2020): instead of every pair of doorbells sharing a mask
(Bonawitz et al. 2017, cost growing with n), each doorbell masks with k
neighbours on a random k-regular graph and Shamir-shares its secrets among them
only, so the cost per doorbell grows with log n. The graph is public and seeded
by the round: every party computes it from the sorted roster, nobody chooses it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fedbell.wire import masking
from fedbell.wire.masking import round_seed, seeded_permutation

MAX_DEVICES = 10_000
"""Largest roster a message may carry (bounds every parser's input)."""
MAX_SIZE = 1 << 22
"""Most coordinates one masked input may carry (16 MiB of uint32)."""
DEFAULT_MAX_DROPOUT = 0.1
"""Share of a round's doorbells that may drop after the roster and still be recovered."""
ROUND_FAILURE = 1e-3
"""Tolerated expected number of doorbells whose secrets are left with fewer than t
shares, per round, at the planned dropout (the round then fails closed; retrying costs
time, not privacy)."""
_GRAPH_LABEL = b"fedbell secagg graph v1"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def default_threshold(neighbours: int) -> int:
    """floor(k/2) + 1: a strict majority of the neighbours.

    It is the smallest t for which a server that lies about dropouts cannot
    collect both secrets of one doorbell: it would need t shares of the self
    seed from neighbours told "survived" and t shares of the mask key from
    others told "dropped", 2t > k shares from k neighbours, each of which
    answers one request and never both for one doorbell.
    """
    return neighbours // 2 + 1


def _binomial_below(trials: int, successes: int, probability: float) -> float:
    """P(Binomial(trials, probability) < successes)."""
    return sum(
        math.comb(trials, i) * probability**i * (1 - probability) ** (trials - i)
        for i in range(successes)
    )


def default_neighbours(cohort: int, max_dropout: float = DEFAULT_MAX_DROPOUT) -> int:
    """k for a round of `cohort` doorbells: even, >= 2 ceil(log2 n), at most n - 1.

    The smallest even k from 2 ceil(log2 n) upward for which, with each doorbell
    dropping independently with probability `max_dropout`, the expected number of
    doorbells left with fewer than t = floor(k/2) + 1 live neighbours stays below
    ROUND_FAILURE. At 10 % dropout: k = 20 at 100 doorbells, 24 at 1,000, 30 at
    10,000 (log n growth); at 30 %: 99 at 100 (everyone), 134 at 1,000. n - 1
    (odd or even) means the complete graph: plain SecAgg.
    """
    if cohort < 2 or not 0 <= max_dropout < 1:
        raise ValueError(f"cohort {cohort} >= 2 and max_dropout {max_dropout} in [0, 1) required")
    k = max(2, 2 * math.ceil(math.log2(cohort)))
    while k < cohort - 1:
        unrecovered = cohort * _binomial_below(k, default_threshold(k), 1 - max_dropout)
        if unrecovered <= ROUND_FAILURE:
            return k
        k += 2
    return cohort - 1


def default_scale(clip_norm: float, max_devices: int, noise_std: float = 0.0) -> float:
    """The largest fixed-point scale for which the round's sum cannot wrap around.

    A clipped update has every coordinate within +/-C; its noise stays within
    +/-8 noise_std except with probability ~1e-15 per coordinate; stochastic
    rounding adds at most 1. So each coordinate of the sum of n <= max_devices
    encoded updates lies within n (C + 8 noise_std) scale + n, and
        scale = (2^23 - 1 - n) / (n (C + 8 noise_std))
    keeps it inside [-2^23, 2^23) (masking.MODULUS_BITS). At C = 1 and 1,000
    doorbells that is ~8,400, a resolution of 1.2e-4 per doorbell whose rounding
    is unbiased, so the mean of n carries rounding noise of at most
    0.5 / (scale sqrt(n)) per coordinate: 2e-6 at 1,000, far below a head's step.
    """
    if not clip_norm > 0 or max_devices < 1 or noise_std < 0:
        raise ValueError("clip_norm > 0, max_devices >= 1 and noise_std >= 0 required")
    room = float(2 ** (masking.MODULUS_BITS - 1) - 1 - max_devices)
    return room / (max_devices * (clip_norm + 8 * noise_std))


@dataclass(frozen=True)
class SecAggParams:
    """What every party of one round agrees on (the aggregator signs it in the announcement).

    neighbours: k, even (or n - 1 for the complete graph), see default_neighbours.
    share_threshold: t, with k/2 < t <= k (see default_threshold for why a majority).
    scale: fixed-point scale of masking.encode (see default_scale for the bound).
    size: number of coordinates each doorbell masks (the round's shared subset).
    min_cohort: fewest doorbells whose sum may ever be revealed.
    """

    round_id: int
    lineage: str | None
    min_cohort: int
    neighbours: int
    share_threshold: int
    scale: float
    size: int

    def __post_init__(self) -> None:
        problems = []
        if self.round_id < 1:
            problems.append(f"round_id {self.round_id} must be >= 1")
        if self.lineage is not None and not _NAME.fullmatch(self.lineage):
            problems.append(f"lineage {self.lineage!r} is not 1-64 of [A-Za-z0-9_-]")
        if not 2 <= self.min_cohort <= MAX_DEVICES:
            problems.append(f"min_cohort {self.min_cohort} must be in [2, {MAX_DEVICES}]")
        if not 1 <= self.neighbours < MAX_DEVICES:
            problems.append(f"neighbours {self.neighbours} must be in [1, {MAX_DEVICES})")
        if not self.neighbours // 2 < self.share_threshold <= self.neighbours:
            problems.append(
                f"share_threshold {self.share_threshold} must be a majority of "
                f"{self.neighbours} neighbours (in ({self.neighbours // 2}, {self.neighbours}])"
            )
        if not (math.isfinite(self.scale) and self.scale > 0):
            problems.append(f"scale {self.scale} must be positive and finite")
        if not 1 <= self.size <= MAX_SIZE:
            problems.append(f"size {self.size} must be in [1, {MAX_SIZE}]")
        if problems:
            raise ValueError("bad secure aggregation parameters: " + "; ".join(problems))

    @classmethod
    def for_cohort(
        cls,
        *,
        round_id: int,
        lineage: str | None,
        cohort: int,
        size: int,
        clip_norm: float,
        noise_std: float = 0.0,
        min_cohort: int | None = None,
        max_dropout: float = DEFAULT_MAX_DROPOUT,
    ) -> SecAggParams:
        """Defaults for `cohort` selected doorbells: k, t, scale as above.

        min_cohort defaults to min(cohort, max(3, ceil(cohort / 2))): never a
        sum of fewer than 3 houses, and a round that lost half its doorbells
        is not worth finishing.
        """
        k = default_neighbours(cohort, max_dropout)
        floor = min(cohort, max(3, math.ceil(cohort / 2)))
        return cls(
            round_id=round_id,
            lineage=lineage,
            min_cohort=floor if min_cohort is None else min_cohort,
            neighbours=k,
            share_threshold=default_threshold(k),
            scale=default_scale(clip_norm, cohort, noise_std),
            size=size,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able fields (for the signed round announcement)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> SecAggParams:
        """The params back from `to_dict`'s form; ValueError names what is wrong."""
        expected = set(cls.__dataclass_fields__)
        if set(fields) != expected:
            raise ValueError(f"secagg params need exactly the fields {sorted(expected)}")
        typed: dict[str, type | tuple[type, ...]] = {
            "round_id": int,
            "min_cohort": int,
            "neighbours": int,
            "share_threshold": int,
            "size": int,
            "scale": (int, float),
        }
        for name, kind in typed.items():
            value = fields[name]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"secagg params: {name} {value!r} has the wrong type")
        if fields["lineage"] is not None and not isinstance(fields["lineage"], str):
            raise ValueError(f"secagg params: lineage {fields['lineage']!r} is not a string")
        return cls(**{**fields, "scale": float(fields["scale"])})

    def degree(self, roster_size: int) -> tuple[int, int]:
        """(k, t) on a roster of this size: the complete graph when k >= n - 1.

        A sparse graph needs an even k (k/2 each side), so an odd k is rounded
        down; t is kept if it fits, else a majority of k.
        """
        k = min(self.neighbours, roster_size - 1)
        if k < roster_size - 1 and k % 2:
            k -= 1
        t = self.share_threshold if self.share_threshold <= k else k // 2 + 1
        return k, t

    def context(self) -> bytes:
        """Round and lineage as bytes: bound into every key, signature and commitment."""
        return f"{self.round_id}\n{self.lineage or ''}\n".encode()


def _ring(devices: Sequence[str], params: SecAggParams) -> tuple[list[str], int]:
    """(the roster in the round's seeded order, k); k >= n - 1 means the complete graph."""
    names = sorted(devices)
    k, _ = params.degree(len(names))
    if k >= len(names) - 1:
        return names, k
    order = seeded_permutation(
        round_seed(_GRAPH_LABEL, params.round_id, params.lineage), len(names)
    )
    return [names[i] for i in order], k


def _around(ring: list[str], position: int, k: int) -> tuple[str, ...]:
    count = len(ring)
    if k >= count - 1:
        return tuple(sorted(name for p, name in enumerate(ring) if p != position))
    steps = [step for d in range(1, k // 2 + 1) for step in (d, -d)]
    return tuple(sorted(ring[(position + step) % count] for step in steps))


def neighbour_graph(devices: Sequence[str], params: SecAggParams) -> dict[str, tuple[str, ...]]:
    """Each device's neighbours (sorted), from the sorted roster and the round alone.

    A Harary graph on a round-seeded random order of the roster: the device at
    position p neighbours those at p +/- 1 .. k/2. Every party computes the same
    graph and nobody (the server included) picks who shares with whom.
    """
    ring, k = _ring(devices, params)
    return {name: _around(ring, p, k) for p, name in enumerate(ring)}


def neighbours_of(device: str, devices: Sequence[str], params: SecAggParams) -> tuple[str, ...]:
    """neighbour_graph(devices, params)[device], without building the whole graph."""
    ring, k = _ring(devices, params)
    return _around(ring, ring.index(device), k)
