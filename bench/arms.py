"""What a benchmark compares and what it gets back from `bench.federated.run_arm`.

An `Arm` is one set-up of the round loop (codec, strategy, server optimiser,
attackers, secure aggregation), everything it does not name the aggregator's
default (`PRODUCT`); a `Score` is a release as the aggregator scores it; an
`ArmResult` the rounds an arm ran. `round_settings` turns an arm into the
aggregator's own round settings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from aggregator.config import DEFAULT_MIN_COHORT, RoundSettings, Weighting
from fedbell.faces.embedding import Features, LabelIds
from fedbell.wire.codecs import Weights
from fedbell.wire.envelope import Codec

Strategy = Literal["fedavg", "clipped", "median", "trimmed_mean", "multi_krum"]
Craft = Callable[[Sequence[np.ndarray], Sequence[np.ndarray]], list[np.ndarray]]
"""A hostile doorbell's delta from (the global head, its honestly trained delta)."""
Attack = Literal["scale", "sign_flip"]
PRODUCT = RoundSettings()
"""The aggregator's defaults: what a benchmark measures unless an arm says otherwise."""


class House(Protocol):
    """One training doorbell's data (`bench.households.House` is one)."""

    @property
    def features(self) -> Features: ...
    @property
    def labels(self) -> LabelIds: ...
    @property
    def negatives(self) -> Features: ...


@dataclass(frozen=True)
class Score:
    """A release as the aggregator scores it."""

    open_set_accuracy: float
    threshold: float
    tar_at_far_1pct: float = float("nan")


Scorer = Callable[[Weights], Score]
Gate = Callable[[Score, Score, Score], bool]
"""(release, published, start) -> refuse the release."""


@dataclass(frozen=True)
class Secure:
    """Secure aggregation (and house-level DP) in the loop, as the product runs it.

    Each doorbell's client step is `train_delta` from the global head plus its
    error-feedback residual, then `edge.secure.secure_update` (the round's
    shared subset, clipped to `clip_norm`, its share of the noise, fixed point);
    the server step is `aggregator.secure.mean_delta` of the fixed-point sum,
    each house weighing the same. The pairwise and self masks are left out:
    they cancel exactly in the sum (tested in tests/test_secagg*.py), so the
    sum here is the number the aggregator unmasks, without the key exchange.
    """

    clip_norm: float
    noise_multiplier: float = 0.0
    min_cohort: int = DEFAULT_MIN_COHORT
    density: float = PRODUCT.secure_density
    max_dropout: float = PRODUCT.privacy.max_dropout


@dataclass(frozen=True)
class Arm:
    """One set-up to compare. Everything not named is the product's default."""

    name: str
    codec: Codec = PRODUCT.codec
    density: float = PRODUCT.density
    strategy: Strategy = PRODUCT.strategy
    weighting: Weighting = PRODUCT.weighting
    """What an update weighs in a plain round: the same per house, or its examples (capped)."""
    clip_norm: float = 1.0
    """With strategy "clipped" only; other arms keep the aggregator's default clipping."""
    trim_fraction: float = 0.2
    attackers: tuple[Attack, ...] = ()
    """The first len(attackers) houses send poisoned updates of these kinds."""
    byzantine: int | None = None
    """Hostile updates Multi-Krum assumes; by default as many as there are attackers."""
    left_out: int = 0
    """The first `left_out` houses take no part: with the attackers simply absent,
    this is what a perfect robust rule could reach."""
    server: Literal["none", "fedavgm", "fedadam"] = PRODUCT.server_optimizer
    server_momentum: float = PRODUCT.server_momentum
    downlink_codec: Codec = PRODUCT.downlink_codec
    signed: bool = True
    """Ed25519 on every update and every model, verified on arrival (the product's
    production set-up)."""
    secure: Secure | None = None


@dataclass
class RoundResult:
    round: int
    open_set_accuracy: float
    threshold: float
    tar_at_far_1pct: float
    bytes_up: int
    bytes_down: int
    """Everything the round's doorbells received: announcements and the global head."""
    seconds: float
    participants: int

    @property
    def accuracy(self) -> float:
        return self.open_set_accuracy


@dataclass
class ArmResult:
    arm: Arm
    start: Score
    rounds: list[RoundResult] = field(default_factory=list)
    update_bytes: list[int] = field(default_factory=list)
    down_bytes: list[int] = field(default_factory=list)
    """Per doorbell per round: round announcements + the global head message."""
    client_seconds: list[float] = field(default_factory=list)
    """Per doorbell per round: its client step (`TrainedDelta.seconds`)."""
    update_norms: dict[int, list[float]] = field(default_factory=dict)
    """Per secure round, per doorbell: the norm of its subset before the clip, as the run
    trained it (its residual and its kept Adam)."""
    rejected: int = 0
    """Updates the aggregator's checks refused (an honest run has none)."""
    abandoned: int = 0
    """Rounds whose release the `gate` refused (the model stayed)."""
    weights: Weights = field(default_factory=list)
    """The aggregator's (float) global head after the last round; the doorbells hold it as
    `aggregator.export.as_received` decodes it in the arm's downlink codec."""

    @property
    def final(self) -> Score:
        if not self.rounds:
            return self.start
        last = self.rounds[-1]
        return Score(last.open_set_accuracy, last.threshold, last.tar_at_far_1pct)

    @property
    def final_accuracy(self) -> float:
        return self.final.open_set_accuracy

    def rounds_to(self, target: float) -> int | None:
        return next((r.round for r in self.rounds if r.open_set_accuracy >= target), None)

    @property
    def bytes_per_update(self) -> float:
        return float(np.mean(self.update_bytes)) if self.update_bytes else 0.0

    @property
    def bytes_down_per_node(self) -> float:
        return float(np.mean(self.down_bytes)) if self.down_bytes else 0.0


def poison(delta: Weights, attack: Attack) -> Weights:
    factor = -10.0 if attack == "scale" else -1.0
    return [np.asarray(factor * d, np.float32) for d in delta]


def round_settings(arm: Arm, per_round: int) -> RoundSettings:
    """The aggregator's round settings for the arm (its defaults for everything else:
    norm clipping, the example cap, Multi-Krum's share bound)."""
    chosen: dict[str, object] = {
        "codec": arm.codec,
        "density": arm.density,
        "downlink_codec": arm.downlink_codec,
        "strategy": arm.strategy,
        "weighting": arm.weighting,
        "trim_fraction": arm.trim_fraction,
        "byzantine": arm.byzantine or len(arm.attackers) or 1,
        "max_devices": per_round,
        "server_optimizer": arm.server,
        "server_momentum": arm.server_momentum,
        "timeout_s": 1e9,
    }
    if arm.strategy == "clipped":
        chosen["clip_norm"] = arm.clip_norm
    return RoundSettings.model_validate(chosen)
