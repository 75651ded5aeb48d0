"""Tensor codecs: how a list of float32 arrays becomes an envelope body and back.

- float32: raw little-endian floats (the reference).
- float16: half the bytes; plenty for deltas and for the downlink.
- int8: one float32 scale per output channel (the last axis of a kernel),
  one per tensor for vectors, then int8 values: ~4x smaller before zstd.
- topk: only the largest `density` share of each tensor's entries, as
  gap-coded indices and int8 values. What it leaves out is not lost: the
  device keeps it as a residual and trains its next round from the global
  head plus that residual, so the next delta carries it (error feedback,
  `fedbell.wire.sparsify`).

zstd runs on top of every codec. The decoder knows from the header's tensor
specs the most bytes a body can decompress to and refuses to produce one byte
more, so a decompression bomb costs it nothing; then it must consume the
decompressed bytes exactly.
"""

from __future__ import annotations

import io
import math
import struct
import threading
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import zstandard

from fedbell.errors import RejectedMessage
from fedbell.wire.envelope import Codec, Compression, TensorSpec

Weights = list[npt.NDArray[np.float32]]
TENSOR_CODECS: tuple[Codec, ...] = ("float32", "float16", "int8", "topk")
ZSTD_LEVEL = 3
DEFAULT_DENSITY = 0.05
_COUNT = struct.Struct("<I")
_SAFE_SCALE = float(np.finfo(np.float32).max) / 256
"""An int8 scale below this times any int8 value (|v| <= 128) is finite."""
_local = threading.local()


def _channels(spec: TensorSpec) -> int:
    """Scales per tensor for int8: one per output channel, or one for a vector."""
    return spec.shape[-1] if len(spec.shape) >= 2 else 1


def max_decoded_size(specs: Sequence[TensorSpec], codec: Codec) -> int:
    """The most bytes an uncompressed body for these tensors can hold."""
    if codec == "float32":
        return sum(4 * s.size for s in specs)
    if codec == "float16":
        return sum(2 * s.size for s in specs)
    if codec == "int8":
        return sum(s.size + 4 * _channels(s) for s in specs)
    if codec == "topk":
        return sum(8 + 5 * s.size for s in specs)
    raise RejectedMessage("bad_codec", f"{codec!r} is not a tensor codec")


MODEL_GROWTH = 4
"""A new global model may hold up to this many times the current one's values."""
FIRST_MODEL_MAX_BYTES = 32 * 1024 * 1024
"""Inflated size allowed for a doorbell's first global model (it has none to compare)."""


def model_decode_limit(current: Sequence[npt.NDArray[np.float32]] | None) -> int:
    """The most bytes a doorbell lets a global model's body inflate to.

    Taken from the tensor shapes the doorbell expects (its current model's,
    with room to grow), never from the header, which may claim 256 tensors of
    64 Mi values each (64 GiB) for a body that is a few kilobytes of zstd.
    """
    if not current:
        return FIRST_MODEL_MAX_BYTES
    return MODEL_GROWTH * sum(4 * int(array.size) for array in current)


def _int8(values: npt.NDArray[np.float32], channels: int) -> bytes:
    grid = values.reshape(-1, channels)
    peak = np.max(np.abs(grid), axis=0) if grid.size else np.zeros(channels, np.float32)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
    quantized = np.clip(np.rint(grid / scales), -127, 127).astype(np.int8)
    return bytes(scales.tobytes() + quantized.tobytes())


def _topk(values: npt.NDArray[np.float32], density: float) -> bytes:
    flat = values.reshape(-1)
    k = min(flat.size, max(1, math.ceil(density * flat.size)))
    indices = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k :])
    gaps = np.diff(indices, prepend=0).astype("<u4")
    return _COUNT.pack(k) + gaps.tobytes() + _int8(flat[indices], 1)


def encode_tensors(
    names: Sequence[str],
    arrays: Sequence[npt.NDArray[np.floating]],
    codec: Codec,
    compression: Compression = "zstd",
    density: float = DEFAULT_DENSITY,
) -> tuple[tuple[TensorSpec, ...], bytes]:
    """Tensor specs and the (compressed) body for these arrays."""
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} names for {len(arrays)} arrays")
    if not 0 < density <= 1:
        raise ValueError(f"top-k density {density} must be in (0, 1]")
    specs = tuple(
        TensorSpec(name=n, shape=tuple(int(d) for d in a.shape))
        for n, a in zip(names, arrays, strict=True)
    )
    parts: list[bytes] = []
    for spec, array in zip(specs, arrays, strict=True):
        values = np.asarray(array, dtype=np.float32)
        if codec == "float32":
            parts.append(values.astype("<f4").tobytes())
        elif codec == "float16":
            parts.append(values.astype("<f2").tobytes())
        elif codec == "int8":
            parts.append(_int8(values, _channels(spec)))
        elif codec == "topk":
            parts.append(_topk(values, density))
        else:
            raise ValueError(f"{codec!r} is not a tensor codec")
    raw = b"".join(parts)
    if compression == "zstd":
        raw = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    return specs, raw


def _decompressor() -> zstandard.ZstdDecompressor:
    """One decompressor per thread (they are not thread-safe): creating one per
    message cost a third of the decompression time of an int8 update."""
    decompressor = getattr(_local, "zstd", None)
    if decompressor is None:
        decompressor = _local.zstd = zstandard.ZstdDecompressor()
    return decompressor


def _decompress(body: bytes, limit: int) -> bytes:
    reader = _decompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
    try:
        raw = reader.read(limit + 1)
    except zstandard.ZstdError as err:
        raise RejectedMessage("bad_compression", f"zstd: {err}") from None
    if len(raw) > limit:
        raise RejectedMessage(
            "bad_size",
            f"body decompresses to more than {limit} bytes, more than its tensor specs can hold",
        )
    return bytes(raw)


class _Reader:
    """Walks a decompressed body; running past its end is a rejection."""

    def __init__(self, raw: bytes) -> None:
        self.raw = memoryview(raw)
        self.offset = 0

    def take(self, length: int, what: str) -> memoryview:
        if length < 0 or self.offset + length > len(self.raw):
            raise RejectedMessage("bad_size", f"body ends inside {what}")
        chunk = self.raw[self.offset : self.offset + length]
        self.offset += length
        return chunk

    def int8(self, count: int, channels: int, what: str) -> tuple[npt.NDArray[np.float32], bool]:
        """The dequantised values, known finite (a NaN or Inf scale, or values that overflow
        float32, are refused here, before any arithmetic could warn about them)."""
        scales = np.frombuffer(self.take(4 * channels, what), dtype="<f4")
        values = np.frombuffer(self.take(count, what), dtype=np.int8).astype(np.float32)
        if np.all(np.abs(scales) < _SAFE_SCALE):  # the honest case: False for NaN/Inf too
            return (values.reshape(-1, channels) * scales).reshape(-1), True
        if not np.all(np.isfinite(scales)):
            raise RejectedMessage("not_finite", f"{what}: an int8 scale is NaN or Inf")
        wide = values.reshape(-1, channels).astype(np.float64) * scales.astype(np.float64)
        if np.any(np.abs(wide) > np.finfo(np.float32).max):
            raise RejectedMessage("not_finite", f"{what}: int8 values times their scale overflow")
        return wide.reshape(-1).astype(np.float32), True


def _decode_one(
    reader: _Reader, spec: TensorSpec, codec: Codec
) -> tuple[npt.NDArray[np.float32], bool]:
    """A tensor's values, and True if they are known finite without looking at each."""
    what = f"tensor {spec.name!r}"
    if codec == "float32":
        return np.frombuffer(reader.take(4 * spec.size, what), dtype="<f4").astype(
            np.float32
        ), False
    if codec == "float16":
        return np.frombuffer(reader.take(2 * spec.size, what), dtype="<f2").astype(
            np.float32
        ), False
    if codec == "int8":
        return reader.int8(spec.size, _channels(spec), what)
    (k,) = _COUNT.unpack(reader.take(_COUNT.size, what))
    if not 1 <= k <= spec.size:
        raise RejectedMessage("bad_size", f"{what} claims {k} of {spec.size} entries")
    gaps = np.frombuffer(reader.take(4 * k, what), dtype="<u4").astype(np.int64)
    indices = np.cumsum(gaps)
    if np.any(gaps[1:] == 0) or indices[-1] >= spec.size:
        raise RejectedMessage("bad_indices", f"{what}: indices repeat or exceed {spec.size}")
    dense = np.zeros(spec.size, dtype=np.float32)
    dense[indices], finite = reader.int8(k, 1, what)
    return dense, finite


def decode_tensors(
    specs: Sequence[TensorSpec],
    body: bytes,
    codec: Codec,
    compression: Compression,
    max_decoded_bytes: int | None = None,
) -> Weights:
    """float32 arrays from a body, or RejectedMessage. Rejects NaN and Inf.

    max_decoded_bytes: a reader's own bound on the inflated body, below what the
    header's specs allow (see `model_decode_limit`).
    """
    limit = max_decoded_size(specs, codec)
    if max_decoded_bytes is not None and limit > max_decoded_bytes:
        raise RejectedMessage(
            "too_large_model",
            f"tensor specs would inflate to {limit} bytes, this reader expects at most "
            f"{max_decoded_bytes}",
        )
    if compression == "zstd":
        raw = _decompress(body, limit)
    elif len(body) > limit:
        raise RejectedMessage("bad_size", f"body is {len(body)} bytes, specs allow {limit}")
    else:
        raw = body
    reader = _Reader(raw)
    arrays: Weights = []
    for spec in specs:
        flat, finite = _decode_one(reader, spec, codec)
        array = flat.reshape(spec.shape)
        if not finite and not np.all(np.isfinite(array)):
            raise RejectedMessage("not_finite", f"tensor {spec.name!r} holds NaN or Inf")
        arrays.append(array)
    if reader.offset != len(raw):
        raise RejectedMessage(
            "bad_size", f"{len(raw) - reader.offset} bytes left after the last tensor"
        )
    return arrays
