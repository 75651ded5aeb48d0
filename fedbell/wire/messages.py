"""Build and parse the three model-carrying messages: the one validation path.

Every envelope the aggregator or a node accepts comes through a `parse_*`
function here, which checks the envelope, the sender, the signature, the
tensor specs and the values before returning anything the caller can use.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedbell.errors import RejectedMessage
from fedbell.wire import envelope, signing
from fedbell.wire.codecs import DEFAULT_DENSITY, Weights, decode_tensors, encode_tensors
from fedbell.wire.envelope import Codec, Header, Kind, TensorSpec

AGGREGATOR = "aggregator"
"""Sender name of everything the aggregator publishes (and its key's name)."""


@dataclass(frozen=True)
class Update:
    """A device's weight delta against the round's base model."""

    device: str
    round: int
    base_version: int
    num_examples: int
    codec: Codec
    delta: Weights
    meta: Mapping[str, Any] = field(default_factory=dict)


_LINEAGE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_lineage(value: object) -> str:
    """A lineage id names one model's history: a reset or an upgrade starts a new one."""
    if not isinstance(value, str) or not _LINEAGE.fullmatch(value):
        raise RejectedMessage("bad_lineage", f"lineage {value!r} is not 1-64 of [A-Za-z0-9_-]")
    return value


def check_epoch(value: object) -> int:
    """A lineage's epoch: an integer that only grows from one lineage to the next."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 2**53:
        raise RejectedMessage("bad_header", f"lineage epoch {value!r} is not an integer >= 0")
    return value


def resign(payload: bytes, signer: Signer, max_bytes: int) -> bytes:
    """The same envelope signed by `signer` (unchanged without a key).

    The aggregator republishes its retained head at every start: after a key
    rotation it must carry the new key's signature, or re-imaged doorbells
    (which trust only the new key) refuse it.
    """
    if signer.key is None:
        return payload
    header, body = envelope.decode(payload, max_bytes)
    return envelope.encode(signing.sign(header, signer.key), body)


@dataclass(frozen=True)
class GlobalModel:
    """The federated head of one model version; it carries no names and no faces."""

    version: int
    round: int
    names: tuple[str, ...]
    weights: Weights
    lineage: str
    threshold: float
    """Similarity below which a visitor is unknown, calibrated on real strangers."""
    backbone: str
    """sha256 of the backbone TFLite (float flavour) this head goes with."""
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        """The lineage's epoch (signed, checked by `parse_global`): only grows."""
        return int(self.meta.get("epoch", 0))


@dataclass(frozen=True)
class TfliteArtifact:
    """The backbone a lineage's heads run on: float and int8 TFLite flatbuffers.

    Published once per lineage (retained, in chunks: `fedbell.wire.backbone`),
    not per round: rounds only change the head, which travels in the global model.
    """

    version: int
    round: int
    float_model: bytes
    int8_model: bytes
    lineage: str


@dataclass(frozen=True)
class Signer:
    """Who signs outgoing envelopes (None key: unsigned, for open test sites)."""

    name: str
    key: Ed25519PrivateKey | None = None


def _seal(header: Header, body: bytes, signer: Signer) -> bytes:
    if signer.key is not None:
        header = signing.sign(header, signer.key)
    return envelope.encode(header, body)


def _header(
    kind: Kind,
    *,
    site: str,
    round_id: int,
    version: int,
    signer: Signer,
    codec: Codec,
    body: bytes,
    **fields: Any,
) -> Header:
    return Header(
        kind=kind,
        site=site,
        round=round_id,
        model_version=version,
        sender=signer.name,
        codec=codec,
        body_size=len(body),
        body_sha256=envelope.body_digest(body),
        **fields,
    )


def build_update(
    *,
    site: str,
    signer: Signer,
    round_id: int,
    base_version: int,
    num_examples: int,
    names: Sequence[str],
    delta: Sequence[np.ndarray],
    codec: Codec,
    meta: Mapping[str, Any] | None = None,
    density: float = DEFAULT_DENSITY,
) -> bytes:
    specs, body = encode_tensors(names, delta, codec, density=density)
    header = _header(
        "update",
        site=site,
        round_id=round_id,
        version=base_version,
        signer=signer,
        codec=codec,
        body=body,
        num_examples=num_examples,
        tensors=specs,
        meta=dict(meta or {}),
    )
    return _seal(header, body, signer)


def build_global(
    *,
    site: str,
    signer: Signer,
    version: int,
    round_id: int,
    names: Sequence[str],
    weights: Sequence[np.ndarray],
    lineage: str,
    threshold: float,
    backbone: str,
    epoch: int = 0,
    codec: Codec = "float32",
    meta: Mapping[str, Any] | None = None,
) -> bytes:
    specs, body = encode_tensors(names, weights, codec)
    identity = {"lineage": lineage, "epoch": epoch, "threshold": threshold, "backbone": backbone}
    header = _header(
        "global",
        site=site,
        round_id=round_id,
        version=version,
        signer=signer,
        codec=codec,
        body=body,
        tensors=specs,
        meta={"created": time.time(), **(meta or {}), **identity},
    )
    return _seal(header, body, signer)


def _open(
    payload: bytes,
    kind: Kind,
    *,
    site: str,
    sender: str,
    max_bytes: int,
    keys: Mapping[str, Ed25519PublicKey] | None,
) -> tuple[Header, bytes]:
    header, body = envelope.decode(payload, max_bytes)
    if header.kind != kind:
        raise RejectedMessage("wrong_kind", f"expected a {kind} message, got {header.kind}")
    if header.site != site:
        raise RejectedMessage("wrong_site", f"message for site {header.site!r}, this is {site!r}")
    if header.sender != sender:
        raise RejectedMessage(
            "wrong_sender", f"header names {header.sender!r}, topic or role says {sender!r}"
        )
    if keys is not None:
        signing.verify(header, dict(keys))
    return header, body


def check_specs(got: Sequence[TensorSpec], expected: Sequence[TensorSpec]) -> None:
    """The tensors must be exactly the model's: same count, names and shapes."""
    if len(got) != len(expected):
        raise RejectedMessage("bad_shapes", f"{len(got)} tensors, the model has {len(expected)}")
    for g, e in zip(got, expected, strict=True):
        if g.name != e.name or g.shape != e.shape:
            raise RejectedMessage(
                "bad_shapes",
                f"tensor {g.name!r} {g.shape} where the model has {e.name!r} {e.shape}",
            )


def parse_update(
    payload: bytes,
    *,
    site: str,
    device: str,
    expected: Sequence[TensorSpec],
    max_bytes: int,
    keys: Mapping[str, Ed25519PublicKey] | None,
) -> Update:
    header, body = _open(
        payload, "update", site=site, sender=device, max_bytes=max_bytes, keys=keys
    )
    if header.codec not in ("float32", "float16", "int8", "topk"):
        raise RejectedMessage("bad_codec", f"{header.codec!r} is not an update codec")
    if header.num_examples < 1:
        raise RejectedMessage("no_examples", "an update must come from at least one example")
    check_specs(header.tensors, expected)
    delta = decode_tensors(header.tensors, body, header.codec, header.compression)
    return Update(
        device=device,
        round=header.round,
        base_version=header.model_version,
        num_examples=header.num_examples,
        codec=header.codec,
        delta=delta,
        meta=header.meta,
    )


def parse_global(
    payload: bytes,
    *,
    site: str,
    max_bytes: int,
    keys: Mapping[str, Ed25519PublicKey] | None,
    expected: Sequence[TensorSpec] | None = None,
    max_decoded_bytes: int | None = None,
) -> GlobalModel:
    header, body = _open(
        payload, "global", site=site, sender=AGGREGATOR, max_bytes=max_bytes, keys=keys
    )
    if header.codec not in ("float32", "float16", "int8"):
        raise RejectedMessage("bad_codec", f"{header.codec!r} is not a model codec")
    if expected is not None:
        check_specs(header.tensors, expected)
    meta = header.meta
    lineage = check_lineage(meta.get("lineage"))
    check_epoch(meta.get("epoch"))
    threshold, backbone = meta.get("threshold"), meta.get("backbone")
    if not isinstance(threshold, int | float) or not -1.0 <= float(threshold) <= 1.0:
        raise RejectedMessage("bad_header", f"threshold {threshold!r} is not a cosine in [-1, 1]")
    if not isinstance(backbone, str) or not re.fullmatch(r"[0-9a-f]{64}", backbone):
        raise RejectedMessage("bad_header", "global model names no backbone sha256")
    weights = decode_tensors(
        header.tensors, body, header.codec, header.compression, max_decoded_bytes
    )
    return GlobalModel(
        version=header.model_version,
        round=header.round,
        names=tuple(t.name for t in header.tensors),
        weights=weights,
        lineage=lineage,
        threshold=float(threshold),
        backbone=backbone,
        meta=meta,
    )
