"""What each reader of a round sees, made with the product's own steps (issue 22).

- one house's update: `edge.trainer.train_delta` from the public base head
  (version 0, dlib's projection), the product's default `TrainParams`;
- as sent: that delta through `messages.build_update` in a codec and back
  through `messages.parse_update` (what the aggregator or the broker decodes);
- with secure aggregation: each doorbell's `edge.secure.secure_update` (the
  round's shared subset, clipped, noised, fixed point) masked by a real
  `SecAggClient` after the key and share phases with a `SecAggServer`; the
  attacker decodes one house's masked values as if they were an update;
- a round's sum: what the aggregator unmasks, turned into the round's mean by
  `aggregator.secure.mean_delta` (or, for comparison, the dense float32 sum of
  the raw deltas: what secure aggregation without the shared subset would show).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from aggregator.secure import mean_delta
from bench.federated import Secure, head_specs, secagg_plan
from bench.households import House
from bench.privacy_attacks import Matrix
from edge.secure import secure_update
from edge.trainer import round_seed, train_delta
from fedbell.faces.embedding import HEAD_NAMES, TrainParams
from fedbell.wire import masking, messages
from fedbell.wire.codecs import Weights
from fedbell.wire.envelope import Codec
from fedbell.wire.protocol import SecAggPlan
from fedbell.wire.secagg import SecAggClient, SecAggServer
from fedbell.wire.secagg_messages import Masked, parse, unb64

SITE = "privacy-bench"
LINEAGE = "bench"
MAX_BYTES = 1 << 26
ROUND = 1


def update_of(house: House, base: Weights, name: str, params: TrainParams) -> Weights:
    """The doorbell's client step from `base` (no residual: its first round)."""
    seeded = dataclasses.replace(params, seed=round_seed(name, ROUND))
    return train_delta(base, house.features, house.labels, house.negatives, seeded).delta


def as_sent(delta: Weights, codec: Codec, density: float) -> tuple[Matrix, int]:
    """(the delta as the aggregator decodes it from the wire, the payload's bytes)."""
    payload = messages.build_update(
        site=SITE,
        signer=messages.Signer("doorbell", None),
        round_id=ROUND,
        base_version=0,
        num_examples=1,
        names=HEAD_NAMES,
        delta=delta,
        codec=codec,
        density=density,
    )
    update = messages.parse_update(
        payload,
        site=SITE,
        device="doorbell",
        expected=head_specs(delta),
        max_bytes=MAX_BYTES,
        keys=None,
    )
    return np.asarray(update.delta[0], np.float32), len(payload)


def _scatter(values: np.ndarray, plan: SecAggPlan, shape: tuple[int, ...]) -> Matrix:
    flat = np.zeros(plan.dimension, np.float64)
    flat[masking.shared_subset(plan.dimension, plan.density, ROUND, LINEAGE)] = values
    return np.asarray(flat.reshape(shape), np.float32)


def _plan(secure: Secure, delta: Weights, cohort: int) -> SecAggPlan:
    return secagg_plan(secure, sum(int(d.size) for d in delta), ROUND, cohort)


def round_mean(deltas: Sequence[Weights], secure: Secure, rng: np.random.Generator) -> Matrix:
    """What the aggregator unmasks from a secure round of these updates, as its mean."""
    plan = _plan(secure, deltas[0], len(deltas))
    total = np.zeros(plan.size, np.uint32)
    for delta in deltas:
        total += secure_update(delta, plan, ROUND, LINEAGE, rng).values
    indices = masking.shared_subset(plan.dimension, plan.density, ROUND, LINEAGE)
    mean = mean_delta(total, len(deltas), plan, indices, [d.shape for d in deltas[0]])
    return np.asarray(mean[0], np.float32)


def dense_sum(deltas: Sequence[Weights]) -> Matrix:
    """The float32 sum of the raw deltas (secure aggregation of whole, unclipped updates)."""
    return np.asarray(np.sum([d[0] for d in deltas], axis=0), np.float32)


@dataclass(frozen=True)
class MaskedRound:
    views: list[Matrix]
    """Each house's masked input, decoded by the attacker as if it were an update."""
    bytes_up: int
    """Per doorbell: key advert, encrypted shares, masked input and unmask reply."""
    bytes_down: int
    """Per doorbell: roster, its inbox of shares and the unmask request."""


def masked_round(
    deltas: Sequence[Weights], secure: Secure, rng: np.random.Generator
) -> MaskedRound:
    """A whole secure round with real key agreement and masks; what the aggregator (and
    whoever runs the broker) holds of each house is its masked input. The unmasked sum
    is checked against the plain sum of the encoded updates, so the masks are real."""
    plan = _plan(secure, deltas[0], len(deltas))
    params = plan.params(ROUND, LINEAGE)
    names = [f"house{i:04d}" for i in range(len(deltas))]
    encoded = {
        n: secure_update(d, plan, ROUND, LINEAGE, rng).values
        for n, d in zip(names, deltas, strict=True)
    }
    server = SecAggServer(params, None, names)
    clients = {n: SecAggClient(n, params, None) for n in names}
    up = dict.fromkeys(names, 0)
    down = dict.fromkeys(names, 0)
    for name, client in clients.items():
        advert = client.advertise()
        up[name] += len(advert)
        server.add_advert(name, advert)

    def exchange(
        request: bytes,
        answer: Callable[[SecAggClient, bytes], bytes],
        collect: Callable[[str, bytes], None],
    ) -> None:
        """Every doorbell downloads the same `request` and uploads its answer to it."""
        for name, client in clients.items():
            down[name] += len(request)
            reply = answer(client, request)
            up[name] += len(reply)
            collect(name, reply)

    exchange(server.roster(), SecAggClient.share, server.add_shares)
    masked = {}
    for name, client in clients.items():
        inbox = server.inbox(name)
        # the holders come in the send announcement, which every doorbell downloads too
        down[name] += len(inbox) + len(json.dumps(server.holders))
        client.receive(inbox, server.holders)
    for name, client in clients.items():
        masked[name] = client.masked_input(encoded[name])
        up[name] += len(masked[name])
        server.add_masked(name, masked[name])
    exchange(server.unmask_request(), SecAggClient.unmask, server.add_unmask)
    total, _ = server.result()
    expected = masking.reduce(np.sum(list(encoded.values()), axis=0, dtype=np.uint32))
    if not np.array_equal(total, expected):
        raise AssertionError("the unmasked sum is not the sum of the encoded updates")
    views = []
    for name in names:
        message = parse(masked[name], Masked, MAX_BYTES)
        values = masking.unpack(unb64(message.values, masking.VALUE_BYTES * plan.size, "values"))
        views.append(_scatter(masking.decode_sum(values, plan.scale), plan, deltas[0][0].shape))
    return MaskedRound(views, int(np.mean(list(up.values()))), int(np.mean(list(down.values()))))
