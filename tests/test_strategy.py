"""Streaming FedAvg against the batch reference, and its error cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.strategy import (
    InconsistentUpdate,
    RunningFedAvg,
    SparseFedAvg,
    aggregate,
    update_norm,
)

shapes_strategy = st.lists(
    st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=4
)


@settings(max_examples=40, deadline=None)
@given(
    shapes=shapes_strategy,
    weights=st.lists(st.integers(1, 1000), min_size=1, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_streaming_equals_batch_weighted_average(
    shapes: list[tuple[int, ...]], weights: list[int], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    deltas = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in weights]
    running = RunningFedAvg(shapes)
    for delta, examples in zip(deltas, weights, strict=True):
        running.add(delta, examples)
    batch = aggregate(list(zip(deltas, weights, strict=True)))
    by_hand = [
        sum(d[i].astype(np.float64) * w for d, w in zip(deltas, weights, strict=True))
        / sum(weights)
        for i in range(len(shapes))
    ]
    for streamed, reference, exact in zip(running.mean_delta(), batch, by_hand, strict=True):
        np.testing.assert_allclose(streamed, reference, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(streamed, exact, rtol=1e-5, atol=1e-6)
    assert running.total == sum(weights)
    assert running.count == len(weights)


def test_weights_by_number_of_examples() -> None:
    running = RunningFedAvg([(2,)])
    running.add([np.array([1.0, 0.0], dtype=np.float32)], 3)
    running.add([np.array([5.0, 4.0], dtype=np.float32)], 1)
    base = [np.array([10.0, 10.0], dtype=np.float32)]
    np.testing.assert_allclose(running.apply(base)[0], [12.0, 11.0])
    assert running.apply(base)[0].dtype == np.float32


def test_memory_is_one_model_however_many_updates() -> None:
    shapes = [(64, 32), (32,)]
    running = RunningFedAvg(shapes)
    before = [id(a) for a in running.sums]
    rng = np.random.default_rng(0)
    for _ in range(200):
        running.add([rng.normal(size=s).astype(np.float32) for s in shapes], 2)
    # Still exactly one array per tensor, the same ones, updated in place.
    assert [id(a) for a in running.sums] == before
    assert sum(a.nbytes for a in running.sums) == 8 * (64 * 32 + 32)


def test_restored_accumulator_carries_on() -> None:
    rng = np.random.default_rng(1)
    deltas = [[rng.normal(size=(3, 2)).astype(np.float32)] for _ in range(3)]
    whole = RunningFedAvg([(3, 2)])
    for delta in deltas:
        whole.add(delta, 4)
    first = RunningFedAvg([(3, 2)])
    first.add(deltas[0], 4)
    resumed = RunningFedAvg([(3, 2)], [s.copy() for s in first.sums], first.total, first.count)
    resumed.add(deltas[1], 4)
    resumed.add(deltas[2], 4)
    np.testing.assert_allclose(resumed.mean_delta()[0], whole.mean_delta()[0])


@pytest.mark.parametrize(
    "delta",
    [
        [np.zeros((2, 3), dtype=np.float32)],
        [np.zeros((3, 2), dtype=np.float32), np.zeros(2, dtype=np.float32)],
        [np.zeros(6, dtype=np.float32)],
    ],
)
def test_mismatched_shapes_raise_a_named_error(delta: list[np.ndarray]) -> None:
    running = RunningFedAvg([(3, 2)])
    with pytest.raises(InconsistentUpdate):
        running.add(delta, 1)
    assert running.count == 0
    with pytest.raises(InconsistentUpdate):
        aggregate([([np.zeros((3, 2), dtype=np.float32)], 1), (delta, 1)])


def test_no_examples_and_no_updates_are_errors() -> None:
    running = RunningFedAvg([(2,)])
    with pytest.raises(InconsistentUpdate):
        running.add([np.zeros(2, dtype=np.float32)], 0)
    with pytest.raises(InconsistentUpdate):
        running.mean_delta()
    with pytest.raises(InconsistentUpdate):
        aggregate([])


def test_update_norm_spans_all_tensors() -> None:
    assert update_norm(
        [np.array([3.0], dtype=np.float32), np.array([[4.0]], dtype=np.float32)]
    ) == pytest.approx(5.0)


def test_sparse_fedavg_equals_fedavg_on_dense_updates() -> None:
    rng = np.random.default_rng(3)
    shapes = [(3, 4), (4,)]
    updates = [([rng.normal(size=s) for s in shapes], int(n)) for n in (2, 5, 7)]
    sparse = SparseFedAvg(shapes)
    for delta, examples in updates:
        sparse.add(delta, examples)
    for got, want in zip(sparse.mean_delta(), aggregate(updates), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_sparse_fedavg_divides_by_the_geometric_mean_of_senders_and_everyone() -> None:
    sparse = SparseFedAvg([(2,)])
    sparse.add([np.array([4.0, 0.0])], 1)  # only this doorbell sent coordinate 0
    sparse.add([np.array([0.0, 2.0])], 3)  # only this one coordinate 1
    got = sparse.mean_delta()[0]
    np.testing.assert_allclose(got, [4.0 / np.sqrt(1 * 4), 6.0 / np.sqrt(3 * 4)], rtol=1e-6)


def test_sparse_round_survives_a_restart_through_its_saved_arrays() -> None:
    from aggregator.accumulator import make_accumulator, restore
    from aggregator.config import RoundSettings

    settings = RoundSettings(codec="topk")
    shapes = [(2, 2)]
    first = make_accumulator(settings, shapes, sparse=True)
    first.add([np.array([[1.0, 0.0], [0.0, 2.0]])], 2)
    resumed = restore(
        settings, shapes, first.arrays(), total=first.total, count=first.count, sparse=True
    )
    for accumulator in (first, resumed):
        accumulator.add([np.array([[3.0, 0.0], [1.0, 0.0]])], 2)
    np.testing.assert_allclose(resumed.aggregate().delta[0], first.aggregate().delta[0])
