"""THE federated round loop of the benchmarks: the product's client and server steps.

The MQTT simulation (`make demo`) runs every part as its own process; to
compare codecs or strategies over dozens of rounds on two cores, this runs the
same learning in one process. Every step is the product's own:

- selection: `aggregator.rounds.select_devices` (random `max_devices` per
  round, seeded by the round, as the aggregator does);
- down: the round announcement and the release's global-head message
  (`build_global`, signed by the aggregator, with the calibrated threshold),
  parsed by each doorbell with `parse_global` against the aggregator's key;
- client step: `edge.trainer.train_delta` on the house's backbone features,
  labels and strangers; with top-k, error feedback kept per doorbell
  (`fedbell.wire.sparsify.with_error_feedback`), as the edge node keeps it;
- up: `build_update` signed with the doorbell's Ed25519 key, in the round's
  codec, then what the aggregator does with it: `parse_update` (signature,
  specs, values), `Round.check` (round, base, codec, norm) and `Round.accept`
  into the accumulator `make_accumulator` made from the round settings;
- server step: `next_step` (strategy, server optimiser);
- release: the caller's `score` (the aggregator's threshold calibration and
  open-set accuracy on held-out people, see `bench.data`) of the head as the
  doorbells decode it from the global model in the round's downlink codec
  (`aggregator.export.as_received`, what the aggregator scores too), while the
  aggregator keeps the exact float head as the next round's base. With int8
  down, every round quantises the whole head afresh (not the change since the
  last version), so rounding never accumulates across rounds: each doorbell's
  head is within half an int8 step of the aggregator's, and the doorbell's delta
  (trained from that head) is added to the exact one.

Only the broker hop is left out (`bench.scale` measures that separately).
`bench.suite` (codecs side by side), `bench.robust` (poisoned doorbells) and
`bench.openset` can all call `run_arm`, so there is one loop to keep right.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from aggregator.accumulator import (
    SecureSum,
    make_accumulator,
    make_optimizer,
    next_step,
)
from aggregator.config import RoundSettings
from aggregator.export import as_received
from aggregator.rounds import Round, select_devices
from aggregator.secure import mean_delta
from aggregator.secure_rounds import secagg_plan as aggregator_secagg_plan
from aggregator.strategy import InconsistentUpdate
from bench.arms import (
    PRODUCT,
    Arm,
    ArmResult,
    Attack,
    Craft,
    Gate,
    House,
    RoundResult,
    Score,
    Scorer,
    Secure,
    Strategy,
    poison,
    round_settings,
)
from bench.steps import Intake, answer, open_round
from edge.secure import secure_update
from edge.trainer import round_seed, train_delta
from fedbell.errors import RejectedMessage
from fedbell.faces.embedding import AdamMoments, TrainParams, model_names
from fedbell.wire import masking, messages
from fedbell.wire.codecs import Weights
from fedbell.wire.envelope import TensorSpec
from fedbell.wire.protocol import RoundAnnouncement, SecAggPlan, to_json
from fedbell.wire.sparsify import with_error_feedback

__all__ = [  # moved to bench.arms; read here by simulation, bench.privacy* and tests
    "PRODUCT",
    "Arm",
    "ArmResult",
    "Attack",
    "Gate",
    "RoundResult",
    "Score",
    "Scorer",
    "Secure",
    "Strategy",
    "round_settings",
]
SITE = "bench"
LINEAGE = "bench"
MAX_BYTES = 1 << 26
NO_BACKBONE = "0" * 64
"""The backbone hash global models name when the caller gives none."""


def head_specs(head: Sequence[np.ndarray]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(name=n, shape=tuple(int(d) for d in w.shape))
        for n, w in zip(model_names(head), head, strict=True)
    )


@dataclass
class _Keys:
    """Signing keys of the aggregator and every doorbell (None: an unsigned arm)."""

    aggregator: Ed25519PrivateKey | None
    devices: dict[str, Ed25519PrivateKey | None]

    @classmethod
    def make(cls, names: Sequence[str], signed: bool) -> _Keys:
        def key() -> Ed25519PrivateKey | None:
            return Ed25519PrivateKey.generate() if signed else None

        return cls(key(), {name: key() for name in names})

    def trusted_by_devices(self) -> Mapping[str, Ed25519PublicKey] | None:
        if self.aggregator is None:
            return None
        return {messages.AGGREGATOR: self.aggregator.public_key()}

    def trusted_by_aggregator(self) -> Mapping[str, Ed25519PublicKey] | None:
        if self.aggregator is None:
            return None
        return {n: k.public_key() for n, k in self.devices.items() if k is not None}


@dataclass
class DoorbellMemory:
    """What each doorbell keeps between its rounds: the top-k residual (error feedback) and
    its local Adam, which `train_head` continues only when the plan says `adam_moments:
    kept` (`edge.round_training` stores it only then)."""

    residuals: dict[str, Weights] = field(default_factory=dict)
    moments: dict[str, AdamMoments] = field(default_factory=dict)

    def keep_moments(self, device: str, trained: AdamMoments | None) -> None:
        if trained is not None:
            self.moments[device] = trained


def _client_step(  # noqa: PLR0917 - what a doorbell holds in a round
    device: str,
    announcement: RoundAnnouncement,
    house: House,
    model: messages.GlobalModel,
    attack: Sequence[Attack],
    settings: RoundSettings,
    plan: TrainParams,
    kept: DoorbellMemory,
    key: Ed25519PrivateKey | None,
    craft: Craft | None = None,
) -> tuple[bytes, float]:
    """A doorbell's round: `train_delta` from the global model, (a poisoned delta for an
    attacker), top-k error feedback, the signed update envelope; and the seconds the
    doorbell trained."""
    names = model_names(model.weights)
    trained = train_delta(
        model.weights,
        house.features,
        house.labels,
        house.negatives,
        dataclasses.replace(plan, seed=round_seed(device, announcement.round)),
        residual=kept.residuals.get(device) if settings.codec == "topk" else None,
        moments=kept.moments.get(device),
    )
    kept.keep_moments(device, trained.moments)
    delta = trained.delta
    if attack:
        delta = poison(delta, attack[0])
    if craft is not None:
        delta = craft(model.weights, delta)
    if settings.codec == "topk":
        delta, kept.residuals[device] = with_error_feedback(names, delta, settings.density)
    payload = answer(
        announcement,
        site=SITE,
        signer=messages.Signer(device, key),
        num_examples=trained.num_examples,
        names=names,
        delta=delta,
    )
    return payload, trained.seconds


def secagg_plan(secure: Secure, dimension: int, round_id: int, cohort: int) -> SecAggPlan:
    """The round's plan as the aggregator announces it (`aggregator.secure_rounds.secagg_plan`)."""
    return aggregator_secagg_plan(
        round_id=round_id,
        lineage=LINEAGE,
        dimension=dimension,
        cohort=cohort,
        density=secure.density,
        clip_norm=secure.clip_norm,
        noise_multiplier=secure.noise_multiplier,
        min_cohort=secure.min_cohort,
        max_dropout=secure.max_dropout,
    )


def _secure_round(  # noqa: PLR0917 - what a secure round holds
    current: Round,
    secure: Secure,
    round_id: int,
    selected: Sequence[int],
    houses: Sequence[House],
    weights: Weights,
    plan_params: TrainParams,
    kept: DoorbellMemory,
    noise: np.random.Generator,
    result: ArmResult,
    craft: Craft | None = None,
) -> bool:
    """Put the round's unmasked mean in `current` (and the masked values' bytes); False
    when the aggregator's check on the mean refuses the sum (`mean_delta`). Each house's
    training time and its subset's norm before the clip go to `result`.

    `craft`: what the first house masks instead of its clipped subset (a compromised
    doorbell runs its own code: nothing clips its input but the check on the mean)."""
    dimension = sum(int(w.size) for w in weights)
    plan = secagg_plan(secure, dimension, round_id, len(selected))
    indices = masking.shared_subset(dimension, plan.density, round_id, LINEAGE)
    total = np.zeros(plan.size, np.uint32)
    for index in selected:
        device = f"house{index:04d}"
        trained = train_delta(
            weights,
            houses[index].features,
            houses[index].labels,
            houses[index].negatives,
            dataclasses.replace(plan_params, seed=round_seed(device, round_id)),
            residual=kept.residuals.get(device),
            moments=kept.moments.get(device),
        )
        kept.keep_moments(device, trained.moments)
        if craft is not None and index == 0:
            pushed = np.concatenate([d.ravel() for d in craft(weights, trained.delta)])
            total += masking.encode(pushed[indices], plan.scale, noise)
            continue
        update = secure_update(trained.delta, plan, round_id, LINEAGE, noise)
        kept.residuals[device] = update.residual
        result.client_seconds.append(trained.seconds)
        result.update_norms.setdefault(round_id, []).append(update.norm)
        total += update.values  # uint32, kept modulo 2^24 as the masked sum is
    try:
        mean = mean_delta(total, len(selected), plan, indices, [w.shape for w in weights])
    except RejectedMessage:
        return False
    current.accumulator = SecureSum()
    current.accumulator.set_mean(mean, len(selected))
    current.bytes_up = len(masking.pack(total)) * len(selected)
    current.received = [f"house{index:04d}" for index in selected]
    return True


Observer = Callable[[int, Sequence[int], Weights], None]
"""Called after every round with its id, the indices of its houses and the head the
doorbells receive (decoded from the downlink codec): what a reader of the published
models sees."""


def _plain_round(
    current: Round,
    down: bytes,
    *,
    selected: Sequence[str],
    names: Sequence[str],
    houses: Sequence[House],
    arm: Arm,
    settings: RoundSettings,
    specs: tuple[TensorSpec, ...],
    plan: TrainParams,
    kept: DoorbellMemory,
    keys: _Keys,
    craft: Craft | None,
    result: ArmResult,
) -> None:
    """A round without secure aggregation: each selected house's signed update,
    checked and accepted (or refused) as the aggregator's intake does."""
    device_trust = keys.trusted_by_devices()
    trusted = keys.trusted_by_aggregator()
    intake = Intake(SITE, MAX_BYTES, specs, trusted, settings.max_update_norm)
    for device in selected:
        index = names.index(device)
        model = messages.parse_global(
            down, site=SITE, max_bytes=MAX_BYTES, keys=device_trust, expected=specs
        )
        payload, seconds = _client_step(
            device,
            current.announcement,
            houses[index],
            model,
            arm.attackers[index : index + 1],
            settings,
            plan,
            kept,
            keys.devices[device],
            craft if index == 0 else None,
        )
        result.update_bytes.append(len(payload))
        result.client_seconds.append(seconds)
        try:
            intake.take(current, payload, device)
        except (RejectedMessage, InconsistentUpdate):
            result.rejected += 1  # refused, as the aggregator refuses it


def run_arm(
    houses: Sequence[House],
    start: Weights,
    arm: Arm,
    rounds: int,
    score: Scorer,
    *,
    params: TrainParams | None = None,
    houses_per_round: int | None = None,
    backbone: str = NO_BACKBONE,
    evaluate_every: int = 1,
    progress: Callable[[Arm, RoundResult], None] | None = None,
    observe: Observer | None = None,
    gate: Gate | None = None,
    craft: Craft | None = None,
) -> ArmResult:
    """`rounds` rounds from `start`; `score` is called on every `evaluate_every`-th release
    (and the last), its threshold shipped with the next global model.

    `gate(release, published, start)`: True refuses the release as the aggregator's
    accuracy bars do (the round is abandoned, the model and optimiser stay; every
    release is scored). `craft(model, delta)`: what the first house sends instead of
    its trained delta (a hostile doorbell's own attack)."""
    plan = params or TrainParams()
    names = [f"house{index:04d}" for index in range(len(houses))]
    taking_part = names[arm.left_out :]
    per_round = min(houses_per_round or len(taking_part), len(taking_part))
    settings = round_settings(arm, per_round)
    keys = _Keys.make(names, arm.signed)
    weights: Weights = [np.asarray(w, np.float32).copy() for w in start]
    specs = head_specs(weights)
    tensor_names = model_names(weights)
    server = make_optimizer(settings)
    kept = DoorbellMemory()
    noise = np.random.default_rng([plan.seed, 37])

    def release(weights: Weights) -> Score:
        return score(as_received(tensor_names, weights, settings.downlink_codec))

    released = release(weights)
    result = ArmResult(arm, released)
    for round_id in range(1, rounds + 1):
        started = time.perf_counter()
        down = messages.build_global(
            site=SITE,
            signer=messages.Signer(messages.AGGREGATOR, keys.aggregator),
            version=round_id - 1,
            round_id=round_id - 1,
            names=tensor_names,
            weights=weights,
            lineage=LINEAGE,
            threshold=released.threshold,
            backbone=backbone,
            codec=settings.downlink_codec,
        )
        selected = select_devices(taking_part, None, settings.max_devices, settings.seed, round_id)
        accumulator = make_accumulator(
            settings, [w.shape for w in weights], sparse=settings.codec == "topk"
        )
        current = open_round(settings, round_id, selected, accumulator, lineage=LINEAGE)
        opened = len(to_json(current.announcement))
        if arm.secure is not None:
            if not _secure_round(
                current,
                arm.secure,
                round_id,
                [names.index(d) for d in selected],
                houses,
                weights,
                plan,
                kept,
                noise,
                result,
                craft,
            ):  # the mean's check refused the sum: the round is abandoned
                result.abandoned += 1
                continue
        else:
            _plain_round(
                current,
                down,
                selected=selected,
                names=names,
                houses=houses,
                arm=arm,
                settings=settings,
                specs=specs,
                plan=plan,
                kept=kept,
                keys=keys,
                craft=craft,
                result=result,
            )
        if current.accumulator.count == 0:  # nothing accepted: the aggregator abandons it
            continue
        step = next_step(weights, current.accumulator, current.received, server)
        if gate is not None:
            candidate = release(step.weights)
            if gate(candidate, released, result.start):
                result.abandoned += 1
                continue
            released = candidate
        weights, server = step.weights, step.optimizer
        if observe is not None:
            observe(
                round_id,
                [names.index(d) for d in selected],
                as_received(tensor_names, weights, settings.downlink_codec),
            )
        closed = len(to_json(current.set_phase("closed")))
        per_node = opened + closed + len(down)
        result.down_bytes.extend([per_node] * len(selected))
        seconds = time.perf_counter() - started
        if round_id % evaluate_every == 0 or round_id == rounds:
            released = release(weights)
            result.rounds.append(
                RoundResult(
                    round_id,
                    released.open_set_accuracy,
                    released.threshold,
                    released.tar_at_far_1pct,
                    current.bytes_up,
                    per_node * len(selected),
                    seconds,
                    len(selected),
                )
            )
            if progress is not None:
                progress(arm, result.rounds[-1])
    result.weights = weights
    return result
