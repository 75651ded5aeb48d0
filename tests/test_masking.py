"""Fixed point modulo 2^24, the PRG and the round's shared subset (fedbell/wire/masking.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedbell.wire.masking import (
    _SUBSET_LABEL,
    VALUE_BYTES,
    decode_sum,
    encode,
    first_of_order,
    pack,
    prg,
    reduce,
    round_seed,
    seeded_permutation,
    shared_subset,
    split_subset,
    unpack,
)

SCALE = 2.0**12
"""Room for 20 values of magnitude 100 inside +/-2^23."""

finite = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(arrays(np.float32, 16, elements=finite), min_size=1, max_size=20),
    st.integers(0, 2**32 - 1),
)
def test_decoded_sum_of_encodings_is_the_sum_within_rounding(
    vectors: list[np.ndarray], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    total = np.zeros(16, dtype=np.uint32)
    for vector in vectors:
        total += encode(vector, SCALE, rng)
    expected = np.sum(np.asarray(vectors, dtype=np.float64), axis=0)
    # each encoding is within one step of its value: the sum within len(vectors) steps
    assert np.all(np.abs(decode_sum(total, SCALE) - expected) <= len(vectors) / SCALE)


def test_negative_sums_come_back_negative_through_wraparound() -> None:
    rng = np.random.default_rng(0)
    total = encode(np.array([-3.0, 2.0], np.float32), 1.0, rng)
    total += encode(np.array([-1.0, -5.0], np.float32), 1.0, rng)
    assert total.dtype == np.uint32
    assert decode_sum(total, 1.0).tolist() == [-4.0, -3.0]


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(1)
    value = np.full(200_000, 0.3, np.float32)
    mean = decode_sum(encode(value, 1.0, rng), 1.0).mean()
    # standard error of the mean of Bernoulli(0.3) over 200,000 draws is 0.001
    assert abs(mean - 0.3) < 0.01


def test_encode_refuses_values_outside_the_range() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="2\\^23"):
        encode(np.array([9e6], np.float64), 1.0, rng)
    with pytest.raises(ValueError, match="finite"):
        encode(np.array([np.nan], np.float32), 1.0, rng)


def test_prg_is_deterministic_per_seed_and_differs_between_seeds() -> None:
    first = prg(b"seed one", 1000)
    assert first.dtype == np.uint32
    assert first.shape == (1000,)
    assert np.array_equal(first, prg(b"seed one", 1000))
    assert np.array_equal(prg(b"seed one", 10), first[:10])
    assert np.mean(first == prg(b"seed two", 1000)) < 0.01


def test_prg_bytes_look_uniform() -> None:
    counts = np.bincount(prg(b"uniform?", 64_000).view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 255 degrees of freedom: mean 255, p = 1e-6 at ~370
    assert chi2 < 400


def test_shared_subset_is_the_same_everywhere_and_moves_between_rounds() -> None:
    subset = shared_subset(32_768, 0.05, 7, "main")
    assert subset.dtype == np.int64
    assert len(subset) == round(32_768 * 0.05)
    assert np.all(np.diff(subset) > 0)
    assert subset[0] >= 0
    assert subset[-1] < 32_768
    assert np.array_equal(subset, shared_subset(32_768, 0.05, 7, "main"))
    others = [shared_subset(32_768, 0.05, 8, "main"), shared_subset(32_768, 0.05, 7, "other")]
    for other in others:
        overlap = len(np.intersect1d(subset, other)) / len(subset)
        assert overlap < 0.2  # independent draws overlap by ~density = 5 %
    assert len(shared_subset(10, 0.001, 1, None)) == 1
    assert np.array_equal(shared_subset(5, 1.0, 1, None), np.arange(5))


@settings(max_examples=200, deadline=None)
@given(arrays(np.uint64, st.integers(1, 60), elements=st.integers(0, 5)), st.integers(1, 70))
def test_first_of_order_is_the_stable_sorts_first_count(keys: np.ndarray, count: int) -> None:
    """Keys from 0..5 tie often: a tie at the cut goes to the lower index, as sorting does."""
    expected = np.sort(np.argsort(keys, kind="stable")[:count])
    chosen = first_of_order(keys, count)
    assert chosen.dtype == np.int64
    assert np.array_equal(chosen, expected)


def test_shared_subset_is_the_seeded_permutations_first_coordinates() -> None:
    """Selection instead of a sort changed no coordinate of any round's subset."""
    for size, density, round_id in [(32_768, 0.1, 3), (1_000, 0.05, 9), (7, 0.5, 1)]:
        seed = round_seed(_SUBSET_LABEL, round_id, "main")
        count = max(1, round(size * density))
        expected = np.sort(seeded_permutation(seed, size)[:count])
        assert np.array_equal(shared_subset(size, density, round_id, "main"), expected)


def test_split_subset_sends_the_subset_and_keeps_the_rest() -> None:
    delta = np.arange(1, 11, dtype=np.float32)
    subset = np.array([1, 4, 8])
    sent, residual = split_subset(delta, subset)
    assert sent.tolist() == [2.0, 5.0, 9.0]
    assert residual.tolist() == [1, 0, 3, 4, 0, 6, 7, 8, 0, 10]
    rebuilt = residual.copy()
    rebuilt[subset] += sent
    assert np.array_equal(rebuilt, delta)


@settings(max_examples=100, deadline=None)
@given(arrays(np.uint32, st.integers(0, 64), elements=st.integers(0, 2**32 - 1)))
def test_pack_keeps_three_bytes_a_value_and_unpack_gives_them_back(values: np.ndarray) -> None:
    raw = pack(values)
    assert len(raw) == VALUE_BYTES * len(values) == 3 * len(values)
    assert np.array_equal(unpack(raw), reduce(values))


def test_sums_modulo_2_32_reduced_on_the_wire_still_cancel_their_masks() -> None:
    """Why the doorbells may compute in uint32 and send 3 bytes: 2^24 divides 2^32."""
    rng = np.random.default_rng(5)
    values = [encode(rng.normal(0, 1, 32), 1000.0, rng) for _ in range(3)]
    masks = [prg(bytes([i]), 32) for i in range(3)]
    sent = [unpack(pack(v + m)) for v, m in zip(values, masks, strict=True)]
    total = np.sum(sent, axis=0, dtype=np.uint32) - np.sum(masks, axis=0, dtype=np.uint32)
    expected = np.asarray(np.sum(values, axis=0, dtype=np.uint32))
    assert np.allclose(decode_sum(total, 1000.0), decode_sum(expected, 1000.0))


def test_unpack_refuses_a_partial_value() -> None:
    with pytest.raises(ValueError, match="3-byte"):
        unpack(b"\x00" * 7)
