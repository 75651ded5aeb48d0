"""Fixed-point vectors modulo 2^24, the PRG that masks them, and the round's shared subset.

Secure aggregation adds random masks to each doorbell's update and relies on them
cancelling in the sum, which only works exactly in modular integer arithmetic:
floats are encoded to fixed point (`encode`), wrapped in numpy uint32 (every add is
modulo 2^32), and only the sum is decoded (`decode_sum`, two's complement, so a sum
in [-2^23, 2^23) comes back with its sign).

The wire carries each masked value in 3 bytes (`pack`), i.e. modulo 2^24: since 2^24
divides 2^32, arithmetic modulo 2^32 reduced modulo 2^24 is arithmetic modulo 2^24,
so the doorbells and the aggregator compute in uint32 and only the packing and the
decoding drop the top byte, and a uniform uint32 mask stays uniform modulo 2^24.
24 bits rather than 32 let the round's shared subset be twice as dense for the same
upload (measured in `make bench-privacy`: a 10 % subset costs secure rounds 0.8
points of open-set accuracy against plain top-k at 100 houses per round, a 5 %
subset 1.7), and at 1,000 doorbells clipped at norm 1 a value still resolves 1.2e-4
per doorbell, with stochastic rounding keeping the sum unbiased.

Compression has to survive masking: per-doorbell top-k does not (each house keeps
different coordinates, and which ones is itself a leak), so every doorbell sends
the same round-seeded random subset of coordinates (`shared_subset`), dense over
that subset; what is not sent stays on the doorbell as error feedback
(`split_subset` returns it), as top-k's residual does (fedbell/wire/sparsify.py).
"""

from __future__ import annotations

import hashlib

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

MODULUS_BITS = 24
"""What a masked value means: an integer modulo 2^24; the decoded sum must lie in [-2^23, 2^23)."""
VALUE_BYTES = MODULUS_BITS // 8
"""Bytes one masked value takes on the wire."""
_HALF = 2 ** (MODULUS_BITS - 1)
_LOW_BITS = np.uint32(2**MODULUS_BITS - 1)
_PRG_LABEL = b"fedbell secagg prg v1"
_SUBSET_LABEL = b"fedbell secagg subset v1"
_ZERO_NONCE = bytes(16)


def encode(vector: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """`vector * scale` stochastically rounded to integers, as uint32 (meaning: modulo 2^24).

    Stochastic rounding (up with probability equal to the fraction) makes each
    coordinate an unbiased estimate of `vector * scale`, so rounding adds noise
    of variance at most 1/4 per doorbell instead of a bias that grows with the
    number of doorbells. A value whose scaled magnitude reaches 2^31 cannot be
    represented and is refused (ValueError): pick `scale` with
    fedbell.wire.secagg_params.default_scale, which leaves room for the whole sum.
    """
    scaled = np.asarray(vector, dtype=np.float64).ravel() * scale
    if not np.all(np.isfinite(scaled)) or np.any(np.abs(scaled) >= _HALF - 1):
        limit = f"+/-2^{MODULUS_BITS - 1}"
        raise ValueError(f"values times scale {scale} must be finite and within {limit}")
    floor = np.floor(scaled)
    rounded = floor + (rng.random(scaled.shape) < scaled - floor)
    return rounded.astype(np.int64).astype(np.uint32)


def decode_sum(total: npt.ArrayLike, scale: float) -> np.ndarray:
    """The float64 sum a uint32 total stands for modulo 2^24 (two's complement, / scale)."""
    low = reduce(total).astype(np.int64)
    signed = np.where(low >= _HALF, low - 2 * _HALF, low)
    return signed.astype(np.float64) / scale


def reduce(values: npt.ArrayLike) -> np.ndarray:
    """uint32 values modulo 2^24, what the wire and the decoded sum keep of them."""
    return np.asarray(values, dtype=np.uint32) & _LOW_BITS


def pack(values: np.ndarray) -> bytes:
    """Masked uint32 values as the wire carries them: the low 3 bytes of each, little-endian."""
    little = np.asarray(values, dtype="<u4").reshape(-1, 1).view(np.uint8)
    return little[:, :VALUE_BYTES].tobytes()


def unpack(raw: bytes) -> np.ndarray:
    """The uint32 values (each < 2^24) of `pack`'s bytes; len(raw) must be a multiple of 3."""
    if len(raw) % VALUE_BYTES:
        raise ValueError(f"{len(raw)} bytes is not a whole number of {VALUE_BYTES}-byte values")
    columns = np.frombuffer(raw, dtype=np.uint8).reshape(-1, VALUE_BYTES)
    little = np.zeros((len(columns), 4), dtype=np.uint8)
    little[:, :VALUE_BYTES] = columns
    return little.view("<u4").ravel().astype(np.uint32)


def prg(seed: bytes, size: int) -> np.ndarray:
    """`size` pseudorandom uint32 from a seed: ChaCha20's keystream under HKDF(seed).

    HKDF turns any seed (a 16-byte self-mask seed, an X25519 shared secret) into
    a uniform 256-bit ChaCha20 key; the keystream is computationally
    indistinguishable from uniform, so a masked value is too. Vectorised: one
    C call for the whole vector.
    """
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_PRG_LABEL).derive(seed)
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    stream = encryptor.update(bytes(4 * size))
    return np.frombuffer(stream, dtype="<u4").astype(np.uint32)


def round_seed(label: bytes, round_id: int, lineage: str | None) -> bytes:
    """A public seed every party derives from the round alone (subset, neighbour graph)."""
    text = f"{round_id}\n{lineage or ''}".encode()
    return hashlib.sha256(label + b"\n" + text).digest()


def seeded_permutation(seed: bytes, size: int) -> np.ndarray:
    """A permutation of range(size) that every machine computes identically.

    Sorting 64-bit keys from `prg` (stable, so even a tie is broken the same
    way everywhere); numpy's own generators do not promise the same stream
    across numpy versions, and a doorbell and the aggregator may differ.
    """
    return np.argsort(_seeded_keys(seed, size), kind="stable").astype(np.int64)


def _seeded_keys(seed: bytes, size: int) -> np.ndarray:
    """`size` uint64 sort keys from `prg`: what seeded_permutation orders by."""
    words = prg(seed, 2 * size).astype(np.uint64)
    return (words[0::2] << np.uint64(32)) | words[1::2]


def first_of_order(keys: np.ndarray, count: int) -> np.ndarray:
    """np.sort(np.argsort(keys, kind="stable")[:count]) without sorting every key:
    the indices of the `count` smallest keys, a tie at the cut going to the lower
    index as the stable sort does; sorted, int64."""
    if count >= len(keys):
        return np.arange(len(keys), dtype=np.int64)
    cut = np.partition(keys, count - 1)[count - 1]
    below = np.flatnonzero(keys < cut)
    tied = np.flatnonzero(keys == cut)[: count - len(below)]
    return np.sort(np.concatenate([below, tied])).astype(np.int64)


def shared_subset(size: int, density: float, round_id: int, lineage: str | None) -> np.ndarray:
    """The sorted coordinates every doorbell sends this round (int64, same everywhere).

    max(1, round(size * density)) coordinates out of `size`, chosen by a PRG
    seeded with a hash of the round id and lineage, so the aggregator and every
    doorbell agree without a message, and a coordinate left out this round is
    likely in a later one (error feedback keeps it until then).
    """
    if size < 1 or not 0 < density <= 1:
        raise ValueError(f"size {size} must be >= 1 and density {density} in (0, 1]")
    count = max(1, round(size * density))
    # The first `count` of seeded_permutation's order, found by selection: every doorbell
    # draws the subset each round, and sorting all 32,768 keys of the shipped head took
    # 2.2 ms of a simulated doorbell's ~10 ms of CPU a round (bench.cluster).
    return first_of_order(_seeded_keys(round_seed(_SUBSET_LABEL, round_id, lineage), size), count)


def split_subset(delta_flat: np.ndarray, subset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values sent: float32 over `subset`, residual: the flat delta with those zeroed).

    The residual stays on the doorbell and joins the next round's training, as
    top-k's error feedback does (fedbell/wire/sparsify.py says why not its delta).
    """
    flat = np.asarray(delta_flat, dtype=np.float32).ravel()
    residual = flat.copy()
    residual[subset] = 0.0
    return flat[subset].copy(), residual
