"""Where a round's accepted updates go until it is aggregated.

Two implementations of one small interface, chosen by `rounds.strategy`:

- `Streaming` (fedavg, clipped): each delta is scaled down to `clip_norm`
  (on by default), folded into a running weighted sum (`RunningFedAvg`) and
  dropped. Memory: one model of float64, however many
  devices answer.
- `Buffered` (median, trimmed_mean, multi_krum): these rules need every delta
  of the round at once, so they are kept, at most `capacity` of them (the
  config requires `rounds.max_devices` for these strategies). Memory:
  `capacity` models of float32.

Either way what an update weighs is the round's `Weigh`, from
`rounds.weighting`: one per house by default (issue 18 item 3: a claimed
example count is the doorbell's word), or its claimed examples up to
`rounds.max_examples`. A round keeps the weighting it started with, across a
restart too.

Both expose `arrays()`, what the state folder saves after each accepted
update, and are rebuilt from those arrays after a restart (`restore`), so a
round resumed from disk aggregates exactly what it had accepted.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from aggregator.config import RoundSettings, Weighting
from aggregator.robust import (
    Aggregate,
    Delta,
    ServerOptimizer,
    clip_by_norm,
    coordinate_median,
    multi_krum,
    trimmed_mean,
)
from aggregator.strategy import InconsistentUpdate, RunningFedAvg, SparseFedAvg, check_shapes
from fedbell.wire.codecs import Weights

Arrays = list[npt.NDArray[np.floating]]
Shapes = Sequence[tuple[int, ...]]
Rule = Callable[[Sequence[Delta], Sequence[int]], Aggregate]
Weigh = Callable[[int], int]
"""What an update claiming so many examples weighs in its round's average."""


def weigh(weighting: Weighting, max_examples: int) -> Weigh:
    """`rounds.weighting`: houses, every update 1; examples, its claim up to `max_examples`."""
    if weighting == "houses":
        return lambda _examples: 1
    return lambda examples: min(examples, max_examples)


class Accumulator(ABC):
    """The accepted updates of one round, in whatever form its strategy needs."""

    @property
    @abstractmethod
    def count(self) -> int:
        """Updates added so far."""

    @property
    @abstractmethod
    def total(self) -> int:
        """What the updates added so far weigh together."""

    @abstractmethod
    def add(self, delta: Delta, examples: int) -> None:
        """Take one checked update (claiming `examples`) in; the caller may drop `delta`
        afterwards."""

    @abstractmethod
    def aggregate(self) -> Aggregate:
        """The round's aggregated delta, and which updates the rule left out."""

    @abstractmethod
    def arrays(self) -> Arrays:
        """What must be saved to resume the round after a restart."""


class Streaming(Accumulator):
    """Weighted FedAvg as a running sum; deltas optionally clipped to `clip_norm` first."""

    def __init__(self, fedavg: RunningFedAvg, weigh: Weigh, clip_norm: float | None = None) -> None:
        self.fedavg = fedavg
        self.weigh = weigh
        self.clip_norm = clip_norm

    @property
    def count(self) -> int:
        return self.fedavg.count

    @property
    def total(self) -> int:
        return self.fedavg.total

    def add(self, delta: Delta, examples: int) -> None:
        if examples < 1:
            raise InconsistentUpdate(f"an update needs at least one example, got {examples}")
        if self.clip_norm is not None:
            delta = clip_by_norm(delta, self.clip_norm)
        self.fedavg.add(delta, self.weigh(examples))

    def aggregate(self) -> Aggregate:
        return Aggregate(self.fedavg.mean_delta())

    def arrays(self) -> Arrays:
        if isinstance(self.fedavg, SparseFedAvg):
            return [*self.fedavg.sums, *self.fedavg.coverage]
        return list(self.fedavg.sums)


class Buffered(Accumulator):
    """Every delta of the round and its weight, at most `capacity`, aggregated by `rule`."""

    def __init__(  # noqa: PLR0917 - a saved round's deltas and weights come back together
        self,
        shapes: Shapes,
        rule: Rule,
        capacity: int,
        weigh: Weigh,
        deltas: Sequence[Weights] = (),
        weights: Sequence[int] = (),
    ) -> None:
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        self.rule = rule
        self.capacity = capacity
        self.weigh = weigh
        self.deltas: list[Weights] = []
        self.weights: list[int] = []
        if len(deltas) != len(weights):
            raise InconsistentUpdate(f"{len(deltas)} buffered updates, {len(weights)} weights")
        if len(deltas) > capacity:
            raise InconsistentUpdate(f"{len(deltas)} buffered updates, capacity {capacity}")
        for delta, weight in zip(deltas, weights, strict=True):
            self._keep(delta, weight)

    @property
    def count(self) -> int:
        return len(self.deltas)

    @property
    def total(self) -> int:
        return sum(self.weights)

    def add(self, delta: Delta, examples: int) -> None:
        if examples < 1:
            raise InconsistentUpdate(f"an update needs at least one example, got {examples}")
        self._keep(delta, self.weigh(int(examples)))

    def _keep(self, delta: Delta, weight: int) -> None:
        if weight < 1:
            raise InconsistentUpdate(f"an update weighs at least 1, got {weight}")
        if len(self.deltas) >= self.capacity:  # memory bound: never hold more than this
            raise InconsistentUpdate(f"already holding {self.capacity} updates this round")
        check_shapes(delta, self.shapes)
        self.deltas.append([np.asarray(a, dtype=np.float32) for a in delta])
        self.weights.append(weight)

    def aggregate(self) -> Aggregate:
        if not self.deltas:
            raise InconsistentUpdate("no update has been added")
        return self.rule(self.deltas, self.weights)

    def arrays(self) -> Arrays:
        """All deltas flattened in order (delta 0's tensors, then delta 1's, ...),
        then one vector of their weights."""
        flat: Arrays = [array for delta in self.deltas for array in delta]
        return [*flat, np.asarray(self.weights, dtype=np.float64)]


class SecureSum(Accumulator):
    """A secure round's result: nothing until the sum is unmasked, then its mean delta.

    The aggregator never holds one house's update, only the mean of the round's
    survivors (`aggregator.secure.mean_delta`), each house weighing the same.
    """

    def __init__(self, mean: Weights | None = None, survivors: int = 0) -> None:
        self.mean = mean
        self.survivors = survivors

    @property
    def count(self) -> int:
        return self.survivors

    @property
    def total(self) -> int:
        return self.survivors  # one weight per house: example counts are not seen

    def add(self, delta: Delta, examples: int) -> None:
        raise InconsistentUpdate("a secure round takes no single update, only its unmasked sum")

    def set_mean(self, mean: Weights, survivors: int) -> None:
        self.mean, self.survivors = [np.asarray(m, dtype=np.float32) for m in mean], survivors

    def aggregate(self) -> Aggregate:
        if self.mean is None:
            raise InconsistentUpdate("the secure round's sum has not been unmasked")
        return Aggregate([np.asarray(m, dtype=np.float64) for m in self.mean])

    def arrays(self) -> Arrays:
        return [] if self.mean is None else list(self.mean)


def make_accumulator(settings: RoundSettings, shapes: Shapes, *, sparse: bool) -> Accumulator:
    """An empty accumulator for a new round, as the config's strategy says.

    `sparse`: the round's codec is topk, whose updates FedAvg averages per
    coordinate over the doorbells that sent it (`SparseFedAvg`).
    """
    return restore(settings, shapes, None, total=0, count=0, sparse=sparse)


def restore(
    settings: RoundSettings,
    shapes: Shapes,
    arrays: Arrays | None,
    *,
    total: int,
    count: int,
    sparse: bool,
    secure: bool = False,
    weighting: Weighting | None = None,
) -> Accumulator:
    """The accumulator of a round resumed from disk (`arrays`: what `arrays()` saved).

    `secure`: a secure-aggregation round, whose accumulator is its unmasked mean.
    `weighting`: the one the round started with (default: the config's).
    """
    if secure:
        if not arrays:
            return SecureSum()
        if len(arrays) != len(shapes) or count != total:
            raise InconsistentUpdate(
                f"saved {len(arrays)} arrays of a secure round's mean, the head has {len(shapes)}"
            )
        return SecureSum([np.asarray(a, dtype=np.float32) for a in arrays], count)
    strategy = settings.strategy
    weight = weigh(weighting or settings.weighting, settings.max_examples)
    if strategy in ("fedavg", "clipped"):
        saved = None if arrays is None else [np.asarray(a, dtype=np.float64) for a in arrays]
        clip = settings.clip_norm  # on by default (fedavg too); `clipped` requires it
        if not sparse:
            return Streaming(RunningFedAvg(shapes, saved, total, count), weight, clip)
        if saved is not None and len(saved) != 2 * len(shapes):
            raise InconsistentUpdate(
                f"saved {len(saved)} arrays, a sparse sum has {2 * len(shapes)}"
            )
        sums, coverage = (
            (None, None) if saved is None else (saved[: len(shapes)], saved[len(shapes) :])
        )
        return Streaming(SparseFedAvg(shapes, sums, coverage, total, count), weight, clip)
    if sparse:  # the config refuses it; a saved round must not slip past (issue 13 item 9)
        raise InconsistentUpdate(f"strategy {strategy} cannot aggregate top-k (sparse) updates")
    rule: Rule
    if strategy == "median":
        rule = lambda deltas, _weights: Aggregate(coordinate_median(deltas))  # noqa: E731
    elif strategy == "trimmed_mean":
        fraction = settings.trim_fraction
        rule = lambda deltas, _weights: Aggregate(trimmed_mean(deltas, fraction))  # noqa: E731
    else:
        byzantine, share = settings.byzantine, settings.max_share
        rule = lambda deltas, weights: multi_krum(deltas, weights, byzantine, share)  # noqa: E731
    assert settings.max_devices is not None  # the config guarantees it for buffered rules
    if not arrays:
        return Buffered(shapes, rule, settings.max_devices, weight)
    weights = [int(c) for c in np.asarray(arrays[-1]).reshape(-1)]
    deltas = _split(arrays[:-1], len(shapes))
    if len(deltas) != count or len(weights) != count or sum(weights) != total:
        raise InconsistentUpdate(
            f"saved {len(deltas)} buffered updates weighing {sum(weights)}, the round "
            f"received {count} weighing {total}"
        )
    return Buffered(shapes, rule, settings.max_devices, weight, deltas, weights)


def _split(arrays: Arrays, per_delta: int) -> list[Weights]:
    if per_delta == 0 or len(arrays) % per_delta:
        raise InconsistentUpdate(
            f"{len(arrays)} saved arrays is not a whole number of {per_delta}-tensor updates"
        )
    return [
        [np.asarray(a, dtype=np.float32) for a in arrays[i : i + per_delta]]
        for i in range(0, len(arrays), per_delta)
    ]


def make_optimizer(settings: RoundSettings) -> ServerOptimizer | None:
    """A fresh server optimiser as configured (None: plain FedAvg step)."""
    if settings.server_optimizer == "none":
        return None
    return ServerOptimizer(
        settings.server_optimizer,
        learning_rate=settings.server_lr,
        momentum=settings.server_momentum,
    )


@dataclass(frozen=True)
class Step:
    """A round's outcome: the new global weights and the server optimiser after it."""

    weights: Weights
    optimizer: ServerOptimizer | None
    dropped: tuple[str, ...] = ()
    """Doorbells whose update the strategy left out (Multi-Krum)."""


def next_step(
    base: Sequence[npt.NDArray[np.float32]],
    accumulator: Accumulator,
    devices: Sequence[str],
    optimizer: ServerOptimizer | None,
) -> Step:
    """Aggregate the round (`devices`: who sent each update, in the order added).

    The given optimiser is left untouched: the step only becomes the model's
    once the release is committed, and recomputing an unpublished release
    after a restart must not step the moments twice.
    """
    aggregate = accumulator.aggregate()
    step = aggregate.delta
    if optimizer is not None:
        optimizer = copy.deepcopy(optimizer)
        step = optimizer.step(step)
    weights = [
        (np.asarray(b, dtype=np.float64) + s).astype(np.float32)
        for b, s in zip(base, step, strict=True)
    ]
    dropped = tuple(d for d, out in zip(devices, aggregate.dropped, strict=False) if out)
    return Step(weights, optimizer, dropped)
