"""The doorbell's side of a secure round: its client step and its part in each phase.

`secure_update` is the client step every caller shares (the doorbell below, the
benchmarks): the trained delta, flattened, cut to the round's shared subset
(the same coordinates on every doorbell, so masks still cancel), clipped to the
plan's norm and noised (`fedbell.wire.dp.privatize`: clipping happens here,
since the aggregator never sees one update), encoded fixed point modulo 2^32.
Nothing stays on the doorbell: the aggregator scales the round's mean by
dimension / size (`aggregator.secure.mean_delta`), so over rounds the head
moves as by the whole mean delta (random-k sparsification made unbiased), and
keeping the unsent remainder as error feedback as well would count it twice.
Measured in process (`bench.federated`, LFW houses under doorbell conditions,
seed 0, open-set accuracy from 0.791): 202 houses, 20 a round, 60 rounds:
rescaled 0.826, top-k 5 % with error feedback (plain rounds) 0.794, the subset
with error feedback instead of rescaling 0.791 (no learning: a house is
selected again only every ~10 rounds, so its remainder mostly never leaves);
10 houses every round, 30 rounds: rescaled 0.800, top-k 0.797, error feedback
0.777.

`SecureParticipant` walks one doorbell through a round's phases, each step run
on the node's worker thread in announcement order:

    keys    advertise signed keys (before training, so the phase ends quickly),
            then train and prepare the masked-ready update
    shares  encrypt seed shares for the roster's neighbours
    send    read the inbox (the neighbours' shares), publish the masked update
    unmask  answer the aggregator's request for the survivors' and dropped seeds

The noise and the fixed-point rounding draw from the operating system's
entropy: a seed anyone could derive (device and round) would let them
subtract the noise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedbell.errors import RejectedMessage
from fedbell.wire import dp, masking
from fedbell.wire.codecs import Weights
from fedbell.wire.protocol import RoundAnnouncement, SecAggPlan
from fedbell.wire.secagg import SecAggClient
from fedbell.wire.topics import SecAggLeaf, Topics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureUpdate:
    """What a doorbell masks and sends in a secure round, and what it keeps."""

    values: npt.NDArray[np.uint32]
    """The round's subset of the delta, clipped, noised and encoded (plan.size entries)."""
    residual: Weights
    """What stays on the doorbell for the next round: nothing (zeros of the delta's shapes;
    see the module docstring), so a caller's earlier top-k residual is not carried on."""
    norm: float
    """L2 norm of the subset before clipping (a doorbell's own diagnostics)."""


def secure_update(
    delta: Sequence[npt.NDArray[np.float32]],
    plan: SecAggPlan,
    round_id: int,
    lineage: str | None,
    rng: np.random.Generator,
) -> SecureUpdate:
    """The client step of a secure round (see the module docstring); ValueError if the
    delta does not fit the plan (another head, or a subset of another size)."""
    flat = np.concatenate([np.asarray(d, np.float32).ravel() for d in delta])
    if flat.size != plan.dimension:
        raise ValueError(f"the delta has {flat.size} coordinates, the plan {plan.dimension}")
    subset = masking.shared_subset(plan.dimension, plan.density, round_id, lineage)
    if len(subset) != plan.size:
        raise ValueError(f"the round's subset has {len(subset)} coordinates, the plan {plan.size}")
    sent = flat[subset]
    norm = float(np.linalg.norm(sent.astype(np.float64)))
    noised = dp.privatize(sent, plan.clip_norm, plan.noise_std, rng)
    values = masking.encode(noised, plan.scale, rng)
    residual = [np.zeros(np.shape(tensor), np.float32) for tensor in delta]
    return SecureUpdate(values=values, residual=residual, norm=norm)


def _carried(text: str | None, what: str, round_id: int) -> bytes:
    """A secure-aggregation message the plan carries as JSON text (the library parses it)."""
    if text is None:
        raise RejectedMessage("bad_secagg_plan", f"round {round_id}: the {what} is missing")
    return text.encode()


Publish = Callable[[str, bytes], None]
Sent = Callable[[int, Weights | None], None]


@dataclass
class _Round:
    number: int
    client: SecAggClient
    update: SecureUpdate | None = None
    calibration: bool = False
    """The update is a calibration round's histograms: the error-feedback residual stays."""
    done: tuple[str, ...] = ()
    """Phases this doorbell has answered (a republished announcement is not answered twice)."""


@dataclass(eq=False)
class SecureParticipant:
    """One doorbell's part in secure rounds (one at a time); the node calls it from its
    worker thread, except `on_inbox` (paho's thread)."""

    device: str
    topics: Topics
    identity: Ed25519PrivateKey | None
    publish: Publish
    on_sent: Sent
    _round: _Round | None = field(default=None, init=False)
    _inbox: threading.Condition = field(default_factory=threading.Condition, init=False)
    _inbox_payload: bytes | None = field(default=None, init=False)

    @property
    def round(self) -> int | None:
        current = self._round
        return None if current is None else current.number

    @property
    def update(self) -> SecureUpdate | None:
        """The current round's masked-ready update (None before `prepare`): a benchmark
        checks the unmasked sum against what its doorbells masked."""
        current = self._round
        return None if current is None else current.update

    def begin(self, announcement: RoundAnnouncement) -> None:
        """Keys phase: a fresh client for the round; publish its signed key advert."""
        plan = announcement.secagg
        assert plan is not None
        params = plan.params(announcement.round, announcement.lineage)
        client = SecAggClient(self.device, params, self.identity)
        with self._inbox:  # a retained inbox of an earlier round is not this round's
            self._inbox_payload = None
        self._round = _Round(announcement.round, client, done=("keys",))
        self._publish("keys", client.advertise())

    def prepare(self, announcement: RoundAnnouncement, delta: Weights) -> None:
        """After training: the masked-ready update (secure_update) for the send phase."""
        plan, current = announcement.secagg, self._round
        assert plan is not None
        if current is None or current.number != announcement.round:
            return  # the round ended (abandoned) while this doorbell trained
        current.update = secure_update(
            delta, plan, announcement.round, announcement.lineage, np.random.default_rng()
        )

    def prepare_calibration(self, announcement: RoundAnnouncement, vector: np.ndarray) -> None:
        """After scoring: a calibration round's histograms (fedbell/faces/histograms.py), the
        round's whole vector (density 1), clipped, noised and encoded as an update is."""
        plan, current = announcement.secagg, self._round
        assert plan is not None
        if current is None or current.number != announcement.round:
            return
        update = secure_update(
            [np.asarray(vector, np.float32)],
            plan,
            announcement.round,
            announcement.lineage,
            np.random.default_rng(),
        )
        current.update, current.calibration = update, True

    def step(self, announcement: RoundAnnouncement) -> None:
        """Shares, send or unmask phase: this doorbell's answer, once per phase."""
        current, plan = self._round, announcement.secagg
        assert plan is not None
        if current is None or current.number != announcement.round or current.update is None:
            log.info("round %d (%s): not taking part", announcement.round, announcement.phase)
            return
        phase = announcement.phase
        if phase in current.done:
            return
        current.done = (*current.done, phase)
        try:
            self._answer(current, announcement, plan)
        except RejectedMessage:
            self._round = None  # refused (e.g. left out of the roster): out of this round
            raise

    def _answer(self, current: _Round, announcement: RoundAnnouncement, plan: SecAggPlan) -> None:
        phase = announcement.phase
        assert current.update is not None
        if phase == "shares":
            roster = _carried(plan.roster, "roster", current.number)
            self._publish("shares", current.client.share(roster))
        elif phase == "send":
            if self.device not in plan.holders:
                raise RejectedMessage(
                    "secagg_not_holder",
                    f"round {current.number}: the aggregator has no shares "
                    "of this doorbell, so it cannot mask",
                )
            inbox = self._wait_for_inbox(current, announcement.deadline)
            current.client.receive(inbox, plan.holders)
            self._publish("masked", current.client.masked_input(current.update.values))
            self.on_sent(current.number, None if current.calibration else current.update.residual)
        elif phase == "unmask":
            if self.device not in plan.survivors:
                log.info("round %d: dropped from the sum; nothing to unmask", current.number)
                return
            request = _carried(plan.unmask_request, "unmask request", current.number)
            self._publish("unmask", current.client.unmask(request))

    def end(self, number: int) -> None:
        """The round closed or was abandoned: forget its keys and update."""
        if self._round is not None and self._round.number == number:
            self._round = None

    def on_inbox(self, payload: bytes) -> None:
        """The aggregator routed this doorbell's shares from the others (paho's thread)."""
        with self._inbox:
            self._inbox_payload = payload
            self._inbox.notify_all()

    def _wait_for_inbox(self, current: _Round, deadline: float) -> bytes:
        """The inbox of this round: published before the send phase, so it is normally
        here (an earlier round's retained inbox was dropped by `begin`)."""
        with self._inbox:
            while self._inbox_payload is None:
                left = deadline - time.time()
                if left <= 0:
                    raise RejectedMessage(
                        "no_inbox", f"round {current.number}: no shares arrived before the deadline"
                    )
                self._inbox.wait(min(left, 1.0))
            payload, self._inbox_payload = self._inbox_payload, None
            return payload

    def _publish(self, leaf: SecAggLeaf, payload: bytes) -> None:
        self.publish(self.topics.secagg(leaf, self.device), payload)
        log.info("secure round: %s sent (%d bytes)", leaf, len(payload))
