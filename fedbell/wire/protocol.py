"""The JSON messages of the federation: commands, rounds, statuses, metrics.

Each is a strict pydantic model; `parse_json` turns any payload into one or a
RejectedMessage saying which field was wrong.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fedbell.errors import RejectedMessage
from fedbell.wire import safejson
from fedbell.wire.codecs import DEFAULT_DENSITY, Weights, decode_tensors, encode_tensors
from fedbell.wire.envelope import Codec, TensorSpec
from fedbell.wire.secagg_params import SecAggParams

MAX_JSON_BYTES = 64 * 1024
MAX_ROUND_BYTES = 1024 * 1024
"""A secure round's announcement carries its roster (every selected doorbell's name and
signed key advert, ~200 bytes each) in the shares phase: room for about 5,000."""


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Command(Message):
    """What an operator publishes on the control topic.

    start_round: a whole round (announce, collect, aggregate, publish).
    auto: `rounds` rounds back to back. stop: end auto mode after this round.
    The demo's four buttons, one step each: train (announce; nodes train and
    hold their update), send (nodes publish held updates), aggregate, publish.
    """

    cmd: Literal["start_round", "auto", "stop", "train", "send", "aggregate", "publish"]
    rounds: int = Field(default=1, ge=1, le=100_000)
    devices: tuple[str, ...] | None = Field(
        default=None, description="Only these devices; default: every online device."
    )


class TrainingPlan(Message):
    """Local training hyper-parameters of a round. The defaults are the client step's own
    (fedbell/faces/embedding.py TrainParams, chosen by make bench-openset), written out
    here because the contract does not import the face model; tests/test_layers.py
    checks that the two agree."""

    epochs: int = Field(default=10, ge=1, le=100)
    batch_size: int = Field(default=32, ge=1, le=1024)
    learning_rate: float = Field(default=1e-4, gt=0, le=1)
    optimizer: Literal["adam", "sgd"] = Field(
        default="adam",
        description="The local step: adam (Adam on the doorbell) or sgd (plain steps, "
        "for a server optimiser that keeps the moments: fedadam).",
    )
    adam_moments: Literal["fresh", "kept"] = Field(
        default="kept",
        description="adam: each doorbell continues its Adam from its last round of the "
        "lineage (kept: its moments stay on the doorbell, never sent), or starts a fresh one "
        "every round.",
    )
    prox_mu: float = Field(default=0.0, ge=0, le=10, description="FedProx proximal weight.")
    hold_out_strangers: bool = Field(
        default=False,
        description="The federation calibrates on the doorbells' stranger stores: train "
        "against only the half of the store that does not calibrate, so the strangers that "
        "set the threshold are ones no head was trained to push away.",
    )


Phase = Literal["train", "send", "closed", "abandoned", "keys", "shares", "unmask"]
"""A plain round: train (-> send in step-by-step mode) -> closed or abandoned. A secure
round (the announcement carries `secagg`): keys -> shares -> send -> unmask -> closed, or
abandoned from any phase that ends with fewer than `secagg.min_cohort` doorbells."""


class SecAggPlan(Message):
    """How a secure round is run: what every selected doorbell needs to mask its update.

    The update is the round's shared subset of the flat head (`density` of its `dimension`
    coordinates, chosen by the round id and lineage, the same on every doorbell), clipped
    to `clip_norm` and noised with `noise_std` on the doorbell, encoded fixed point
    (`scale`) modulo 2^32 and masked; the aggregator only ever unmasks the sum of at least
    `min_cohort` doorbells.
    """

    min_cohort: int = Field(ge=2, description="Fewest doorbells whose sum may be unmasked.")
    neighbours: int = Field(ge=1, description="Doorbells each one agrees masks with (SecAgg+).")
    threshold: int = Field(ge=1, description="Shares needed to rebuild a dropped seed.")
    scale: float = Field(gt=0, description="Fixed-point scale of the encoded update.")
    dimension: int = Field(ge=1, description="Coordinates of the flat head (the delta).")
    size: int = Field(ge=1, description="Coordinates each doorbell masks and sends.")
    density: float = Field(gt=0, le=1, description="size / dimension.")
    clip_norm: float = Field(gt=0, description="L2 norm each doorbell clips its update to.")
    noise_std: float = Field(ge=0, description="Gaussian noise each doorbell adds (per entry).")
    roster: str | None = Field(
        default=None,
        max_length=MAX_ROUND_BYTES,
        description="Shares phase: the roster, the selected doorbells' signed key adverts (a "
        "fedbell.wire.secagg_messages.Roster, as JSON text).",
    )
    holders: tuple[str, ...] = Field(
        default=(),
        description="Send phase: the doorbells whose shares arrived (they mask), sorted; "
        "each doorbell checks its inbox against it.",
    )
    survivors: tuple[str, ...] = Field(
        default=(), description="Unmask phase: the doorbells whose masked update arrived."
    )
    dropped: tuple[str, ...] = Field(
        default=(), description="Unmask phase: the doorbells whose masks are rebuilt from shares."
    )
    unmask_request: str | None = Field(
        default=None,
        max_length=MAX_ROUND_BYTES,
        description="Unmask phase: what the aggregator asks each survivor to reveal (a "
        "fedbell.wire.secagg_messages.UnmaskRequest, as JSON text).",
    )

    def params(self, round_id: int, lineage: str | None) -> SecAggParams:
        """The masking library's parameters of this round (the same on every party)."""
        return SecAggParams(
            round_id=round_id,
            lineage=lineage,
            min_cohort=self.min_cohort,
            neighbours=self.neighbours,
            share_threshold=self.threshold,
            scale=self.scale,
            size=self.size,
        )


class CalibrationPlan(Message):
    """A calibration round (federated calibration, fedbell/faces/histograms.py): the heads
    each selected doorbell scores on its stranger store and its gallery instead of training.

    Both are the head as doorbells would hold it (the global model's downlink codec) and
    are covered by the announcement's signature. Nothing is trained and nothing is
    installed: the masked vector the doorbell sends is its score histograms.
    """

    codec: Codec = Field(description="How the heads are encoded (the downlink codec).")
    candidate: str | None = Field(
        default=None,
        max_length=MAX_ROUND_BYTES // 4,
        description="The head to calibrate: a round's unpublished result (base64, zstd); in "
        "the keys phase only (~40 kB as int8), when the doorbells score it.",
    )
    start: str | None = Field(
        default=None,
        max_length=MAX_ROUND_BYTES // 4,
        description="The lineage's start head (version 0), the gate's reference (base64, zstd); "
        "in the keys phase only.",
    )

    @classmethod
    def of(
        cls,
        names: Sequence[str],
        candidate: Sequence[np.ndarray],
        start: Sequence[np.ndarray],
        codec: Codec,
    ) -> CalibrationPlan:
        def encoded(weights: Sequence[np.ndarray]) -> str:
            return base64.b64encode(encode_tensors(names, weights, codec)[1]).decode()

        return cls(codec=codec, candidate=encoded(candidate), start=encoded(start))

    def heads(self, specs: Sequence[TensorSpec]) -> tuple[Weights, Weights]:
        """(candidate, start) decoded with the installed head's tensor specs; RejectedMessage
        if either is not base64 or does not decode to those tensors."""

        def decoded(text: str | None, what: str) -> Weights:
            if text is None:
                raise RejectedMessage("bad_calibration_plan", f"the {what} is missing")
            try:
                body = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise RejectedMessage("bad_calibration_plan", f"the {what} is not base64") from None
            return decode_tensors(specs, body, self.codec, "zstd")

        return decoded(self.candidate, "candidate head"), decoded(self.start, "start head")


class RoundAnnouncement(Message):
    """The retained round message: what every node needs to take part."""

    round: int = Field(ge=1)
    base_version: int = Field(ge=0)
    lineage: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",  # Rust regex (pydantic): $ is the very end
        description="Lineage of the base model: a doorbell trains only from that model.",
    )
    phase: Phase
    selected: tuple[str, ...]
    deadline: float = Field(description="Unix time after which updates are not accepted.")
    codec: Codec
    density: float = Field(
        default=DEFAULT_DENSITY, gt=0, le=1, description="Share of each tensor a topk update sends."
    )
    train: TrainingPlan
    secagg: SecAggPlan | None = Field(
        default=None, description="Set on a secure-aggregation round (phases keys to unmask)."
    )
    calibrate: CalibrationPlan | None = Field(
        default=None,
        description="Set on a calibration round (a secure round): the doorbells score these "
        "heads on their strangers and galleries and mask the histograms instead of an update.",
    )
    send_when_trained: bool = Field(
        default=True, description="False in step-by-step mode: wait for the send phase."
    )
    signature: str | None = Field(
        default=None,
        max_length=200,
        description="The aggregator's Ed25519 signature over every other field and the site "
        "(fedbell.wire.signing.sign_announcement); doorbells that trust a key require it.",
    )


class DeviceStatus(Message):
    """A device's retained status (its last will says offline)."""

    state: Literal["online", "offline"]
    model_version: int | None = None
    gallery_size: int = Field(default=0, ge=0)
    last_round: int = Field(default=0, ge=0)
    detail: str = ""
    rejected: dict[str, int] = Field(
        default_factory=dict,
        description="The aggregator's: messages refused since it started, by reason "
        "(rejected updates get no reply, only these counts and the round's metrics).",
    )


Outcome = Literal["published", "aggregated", "abandoned"]

HISTORY_ROUNDS = 100
"""Earlier rounds a metrics message carries (about 100 bytes each)."""


class RoundSummary(Message):
    """One earlier round, as a metrics message's history keeps it."""

    round: int
    version: int
    outcome: Outcome
    participants: int
    accuracy: float | None = None
    bytes_up: int
    bytes_down: int


class RoundMetrics(Message):
    round: int
    version: int = Field(description="Global model version the round produced (0: none).")
    outcome: Outcome
    participants: int
    examples: int
    accuracy: float | None = None
    threshold: float | None = None
    bytes_up: int
    bytes_down: int
    seconds: float
    rejected: dict[str, int] = Field(default_factory=dict)
    dropped: list[str] = Field(
        default_factory=list,
        description="Doorbells whose accepted update the strategy left out (multi_krum), or "
        "a secure round's doorbells that masked nothing or dropped after masking.",
    )
    secure: bool = Field(default=False, description="Secure aggregation: only the sum was seen.")
    epsilon: float | None = Field(
        default=None,
        description="House-level differential privacy: epsilon of this round alone "
        "(at delta = 1/houses); None without noise.",
    )
    epsilon_total: float | None = Field(
        default=None, description="Epsilon spent by every noised round so far, this one included."
    )
    detail: str = Field(
        default="",
        description="Why an abandoned round was abandoned; for a federated calibration, what "
        "the doorbells' histograms measured.",
    )
    history: list[RoundSummary] = Field(
        default_factory=list,
        max_length=HISTORY_ROUNDS,
        description="The lineage's earlier rounds, oldest first, at most HISTORY_ROUNDS: "
        "retained with the metrics, so a console opened now plots them at once.",
    )

    def summary(self) -> RoundSummary:
        return RoundSummary.model_validate(self.model_dump(include=set(RoundSummary.model_fields)))


class Reply(Message):
    """What the aggregator answers on the reply topic, so an operator can read it.

    One per command (carried out, or refused and why: `round_in_progress`,
    `bad_state`, `bad_json`...) and one per update it received (accepted, or the
    rejection reason), so a console can show each doorbell's last update.
    """

    about: Literal["command", "update", "secagg"]
    ok: bool
    time: float = Field(description="Unix time the aggregator handled it.")
    cmd: str | None = Field(default=None, description="The command (None if unreadable).")
    device: str | None = Field(default=None, description="Who sent the update (or secagg message).")
    round: int | None = None
    size: int | None = Field(default=None, ge=0, description="Payload bytes of the update.")
    reason: str = Field(default="", description="Why it was refused (a rejection reason).")
    detail: str = Field(default="", description="What was done, or what exactly was wrong.")


M = TypeVar("M", bound=Message)


def parse_json(payload: bytes, model: type[M], max_bytes: int = MAX_JSON_BYTES) -> M:
    safejson.check_shape(payload, max_bytes=max_bytes)  # size and depth, before parsing
    try:
        return model.model_validate_json(payload)
    except ValidationError as err:
        raise RejectedMessage("bad_json", f"{model.__name__}: {validation_problems(err)}") from None


def validation_problems(err: ValidationError) -> str:
    """The first five fields pydantic refused, each `field.path: why`, for a rejection detail."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in err.errors()[:5]
    )


def to_json(message: Message) -> bytes:
    return message.model_dump_json().encode()
