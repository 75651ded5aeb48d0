"""The backbone on the wire: chunks of at most `CHUNK_BYTES` under one signed manifest.

dlib's network as float and int8 TFLite is ~28 MB. Sent as one message it
made the broker accept 64 MiB from every login, so one doorbell could park
hundreds of MiB of retained data. Split, the largest message is a chunk of
512 KiB and the broker's `message_size_limit` can be ~1 MiB for everyone.

    <root>/<site>/model/tflite        the manifest: a signed envelope (kind
                                      "tflite", empty body) whose header names
                                      the lineage, the backbone id, the two
                                      parts' sizes, the sha256 of each chunk
                                      and of the whole
    <root>/<site>/model/tflite/<i>    chunk i: raw bytes, i = 0, 1, ...

Both are retained. A chunk carries no signature of its own: the manifest's
signature covers every chunk's sha256, so a chunk is trusted only by
matching its line of a verified manifest. The aggregator publishes the
manifest first, then the chunks (and a new subscriber gets retained
messages in subscription order), so a reader always knows what it waits for.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedbell.errors import RejectedMessage
from fedbell.wire import envelope, signing
from fedbell.wire.envelope import Header
from fedbell.wire.messages import AGGREGATOR, Signer, TfliteArtifact, check_epoch, check_lineage
from fedbell.wire.topics import Topics

CHUNK_BYTES = 512 * 1024
"""Largest chunk: the broker's message_size_limit (1 MiB) is sized from it."""
MAX_CHUNKS = 256
"""128 MiB of backbone at most: a manifest cannot make a reader wait for more."""
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Manifest:
    """What a verified manifest promises: the chunks to expect and what they add up to."""

    version: int
    round: int
    lineage: str
    epoch: int
    float_size: int
    int8_size: int
    chunk_bytes: int
    chunks: tuple[str, ...]
    """sha256 of each chunk, in order."""
    sha256: str
    """sha256 of the whole (float model then int8 model)."""
    float_sha256: str
    """sha256 of the float model alone: the backbone id global models name."""


@dataclass(frozen=True)
class BackboneMessages:
    """One backbone publication: the manifest and its chunks, in publishing order."""

    manifest: bytes
    chunks: tuple[bytes, ...]

    def publications(self, topics: Topics) -> list[tuple[str, bytes]]:
        """(topic, payload) pairs, manifest first."""
        return [(topics.tflite_model, self.manifest)] + [
            (topics.backbone_chunk(index), chunk) for index, chunk in enumerate(self.chunks)
        ]


def build_backbone(
    *,
    site: str,
    signer: Signer,
    version: int,
    round_id: int,
    float_model: bytes,
    int8_model: bytes,
    lineage: str,
    epoch: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> BackboneMessages:
    whole = float_model + int8_model
    chunks = tuple(
        whole[start : start + chunk_bytes] for start in range(0, len(whole), chunk_bytes)
    )
    empty = b""
    header = Header(
        kind="tflite",
        site=site,
        round=round_id,
        model_version=version,
        sender=signer.name,
        codec="tflite",
        compression="none",
        body_size=0,
        body_sha256=envelope.body_digest(empty),
        meta={
            "lineage": lineage,
            "epoch": epoch,
            "float_sha256": hashlib.sha256(float_model).hexdigest(),
            "float_size": len(float_model),
            "int8_size": len(int8_model),
            "chunk_bytes": chunk_bytes,
            "chunks": [hashlib.sha256(chunk).hexdigest() for chunk in chunks],
            "sha256": hashlib.sha256(whole).hexdigest(),
        },
    )
    if signer.key is not None:
        header = signing.sign(header, signer.key)
    return BackboneMessages(envelope.encode(header, empty), chunks)


def _count(meta: Mapping[str, object], name: str, low: int, high: int) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RejectedMessage("bad_header", f"manifest {name} {value!r} is not in [{low}, {high}]")
    return value


def _digest(value: object, what: str) -> str:
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise RejectedMessage("bad_header", f"manifest {what} is not a sha256")
    return value


def parse_manifest(
    payload: bytes, *, site: str, max_bytes: int, keys: Mapping[str, Ed25519PublicKey] | None
) -> Manifest:
    """A backbone manifest, checked and (with `keys`) verified against the aggregator's key."""
    header, _ = envelope.decode(payload, max_bytes)
    if header.kind != "tflite":
        raise RejectedMessage("wrong_kind", f"expected a tflite manifest, got {header.kind}")
    if header.site != site:
        raise RejectedMessage("wrong_site", f"message for site {header.site!r}, this is {site!r}")
    if header.sender != AGGREGATOR:
        raise RejectedMessage("wrong_sender", f"manifest from {header.sender!r}")
    if keys is not None:
        signing.verify(header, dict(keys))
    meta = header.meta
    limit = MAX_CHUNKS * CHUNK_BYTES
    float_size = _count(meta, "float_size", 1, limit)
    int8_size = _count(meta, "int8_size", 0, limit)
    chunk_bytes = _count(meta, "chunk_bytes", 1024, CHUNK_BYTES)
    chunks = meta.get("chunks")
    if not isinstance(chunks, list) or not 1 <= len(chunks) <= MAX_CHUNKS:
        raise RejectedMessage("bad_header", f"manifest lists no chunks or more than {MAX_CHUNKS}")
    expected = -(-(float_size + int8_size) // chunk_bytes)
    if len(chunks) != expected:
        raise RejectedMessage(
            "bad_size", f"{len(chunks)} chunks listed, {expected} hold {float_size + int8_size} B"
        )
    return Manifest(
        version=header.model_version,
        round=header.round,
        lineage=check_lineage(meta.get("lineage")),
        epoch=check_epoch(meta.get("epoch")),
        float_size=float_size,
        int8_size=int8_size,
        chunk_bytes=chunk_bytes,
        chunks=tuple(_digest(chunk, "chunk") for chunk in chunks),
        sha256=_digest(meta.get("sha256"), "sha256"),
        float_sha256=_digest(meta.get("float_sha256"), "float_sha256"),
    )


def check_chunk(manifest: Manifest, index: int, chunk: bytes) -> None:
    """RejectedMessage unless `chunk` is exactly the manifest's chunk `index`."""
    if not 0 <= index < len(manifest.chunks):
        raise RejectedMessage(
            "bad_chunk", f"chunk {index} of a backbone of {len(manifest.chunks)} chunks"
        )
    if hashlib.sha256(chunk).hexdigest() != manifest.chunks[index]:
        raise RejectedMessage(
            "bad_chunk",
            f"chunk {index} ({len(chunk)} B) does not match the manifest of lineage "
            f"{manifest.lineage} (stale, truncated or forged)",
        )


def assemble(manifest: Manifest, chunks: Mapping[int, bytes]) -> TfliteArtifact:
    """The whole backbone from every chunk of `manifest`, each checked; RejectedMessage if not."""
    missing = [index for index in range(len(manifest.chunks)) if index not in chunks]
    if missing:
        raise RejectedMessage(
            "incomplete_backbone", f"{len(missing)} of {len(manifest.chunks)} chunks missing"
        )
    for index in range(len(manifest.chunks)):
        check_chunk(manifest, index, chunks[index])
    whole = b"".join(chunks[index] for index in range(len(manifest.chunks)))
    if len(whole) != manifest.float_size + manifest.int8_size:
        raise RejectedMessage("bad_size", "chunks do not add up to the manifest's sizes")
    if hashlib.sha256(whole).hexdigest() != manifest.sha256:
        raise RejectedMessage("bad_checksum", "the assembled backbone's sha256 differs")
    float_model = whole[: manifest.float_size]
    if hashlib.sha256(float_model).hexdigest() != manifest.float_sha256:
        raise RejectedMessage("bad_checksum", "the float model's sha256 differs")
    return TfliteArtifact(
        version=manifest.version,
        round=manifest.round,
        float_model=float_model,
        int8_model=whole[manifest.float_size :],
        lineage=manifest.lineage,
    )


class BackboneAssembly:
    """Collects one manifest's chunks as they arrive; hands over a whole, verified backbone.

    Not thread-safe: one MQTT thread feeds it. Holds at most one backbone's
    bytes, and none once it is handed over or replaced by another manifest.
    """

    def __init__(self) -> None:
        self.manifest: Manifest | None = None
        self._chunks: dict[int, bytes] = {}

    @property
    def received(self) -> int:
        return len(self._chunks)

    def expect(self, manifest: Manifest) -> int:
        """Wait for `manifest`'s chunks; returns how many chunks the one replaced still lacked."""
        lacked = 0
        if self.manifest is not None:
            lacked = len(self.manifest.chunks) - len(self._chunks)
        self.manifest, self._chunks = manifest, {}
        return lacked

    def expect_nothing(self) -> None:
        """Drop any partial set: what it would make is installed already."""
        self.manifest, self._chunks = None, {}

    def add(self, index: int, chunk: bytes) -> TfliteArtifact | None:
        """Keep a chunk of the awaited manifest; the backbone once the last one is in.

        RejectedMessage for a chunk that does not match (it is dropped, the
        others are kept: a later good copy still completes the set). A chunk
        while no manifest is awaited (the backbone is already installed) is
        ignored: None.
        """
        manifest = self.manifest
        if manifest is None:
            return None
        check_chunk(manifest, index, chunk)
        self._chunks[index] = chunk
        if len(self._chunks) < len(manifest.chunks):
            return None
        chunks, self.manifest, self._chunks = self._chunks, None, {}
        return assemble(manifest, chunks)
