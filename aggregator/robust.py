"""Robust aggregation and server-side optimisers, as small pure functions.

Streaming FedAvg (`strategy.RunningFedAvg`) stays the default. These answer two
other problems:

- poisoned or broken updates (a doorbell sending ×-10 or sign-flipped
  deltas): norm clipping bounds what any one update can do and still streams;
  coordinate-wise median and trimmed mean need every update of the round at
  once, so they hold at most `max_devices` deltas (the caller bounds that);
- non-IID data (each doorbell sees a few people): a server optimiser treats
  the averaged delta as a pseudo-gradient (FedAvgM: momentum, FedAdam: Adam;
  Reddi et al., "Adaptive Federated Optimization", 2021).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from fedbell.wire.codecs import Weights

Delta = Sequence[npt.NDArray[np.floating]]


def global_norm(delta: Delta) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in delta)))


def clip_by_norm(delta: Delta, max_norm: float) -> Weights:
    """Scale the delta down so its L2 norm is at most `max_norm`."""
    norm = global_norm(delta)
    scale = 1.0 if norm <= max_norm or norm == 0 else max_norm / norm
    return [np.asarray(a * scale, dtype=np.float32) for a in delta]


def coordinate_median(deltas: Sequence[Delta]) -> Weights:
    """Per-coordinate median: one bad update cannot move any coordinate far."""
    if not deltas:
        raise ValueError("nothing to aggregate")
    return [
        np.median(np.stack([d[i] for d in deltas]), axis=0).astype(np.float32)
        for i in range(len(deltas[0]))
    ]


def trimmed_mean(deltas: Sequence[Delta], trim_fraction: float) -> Weights:
    """Per-coordinate mean after dropping the `trim_fraction` largest and smallest."""
    if not deltas:
        raise ValueError("nothing to aggregate")
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim fraction {trim_fraction} must be in [0, 0.5)")
    cut = int(len(deltas) * trim_fraction)
    result: Weights = []
    for i in range(len(deltas[0])):
        ordered = np.sort(np.stack([d[i] for d in deltas]), axis=0)
        kept = ordered[cut : len(deltas) - cut]
        result.append(kept.mean(axis=0).astype(np.float32))
    return result


@dataclass
class ServerOptimizer:
    """FedAvgM or FedAdam over the round's mean delta (the pseudo-gradient).

    Its moments are state: the aggregator saves them with the model so a
    restart does not reset them.
    """

    kind: str = "fedavgm"
    learning_rate: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    epsilon: float = 1e-3
    first: Weights = field(default_factory=list)
    second: Weights = field(default_factory=list)
    steps: int = 0

    def step(self, mean_delta: Delta) -> Weights:
        """The delta to add to the global model this round."""
        if not self.first or [a.shape for a in self.first] != [d.shape for d in mean_delta]:
            self.first = [np.zeros(d.shape, np.float32) for d in mean_delta]
            self.second = [np.zeros(d.shape, np.float32) for d in mean_delta]
            self.steps = 0
        self.steps += 1
        if self.kind == "fedavgm":
            self.first = [
                np.asarray(self.momentum * m + d, np.float32)
                for m, d in zip(self.first, mean_delta, strict=True)
            ]
            return [np.asarray(self.learning_rate * m, np.float32) for m in self.first]
        if self.kind == "fedadam":
            self.first = [
                np.asarray(self.momentum * m + (1 - self.momentum) * d, np.float32)
                for m, d in zip(self.first, mean_delta, strict=True)
            ]
            self.second = [
                np.asarray(self.beta2 * v + (1 - self.beta2) * np.square(d), np.float32)
                for v, d in zip(self.second, mean_delta, strict=True)
            ]
            return [
                np.asarray(self.learning_rate * m / (np.sqrt(v) + self.epsilon), np.float32)
                for m, v in zip(self.first, self.second, strict=True)
            ]
        raise ValueError(f"unknown server optimiser {self.kind!r}")

    def arrays(self) -> Weights:
        """The moments, to save with the model: first moments, then second moments."""
        return [*self.first, *self.second]

    def restore(self, arrays: Sequence[npt.NDArray[np.floating]], steps: int) -> None:
        """Take back what `arrays()` saved (an odd count is a corrupt file)."""
        if len(arrays) % 2:
            raise ValueError(f"{len(arrays)} saved moment arrays, expected an even number")
        half = len(arrays) // 2
        self.first = [np.asarray(a, np.float32) for a in arrays[:half]]
        self.second = [np.asarray(a, np.float32) for a in arrays[half:]]
        self.steps = steps


@dataclass(frozen=True)
class Aggregate:
    """A round's aggregated delta, and which updates the rule judged hostile."""

    delta: Weights
    dropped: tuple[bool, ...] = ()
    """Per update, in the order they were added: left out of the average
    (empty: the rule leaves no whole update out)."""


def capped_weights(weights: Sequence[float], max_share: float) -> npt.NDArray[np.float64]:
    """The weights clipped to one common level so that none is more than `max_share`
    of their sum (water-filling: the largest are cut first, the rest keep their weight).

    With too few updates for the share (n <= 1/max_share) every weight is cut to the
    smallest: equal weights, the closest to the share that n updates allow.
    """
    counts = np.asarray(weights, dtype=np.float64)
    if counts.size == 0 or not 0 < max_share <= 1:
        raise ValueError(f"{counts.size} weights, share {max_share}: nothing to weigh")
    total = float(counts.sum())
    if counts.max() <= max_share * total:
        return counts
    if counts.size * max_share <= 1:
        return np.full_like(counts, counts.min())
    ordered = np.sort(counts)
    for clipped in range(1, counts.size):
        kept = float(ordered[: counts.size - clipped].sum())
        level = max_share * kept / (1 - clipped * max_share)
        if ordered[counts.size - clipped - 1] <= level <= ordered[counts.size - clipped]:
            return np.minimum(counts, level)
    return np.full_like(counts, counts.min())  # pragma: no cover - a level always exists


def multi_krum(
    deltas: Sequence[Delta],
    weights: Sequence[int],
    byzantine: int,
    max_share: float = 1.0,
) -> Aggregate:
    """Multi-Krum (Blanchard et al., NeurIPS 2017), then FedAvg of what is kept.

    Each update is scored by its summed squared distance to its n - f - 2
    nearest fellows; the f worst-scored (at most `byzantine` hostile
    doorbells are assumed) are dropped and the rest averaged by `weights` (the
    round's: equal per house by default), no kept update weighing more than
    `max_share` of them (`capped_weights`): with weighting by examples, a
    hostile update hidden inside the honest cluster cannot take the average
    with a huge example count. Unlike
    coordinate-wise rules it keeps whole honest updates, so a class only a
    few doorbells have seen is not voted away (non-IID). With too few updates
    for the rule (n <= 2f + 2) it falls back to the coordinate median.
    """
    count = len(deltas)
    if count <= 2 * byzantine + 2:
        return Aggregate(coordinate_median(deltas))
    flat = np.stack(
        [np.concatenate([np.ravel(a) for a in delta]).astype(np.float64) for delta in deltas]
    )
    squares = np.sum(flat * flat, axis=1)
    distances = np.maximum(squares[:, None] + squares[None, :] - 2.0 * flat @ flat.T, 0.0)
    np.fill_diagonal(distances, np.inf)
    scores = np.sort(distances, axis=1)[:, : count - byzantine - 2].sum(axis=1)
    keep = sorted(np.argsort(scores, kind="stable")[: count - byzantine].tolist())
    kept = capped_weights([weights[i] for i in keep], max_share)
    kept /= kept.sum()
    delta = [
        np.tensordot(kept, np.stack([deltas[i][t] for i in keep]), axes=1).astype(np.float32)
        for t in range(len(deltas[0]))
    ]
    return Aggregate(delta, tuple(i not in keep for i in range(count)))
