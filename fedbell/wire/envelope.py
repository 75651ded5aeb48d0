"""The binary envelope every model-carrying message travels in.

    magic "FBEL" | version (1 byte) | header length (4 bytes, big-endian)
    | header (UTF-8 JSON) | body

The header says what the body is (kind, site, round, model version, sender,
number of examples, codec, tensor specs) and carries the body's sha256, so a
reader checks the body before decoding a single byte of it. Nothing here
unpickles or loads a model file: bodies are raw tensor bytes or a TFLite
flatbuffer, interpreted only through the header's specs.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fedbell.errors import RejectedMessage

MAGIC = b"FBEL"
VERSION = 1
_PREFIX = struct.Struct(">4sBI")
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSORS = 256
MAX_TENSOR_ELEMENTS = 64 * 1024 * 1024

Kind = Literal["update", "global", "tflite"]
Codec = Literal["float32", "float16", "int8", "topk", "tflite"]
Compression = Literal["zstd", "none"]


class TensorSpec(BaseModel):
    """Name, shape and dtype of one decoded tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    shape: tuple[int, ...] = Field(max_length=8)
    dtype: Literal["float32"] = "float32"

    @field_validator("shape")
    @classmethod
    def _dims_positive(cls, shape: tuple[int, ...]) -> tuple[int, ...]:
        size = 1
        for dim in shape:
            if dim < 1:
                raise ValueError(f"dimension {dim} must be at least 1")
            size *= dim
        if size > MAX_TENSOR_ELEMENTS:
            raise ValueError(f"{size} elements is more than {MAX_TENSOR_ELEMENTS}")
        return shape

    @property
    def size(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size


class Header(BaseModel):
    """Everything a reader must check before it touches the body."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Kind
    site: str = Field(min_length=1, max_length=64)
    round: int = Field(ge=0, description="Round the message belongs to (0: none).")
    model_version: int = Field(
        ge=0, description="Update: the base version it is a delta against. Model: its version."
    )
    sender: str = Field(min_length=1, max_length=64)
    num_examples: int = Field(default=0, ge=0, le=10_000_000)
    codec: Codec
    compression: Compression = "zstd"
    tensors: tuple[TensorSpec, ...] = Field(default=(), max_length=MAX_TENSORS)
    body_size: int = Field(ge=0)
    body_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    meta: dict[str, Any] = Field(default_factory=dict)
    signature: str | None = Field(default=None, max_length=200)

    def signed_bytes(self) -> bytes:
        """Canonical bytes a signature covers: the header minus the signature.

        The header holds the body's sha256, so signing it signs the body too.
        """
        fields = self.model_dump(mode="json", exclude={"signature"})
        return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def body_digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def encode(header: Header, body: bytes) -> bytes:
    """Serialise an envelope; the header must describe this body."""
    if header.body_size != len(body) or header.body_sha256 != body_digest(body):
        raise ValueError("header does not describe this body (size or sha256 differ)")
    raw_header = header.model_dump_json(exclude_none=True).encode()
    if len(raw_header) > MAX_HEADER_BYTES:
        raise ValueError(f"header of {len(raw_header)} bytes exceeds {MAX_HEADER_BYTES}")
    return _PREFIX.pack(MAGIC, VERSION, len(raw_header)) + raw_header + body


def decode(payload: bytes, max_bytes: int) -> tuple[Header, bytes]:
    """Parse and check an envelope: sizes, header schema, body sha256.

    Raises RejectedMessage with a stable reason; never returns a body that
    does not match its header.
    """
    if len(payload) > max_bytes:
        raise RejectedMessage("too_large", f"{len(payload)} bytes, limit {max_bytes}")
    if len(payload) < _PREFIX.size:
        raise RejectedMessage("truncated", f"{len(payload)} bytes is shorter than the prefix")
    magic, version, header_len = _PREFIX.unpack_from(payload)
    if magic != MAGIC:
        raise RejectedMessage("bad_magic", f"starts with {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise RejectedMessage("bad_version", f"envelope version {version}, expected {VERSION}")
    if header_len > MAX_HEADER_BYTES:
        raise RejectedMessage("header_too_large", f"{header_len} bytes, limit {MAX_HEADER_BYTES}")
    end = _PREFIX.size + header_len
    if len(payload) < end:
        raise RejectedMessage("truncated", f"header says {header_len} bytes, fewer present")
    try:
        header = Header.model_validate_json(payload[_PREFIX.size : end])
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'header'}: {e['msg']}"
            for e in err.errors()[:5]
        )
        raise RejectedMessage("bad_header", problems) from None
    body = payload[end:]
    if len(body) != header.body_size:
        raise RejectedMessage(
            "truncated", f"body is {len(body)} bytes, header says {header.body_size}"
        )
    if body_digest(body) != header.body_sha256:
        raise RejectedMessage("bad_checksum", "body sha256 does not match the header")
    return header, body
