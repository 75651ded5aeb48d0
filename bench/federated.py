"""Federated rounds in one process, for benchmarks that compare many set-ups.

The MQTT simulation (`make demo`) runs every part as its own process; to
compare codecs or strategies side by side over dozens of rounds on two cores,
this runs the same learning in one process instead: every update still goes
through the real wire path (`build_update` → `parse_update`), the real
streaming FedAvg and the real robust strategies; only the broker hop is left
out (the scale benchmark measures that separately).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from aggregator.accumulator import make_accumulator, make_optimizer, next_step
from aggregator.config import RoundSettings
from fedbell import messages
from fedbell import model as face_model
from fedbell.codecs import Weights
from fedbell.envelope import Codec
from fedbell.model import Images, LabelIds, TrainParams
from fedbell.sparsify import with_error_feedback

Strategy = Literal["fedavg", "clipped", "median", "trimmed_mean", "multi_krum"]
Attack = Literal["scale", "sign_flip"]
SITE = "bench"


@dataclass(frozen=True)
class Arm:
    """One set-up to compare: codec, aggregation strategy, attackers."""

    name: str
    codec: Codec = "float32"
    density: float = 0.05
    strategy: Strategy = "fedavg"
    clip_norm: float = 1.0
    trim_fraction: float = 0.2
    attackers: tuple[Attack, ...] = ()
    """The first len(attackers) nodes send poisoned updates of these kinds."""
    byzantine: int | None = None
    """Hostile updates Multi-Krum assumes; by default as many as there are attackers."""
    left_out: int = 0
    """The first `left_out` nodes take no part: with the attackers simply absent,
    this is what a perfect robust rule could reach."""
    server: Literal["none", "fedavgm", "fedadam"] = "none"
    server_momentum: float = 0.9
    downlink_codec: Codec = "float32"


@dataclass(frozen=True)
class NodeData:
    images: Images
    labels: LabelIds


@dataclass(frozen=True)
class Federation:
    """The data and training plan every arm of a comparison shares."""

    nodes: tuple[NodeData, ...]
    held_out: NodeData
    classes: int
    plan: TrainParams
    seed: int


@dataclass
class RoundResult:
    round: int
    accuracy: float
    bytes_up: int
    bytes_down: int
    seconds: float
    participants: int


@dataclass
class ArmResult:
    arm: Arm
    rounds: list[RoundResult] = field(default_factory=list)
    update_bytes: list[int] = field(default_factory=list)
    weights: Weights = field(default_factory=list)
    """The global model after the last round."""

    @property
    def final_accuracy(self) -> float:
        return self.rounds[-1].accuracy if self.rounds else float("nan")

    def rounds_to(self, target: float) -> int | None:
        return next((r.round for r in self.rounds if r.accuracy >= target), None)

    @property
    def bytes_per_update(self) -> float:
        return float(np.mean(self.update_bytes)) if self.update_bytes else 0.0

    @property
    def bytes_per_download(self) -> float:
        downs = [r.bytes_down / max(1, r.participants) for r in self.rounds]
        return float(np.mean(downs)) if downs else 0.0


def _poison(delta: Weights, attack: Attack) -> Weights:
    factor = -10.0 if attack == "scale" else -1.0
    return [np.asarray(factor * d, np.float32) for d in delta]


def _settings(arm: Arm, nodes: int) -> RoundSettings:
    """The aggregator's round settings for the arm's strategy and codec."""
    return RoundSettings(
        codec=arm.codec,
        strategy=arm.strategy,
        clip_norm=arm.clip_norm if arm.strategy == "clipped" else None,
        trim_fraction=arm.trim_fraction,
        byzantine=arm.byzantine or len(arm.attackers) or 1,
        max_devices=nodes,
        server_optimizer=arm.server,
        server_momentum=arm.server_momentum,
    )


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def run_arm(fed: Federation, arm: Arm, rounds: int, progress: Any = None) -> ArmResult:
    """`rounds` rounds of federated training from the same initial model."""
    nodes, seed, plan = fed.nodes[arm.left_out :], fed.seed, fed.plan
    model = face_model.build_model(fed.classes, seed=seed)
    initial = face_model.build_model(fed.classes, seed=seed)
    names = face_model.weight_names(initial)
    specs = face_model.tensor_specs(names, face_model.get_weights(initial))
    weights = face_model.get_weights(initial)
    residuals: dict[int, Weights] = {}
    settings = _settings(arm, len(nodes))
    server = make_optimizer(settings)
    devices = [f"node{index}" for index in range(arm.left_out, len(fed.nodes))]
    result = ArmResult(arm)
    for round_id in range(1, rounds + 1):
        started = time.perf_counter()
        down = messages.build_global(
            site=SITE,
            signer=messages.Signer(messages.AGGREGATOR),
            version=round_id - 1,
            round_id=round_id,
            names=names,
            weights=weights,
            codec=arm.downlink_codec,
        )
        base = messages.parse_global(down, site=SITE, max_bytes=1 << 26, keys=None).weights
        accumulator = make_accumulator(
            settings, [w.shape for w in weights], sparse=arm.codec == "topk"
        )
        bytes_up = 0
        for index, node in enumerate(nodes, start=arm.left_out):
            face_model.set_weights(model, base)
            params = TrainParams(
                plan.epochs,
                plan.batch_size,
                plan.learning_rate,
                plan.prox_mu,
                seed=_seed(seed, round_id, index),
            )
            face_model.train(model, node.images, node.labels, params)
            delta = [t - b for t, b in zip(face_model.get_weights(model), base, strict=True)]
            if index < len(arm.attackers):
                delta = _poison(delta, arm.attackers[index])
            if arm.codec == "topk":
                delta, residuals[index] = with_error_feedback(
                    names, delta, residuals.get(index), arm.density
                )
            payload = messages.build_update(
                site=SITE,
                signer=messages.Signer(f"node{index}"),
                round_id=round_id,
                base_version=round_id - 1,
                num_examples=len(node.images),
                names=names,
                delta=delta,
                codec=arm.codec,
                density=arm.density,
            )
            update = messages.parse_update(
                payload,
                site=SITE,
                device=f"node{index}",
                expected=specs,
                max_bytes=1 << 26,
                keys=None,
            )
            bytes_up += len(payload)
            result.update_bytes.append(len(payload))
            accumulator.add(update.delta, update.num_examples)
        step = next_step(weights, accumulator, devices, server)
        weights, server = step.weights, step.optimizer
        face_model.set_weights(model, weights)
        accuracy = face_model.accuracy(model, fed.held_out.images, fed.held_out.labels)
        result.rounds.append(
            RoundResult(
                round_id,
                accuracy,
                bytes_up,
                len(down) * len(nodes),
                time.perf_counter() - started,
                len(nodes),
            )
        )
        if progress is not None:
            progress(arm, result.rounds[-1])
    result.weights = weights
    return result


def train_central(fed: Federation, epochs: int) -> float:
    """The same model trained on the union of every node's data."""
    model = face_model.build_model(fed.classes, seed=fed.seed)
    images = np.concatenate([n.images for n in fed.nodes])
    labels = np.concatenate([n.labels for n in fed.nodes])
    face_model.train(
        model,
        images,
        labels,
        TrainParams(epochs, fed.plan.batch_size, fed.plan.learning_rate, 0.0, fed.seed),
    )
    return face_model.accuracy(model, fed.held_out.images, fed.held_out.labels)


def train_local_only(fed: Federation, epochs: int) -> list[float]:
    """Each node alone on its own gallery, scored on everyone's held-out faces."""
    model = face_model.build_model(fed.classes, seed=fed.seed)
    initial = face_model.get_weights(model)
    scores = []
    for index, node in enumerate(fed.nodes):
        face_model.set_weights(model, initial)
        face_model.train(
            model,
            node.images,
            node.labels,
            TrainParams(
                epochs,
                fed.plan.batch_size,
                fed.plan.learning_rate,
                0.0,
                _seed(fed.seed, "local", index),
            ),
        )
        scores.append(face_model.accuracy(model, fed.held_out.images, fed.held_out.labels))
    return scores
