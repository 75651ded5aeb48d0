"""Top-k error feedback on the doorbell: the unsent remainder is sent once, never twice.

The client step is the product's own (`train_delta`, `with_error_feedback`, the
topk codec both ways, the aggregator's `SparseFedAvg` and `next_step`), on
generated features: four people of six photos in the backbone's 256 dimensions.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from aggregator.accumulator import make_accumulator, next_step
from aggregator.config import RoundSettings
from edge.trainer import train_delta
from fedbell.faces.embedding import HEAD_NAMES, TrainParams
from fedbell.wire.codecs import Weights, decode_tensors, encode_tensors
from fedbell.wire.sparsify import with_error_feedback

DENSITY = 0.05
NO_STRANGERS = np.zeros((0, 256), np.float32)
Matrix = npt.NDArray[np.float32]


def _house() -> tuple[Matrix, npt.NDArray[np.int64], Matrix]:
    """Photos of four people (a centre each plus noise) and a random starting head."""
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 6)
    centres = rng.standard_normal((4, 256))
    features = (centres[labels] + 0.8 * rng.standard_normal((len(labels), 256))).astype(np.float32)
    head = (rng.standard_normal((256, 128)) / 16).astype(np.float32)
    return features, labels, head


def _aggregate(head: Matrix, delta: Weights, examples: int) -> Matrix:
    """What the aggregator makes of one doorbell's top-k update (the wire path included)."""
    specs, body = encode_tensors(HEAD_NAMES, delta, "topk", density=DENSITY)
    sent = decode_tensors(specs, body, "topk", "zstd")
    settings = RoundSettings(codec="topk", density=DENSITY)
    accumulator = make_accumulator(settings, [head.shape], sparse=True)
    accumulator.add(sent, examples)
    return next_step([head], accumulator, ["d1"], None).weights[0]


def _topk_rounds(rounds: int) -> tuple[Matrix, Weights]:
    """A lone doorbell's federation in top-k 5 %: the global head and its residual."""
    features, labels, head = _house()
    residual: Weights | None = None
    for round_id in range(rounds):
        params = TrainParams(seed=round_id)
        trained = train_delta([head], features, labels, NO_STRANGERS, params, residual=residual)
        delta, residual = with_error_feedback(HEAD_NAMES, trained.delta, DENSITY)
        head = _aggregate(head, delta, trained.num_examples)
    assert residual is not None
    return head, residual


def test_global_head_plus_residual_is_the_dense_training() -> None:
    """Alone in the federation, a doorbell's head plus its residual is exactly where
    training without compression gets: top-k only delays what reaches the aggregator.
    Adding the residual to a delta trained from the bare global head (the old client
    step) re-counts what local training learns again: 6 rounds end 0.67 away from the
    dense head, which is 0.89 from the start (measured)."""
    rounds = 6
    head, residual = _topk_rounds(rounds)
    features, labels, dense = _house()
    start = dense.copy()
    for round_id in range(rounds):
        trained = train_delta([dense], features, labels, NO_STRANGERS, TrainParams(seed=round_id))
        dense = dense + trained.delta[0]
    virtual = head + residual[0]
    assert np.linalg.norm(head - start) > 0.05  # the sent part did move the global head
    assert np.linalg.norm(virtual - dense) < 1e-3 * np.linalg.norm(dense - start)


def test_residual_of_another_shape_is_ignored() -> None:
    """A residual kept from a head of other shapes (an older lineage) means nothing."""
    features, labels, head = _house()
    plain = train_delta([head], features, labels, NO_STRANGERS, TrainParams())
    stale = [np.ones((128, 64), np.float32)]
    ignored = train_delta([head], features, labels, NO_STRANGERS, TrainParams(), residual=stale)
    np.testing.assert_array_equal(plain.delta[0], ignored.delta[0])
