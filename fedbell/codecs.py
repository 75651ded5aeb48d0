"""Tensor codecs: how a list of float32 arrays becomes an envelope body and back.

- float32: raw little-endian floats (the reference).
- float16: half the bytes; plenty for deltas and for the downlink.
- int8: one float32 scale per output channel (the last axis of a kernel),
  per tensor for vectors, then int8 values: ~4x smaller before zstd.

zstd runs on top of every codec. The decoder knows from the header's tensor
specs exactly how many bytes the body must decompress to, and refuses to
produce one byte more: a decompression bomb costs it nothing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import zstandard

from fedbell.envelope import Codec, Compression, TensorSpec
from fedbell.errors import RejectedMessage

Weights = list[npt.NDArray[np.float32]]
TENSOR_CODECS: tuple[Codec, ...] = ("float32", "float16", "int8")
ZSTD_LEVEL = 3


def _channels(spec: TensorSpec) -> int:
    """Scales per tensor for int8: one per output channel, or one for a vector."""
    return spec.shape[-1] if len(spec.shape) >= 2 else 1


def decoded_size(specs: Sequence[TensorSpec], codec: Codec) -> int:
    """Exact byte length of an uncompressed body for these tensors."""
    if codec == "float32":
        return sum(4 * s.size for s in specs)
    if codec == "float16":
        return sum(2 * s.size for s in specs)
    if codec == "int8":
        return sum(s.size + 4 * _channels(s) for s in specs)
    raise RejectedMessage("bad_codec", f"{codec!r} is not a tensor codec")


def _quantize_int8(array: npt.NDArray[np.float32]) -> bytes:
    flat = array.reshape(-1, array.shape[-1]) if array.ndim >= 2 else array.reshape(-1, 1)
    peak = np.max(np.abs(flat), axis=0) if array.ndim >= 2 else np.max(np.abs(flat)).reshape(1)
    scales = np.where(peak > 0, peak / 127.0, 1.0).astype("<f4")
    values = np.clip(np.rint(flat / scales), -127, 127).astype(np.int8)
    return bytes(scales.tobytes() + values.tobytes())


def _dequantize_int8(raw: memoryview, spec: TensorSpec) -> npt.NDArray[np.float32]:
    channels = _channels(spec)
    scales = np.frombuffer(raw[: 4 * channels], dtype="<f4")
    values = np.frombuffer(raw[4 * channels :], dtype=np.int8).astype(np.float32)
    if len(spec.shape) >= 2:
        result = (values.reshape(-1, channels) * scales).reshape(spec.shape)
    else:
        result = (values * scales[0]).reshape(spec.shape)
    return np.asarray(result, dtype=np.float32)


def encode_tensors(
    names: Sequence[str], arrays: Sequence[npt.NDArray[np.floating]], codec: Codec,
    compression: Compression = "zstd",
) -> tuple[tuple[TensorSpec, ...], bytes]:
    """Tensor specs and the (compressed) body for these arrays."""
    if len(names) != len(arrays):
        raise ValueError(f"{len(names)} names for {len(arrays)} arrays")
    specs = tuple(
        TensorSpec(name=n, shape=tuple(int(d) for d in a.shape))
        for n, a in zip(names, arrays, strict=True)
    )
    parts: list[bytes] = []
    for array in arrays:
        values = np.asarray(array, dtype=np.float32)
        if codec == "float32":
            parts.append(values.astype("<f4").tobytes())
        elif codec == "float16":
            parts.append(values.astype("<f2").tobytes())
        elif codec == "int8":
            parts.append(_quantize_int8(values))
        else:
            raise ValueError(f"{codec!r} is not a tensor codec")
    raw = b"".join(parts)
    if compression == "zstd":
        raw = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    return specs, raw


def _decompress(body: bytes, expected: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body), read_across_frames=True)
    try:
        raw = reader.read(expected + 1)
    except zstandard.ZstdError as err:
        raise RejectedMessage("bad_compression", f"zstd: {err}") from None
    if len(raw) != expected:
        got = f"more than {expected}" if len(raw) > expected else str(len(raw))
        raise RejectedMessage(
            "bad_size", f"body decompresses to {got} bytes, tensor specs need exactly {expected}"
        )
    return raw


def decode_tensors(
    specs: Sequence[TensorSpec], body: bytes, codec: Codec, compression: Compression,
) -> Weights:
    """float32 arrays from a body, or RejectedMessage. Rejects NaN and Inf."""
    expected = decoded_size(specs, codec)
    if compression == "zstd":
        raw = memoryview(_decompress(body, expected))
    elif len(body) != expected:
        raise RejectedMessage("bad_size", f"body is {len(body)} bytes, specs need {expected}")
    else:
        raw = memoryview(body)
    arrays: Weights = []
    offset = 0
    for spec in specs:
        if codec == "float32":
            length = 4 * spec.size
            array = np.frombuffer(raw[offset : offset + length], dtype="<f4").reshape(spec.shape)
        elif codec == "float16":
            length = 2 * spec.size
            array = np.frombuffer(raw[offset : offset + length], dtype="<f2").reshape(spec.shape)
        else:
            length = spec.size + 4 * _channels(spec)
            array = _dequantize_int8(raw[offset : offset + length], spec)
        offset += length
        result = np.array(array, dtype=np.float32)  # a writable, aligned copy
        if not np.all(np.isfinite(result)):
            raise RejectedMessage("not_finite", f"tensor {spec.name!r} holds NaN or Inf")
        arrays.append(result)
    return arrays
