"""The secure-aggregation messages (strict JSON) and the cryptography they carry.

Every byte string from the network goes through `parse`: size first, then a
pydantic model (whose JSON parser bounds the nesting) with extra="forbid", then
each base64 field is decoded to its exact length by the caller (`unb64`). Failures are
`SecAggError`s: a RejectedMessage whose `reason` is a stable `secagg_*` key and
whose `device` names the doorbell at fault when one is.

Keys: every round each doorbell makes two fresh X25519 key pairs, one to encrypt
its Shamir shares to its neighbours (AES-GCM under HKDF of the X25519 secret, one
key per direction, used once), one whose secret with each neighbour seeds their
pairwise mask. The mask key is derived from a 16-byte seed so that it can be
Shamir-shared whole and checked against the advertised public key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from typing import Annotated, TypeVar

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from fedbell.errors import RejectedMessage
from fedbell.wire.protocol import validation_problems
from fedbell.wire.secagg_params import MAX_DEVICES, SecAggParams

DEVICE = r"^[A-Za-z0-9_-]{1,64}$"
LINEAGE = DEVICE
_B64 = r"^[A-Za-z0-9+/]*={0,2}$"
COMMITMENT_BYTES = 16
"""A share's commitment: truncated SHA-256, 128-bit second-preimage resistance."""
SALT_BYTES = 16
ADVERT_CONTEXT = b"fedbell secagg advert v1\n"
_ZERO_NONCE = bytes(12)


class SecAggError(RejectedMessage):
    """A secure-aggregation message or step refused; `device` is the doorbell at fault, if any."""

    def __init__(self, reason: str, detail: str, device: str | None = None) -> None:
        super().__init__(reason, detail)
        self.device = device


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    round: int = Field(ge=1)
    lineage: str | None = Field(default=None, pattern=LINEAGE)


B64Key = Annotated[str, StringConstraints(min_length=44, max_length=44, pattern=_B64)]
"""32 bytes in base64 (a public key, a seed commitment)."""
B64Short = Annotated[str, StringConstraints(min_length=24, max_length=24, pattern=_B64)]
"""16 to 18 bytes in base64 (a share, a salt, a share commitment)."""


class Advert(_Message):
    device: str = Field(pattern=DEVICE)
    enc_key: B64Key
    mask_key: B64Key
    signature: str | None = Field(default=None, max_length=100, pattern=_B64)

    def signed_bytes(self) -> bytes:
        """What the identity key signs: every field but the signature, with a context prefix.

        The round and lineage are inside, so an advert replayed into another round
        fails its signature.
        """
        fields = self.model_dump(mode="json", exclude={"signature"})
        return ADVERT_CONTEXT + json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


KEY_BYTES = 32
"""An X25519 public key."""
SIGNATURE_BYTES = 64
"""An Ed25519 signature."""
RECORD_BYTES = 2 * KEY_BYTES + SIGNATURE_BYTES
"""One advert in a roster: enc_key, mask_key, signature (zeros: unsigned), raw."""
_UNSIGNED = bytes(SIGNATURE_BYTES)
_RECORD_CHARS = 4 * -(-RECORD_BYTES // 3)
DeviceName = Annotated[str, StringConstraints(pattern=DEVICE)]
B64Record = Annotated[str, StringConstraints(min_length=_RECORD_CHARS, max_length=_RECORD_CHARS)]
"""RECORD_BYTES in base64 (decoded, and so checked, only when used)."""


class Roster(_Message):
    """The round's adverts as every doorbell reads them: the names, sorted, and for each
    its advert's keys and signature as one base64 record (RECORD_BYTES).

    A doorbell needs every name (the neighbour graph is drawn on them) but the
    adverts of its k neighbours only. As a list of advert objects the roster of
    1,000 was 275 kB and a doorbell's reading of it (parse, every name checked)
    3 ms; here pydantic checks the names and the records' lengths in its own code
    and `advert_at` decodes and rebuilds, exactly, only the adverts used. The
    round and lineage are the roster's, so a record's signature covers them.
    """

    devices: tuple[DeviceName, ...] = Field(max_length=MAX_DEVICES)
    records: tuple[B64Record, ...] = Field(max_length=MAX_DEVICES)


def advert_record(advert: Advert) -> bytes:
    """The advert's keys and signature as its roster record, raw (SecAggError
    'secagg_bad_message' naming the doorbell for a key or signature of another
    length than X25519's and Ed25519's)."""
    device = advert.device
    signature = (
        _UNSIGNED
        if advert.signature is None
        else unb64(advert.signature, SIGNATURE_BYTES, "signature", device)
    )
    enc_key = unb64(advert.enc_key, KEY_BYTES, "enc_key", device)
    return enc_key + unb64(advert.mask_key, KEY_BYTES, "mask_key", device) + signature


def record_keys(roster: Roster, index: int) -> tuple[bytes, bytes, bytes | None]:
    """(enc_key, mask_key, signature or None) of `roster.devices[index]`, raw."""
    device = roster.devices[index]
    record = unb64(roster.records[index], RECORD_BYTES, "roster record", device)
    signature = record[2 * KEY_BYTES :]
    return (
        record[:KEY_BYTES],
        record[KEY_BYTES : 2 * KEY_BYTES],
        None if signature == _UNSIGNED else signature,
    )


def advert_at(roster: Roster, index: int) -> Advert:
    """The advert of `roster.devices[index]`, rebuilt from its record as its doorbell made it."""
    enc_key, mask_key, signature = record_keys(roster, index)
    return Advert(
        round=roster.round,
        lineage=roster.lineage,
        device=roster.devices[index],
        enc_key=b64(enc_key),
        mask_key=b64(mask_key),
        signature=None if signature is None else b64(signature),
    )


class SealedShare(BaseModel):
    """One neighbour's encrypted pair of shares, with commitments to each half.

    `peer` is the recipient in a Shares message and the dealer in an Inbox.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    peer: str = Field(pattern=DEVICE)
    ciphertext: str = Field(min_length=4, max_length=200, pattern=_B64)
    self_commitment: B64Short
    key_commitment: B64Short


class Shares(_Message):
    device: str = Field(pattern=DEVICE)
    seed_commitment: B64Key
    shares: tuple[SealedShare, ...] = Field(max_length=MAX_DEVICES)


class Inbox(_Message):
    """The shares a doorbell's neighbours dealt it. Who holds shares (who masks) is not
    here: the doorbell takes that list from the signed send announcement, which carries
    it anyway (in each inbox it was 10 of 17 kB at 1,000 doorbells)."""

    device: str = Field(pattern=DEVICE)
    shares: tuple[SealedShare, ...] = Field(max_length=MAX_DEVICES)


class Masked(_Message):
    device: str = Field(pattern=DEVICE)
    values: str = Field(pattern=_B64)
    """Each value's low 3 bytes, little-endian, base64 (fedbell.wire.masking.pack)."""


class UnmaskRequest(_Message):
    survivors: tuple[str, ...] = Field(max_length=MAX_DEVICES)
    dropped: tuple[str, ...] = Field(max_length=MAX_DEVICES)


REVEALED_BYTES = 17 + SALT_BYTES
"""One revealed share and its salt (a share is 17 bytes: fedbell.wire.shamir.SHARE_BYTES)."""


class UnmaskReply(_Message):
    """Revealed shares, each share || salt, packed in base64 in the order both sides know:
    the replier's neighbours (sorted) among the survivors, then among the dropped."""

    device: str = Field(pattern=DEVICE)
    self_shares: str = Field(max_length=4 * REVEALED_BYTES * MAX_DEVICES // 3 + 4, pattern=_B64)
    key_shares: str = Field(max_length=4 * REVEALED_BYTES * MAX_DEVICES // 3 + 4, pattern=_B64)


M = TypeVar("M", bound=BaseModel)


def parse(payload: bytes, model: type[M], max_bytes: int) -> M:
    """The validated message, or SecAggError('secagg_bad_message') saying which field.

    Size first. Nesting needs no scan of its own here (safejson.check_shape, 3.7 ms
    on a roster of 1,000, which every doorbell of the round reads): pydantic's JSON
    parser refuses a document nested deeper than 200 levels with a ValidationError,
    not a RecursionError (tests/test_secagg_messages.py), and no model here nests beyond 3.
    """
    if len(payload) > max_bytes:
        raise SecAggError(
            "secagg_bad_message", f"{model.__name__}: {len(payload)} bytes, limit {max_bytes}"
        )
    try:
        return model.model_validate_json(payload)
    except ValidationError as err:
        problems = validation_problems(err)
        raise SecAggError("secagg_bad_message", f"{model.__name__}: {problems}") from None


def dump(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=True).encode()


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str, length: int | None, what: str, device: str | None = None) -> bytes:
    """Base64 to exactly `length` bytes (None: any), or SecAggError naming the field."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecAggError("secagg_bad_message", f"{what} is not base64", device) from None
    if length is not None and len(raw) != length:
        raise SecAggError(
            "secagg_bad_message", f"{what} is {len(raw)} bytes, expected {length}", device
        )
    return raw


def check_round(message: _Message, params: SecAggParams, what: str, device: str | None) -> None:
    """SecAggError('secagg_replay') unless the message belongs to this round and lineage."""
    if message.round != params.round_id or message.lineage != params.lineage:
        raise SecAggError(
            "secagg_replay",
            f"{what} of round {message.round} lineage {message.lineage!r} in round "
            f"{params.round_id} lineage {params.lineage!r}",
            device,
        )


def sign_advert(advert: Advert, identity: Ed25519PrivateKey) -> Advert:
    return advert.model_copy(update={"signature": b64(identity.sign(advert.signed_bytes()))})


def verify_advert(advert: Advert, key: Ed25519PublicKey) -> None:
    if advert.signature is None:
        raise SecAggError(
            "secagg_bad_signature", f"advert of {advert.device} is not signed", advert.device
        )
    try:
        key.verify(base64.b64decode(advert.signature, validate=True), advert.signed_bytes())
    except (InvalidSignature, binascii.Error, ValueError):
        raise SecAggError(
            "secagg_bad_signature",
            f"advert of {advert.device} (round {advert.round}) does not verify",
            advert.device,
        ) from None


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def hkdf(material: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def mask_key_from_seed(seed: bytes) -> X25519PrivateKey:
    """The mask key pair a 16-byte seed stands for (the seed is what gets Shamir-shared)."""
    return X25519PrivateKey.from_private_bytes(hkdf(seed, b"fedbell secagg mask key v1"))


def exchange(own: X25519PrivateKey, peer_raw: bytes, peer: str) -> bytes:
    try:
        return own.exchange(X25519PublicKey.from_public_bytes(peer_raw))
    except ValueError:  # a low-order point gives the all-zero secret
        raise SecAggError("secagg_bad_key", f"{peer} advertised an unusable key", peer) from None


def share_cipher(secret: bytes, *, dealer: str, recipient: str, ctx: bytes) -> AESGCM:
    """The AES-GCM key of shares from `dealer` to `recipient` this round.

    `secret` is X25519(own enc key, peer's enc key), the same on both sides.
    Fresh keys every round and the direction in the HKDF info make each key
    encrypt exactly one message, so a fixed nonce is safe.
    """
    return AESGCM(
        hkdf(secret, b"fedbell secagg share v1\n" + ctx + f"{dealer}>{recipient}".encode())
    )


def seal(cipher: AESGCM, plaintext: bytes, associated: bytes) -> bytes:
    return cipher.encrypt(_ZERO_NONCE, plaintext, associated)


def unseal(cipher: AESGCM, ciphertext: bytes, associated: bytes, dealer: str) -> bytes:
    try:
        return cipher.decrypt(_ZERO_NONCE, ciphertext, associated)
    except InvalidTag:
        raise SecAggError(
            "secagg_bad_share", f"shares from {dealer} do not decrypt or were altered", dealer
        ) from None


def pairwise_seed(
    own_mask: X25519PrivateKey, peer_mask: bytes, own: str, peer: str, ctx: bytes
) -> bytes:
    """The seed of the mask `own` and `peer` share (the same from either side)."""
    low, high = sorted((own, peer))
    secret = exchange(own_mask, peer_mask, peer)
    return hkdf(secret, b"fedbell secagg pairwise v1\n" + ctx + f"{low}|{high}".encode())


def share_commitment(
    kind: bytes, ctx: bytes, dealer: str, recipient: str, *, salt: bytes, share: bytes
) -> bytes:
    """Hiding (salted) and binding commitment to one share, published by its dealer."""
    text = b"fedbell secagg share commitment v1\n" + kind + b"\n" + ctx
    text += f"{dealer}>{recipient}\n".encode() + salt + share
    return hashlib.sha256(text).digest()[:COMMITMENT_BYTES]


def seed_commitment(ctx: bytes, device: str, seed: bytes) -> bytes:
    """Commitment to a self-mask seed (128 random bits: the hash hides it)."""
    return hashlib.sha256(
        b"fedbell secagg seed v1\n" + ctx + device.encode() + b"\n" + seed
    ).digest()


def share_associated_data(
    ctx: bytes, dealer: str, recipient: str, self_commitment: str, key_commitment: str
) -> bytes:
    """What AES-GCM authenticates besides the ciphertext: who, which round, the commitments
    (so the server cannot swap a dealer's published commitments)."""
    return ctx + f"{dealer}>{recipient}\n{self_commitment}\n{key_commitment}".encode()
