"""Ed25519 signatures on envelope headers.

The broker's ACL stops a device from publishing under another's name, but a
leaked broker password alone must not let anyone poison the model: every
update is signed with its device's own key and every model and round
announcement with the aggregator's, and readers check against public keys
they were given at provisioning time (`<name>.pub`, PEM), never against keys
from the network.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedbell.envelope import Header
from fedbell.errors import ConfigError, RejectedMessage
from fedbell.protocol import RoundAnnouncement


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read an Ed25519 private key: {err}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read an Ed25519 public key: {err}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def load_public_keys(folder: Path) -> dict[str, Ed25519PublicKey]:
    """`<name>.pub` files of a folder, keyed by name (device id or 'aggregator')."""
    if not folder.is_dir():
        raise ConfigError(f"{folder}: trusted keys folder does not exist")
    return {path.stem: load_public_key(path) for path in sorted(folder.glob("*.pub"))}


def sign(header: Header, key: Ed25519PrivateKey) -> Header:
    signature = base64.b64encode(key.sign(header.signed_bytes())).decode()
    return header.model_copy(update={"signature": signature})


def verify(header: Header, keys: dict[str, Ed25519PublicKey]) -> None:
    """Check the header's signature against its sender's trusted key."""
    key = keys.get(header.sender)
    if key is None:
        raise RejectedMessage("unknown_signer", f"no trusted key for {header.sender!r}")
    if header.signature is None:
        raise RejectedMessage("unsigned", f"message from {header.sender!r} is not signed")
    try:
        key.verify(base64.b64decode(header.signature, validate=True), header.signed_bytes())
    except (InvalidSignature, ValueError):
        raise RejectedMessage(
            "bad_signature", f"signature of {header.sender!r} does not verify"
        ) from None


ROUND_CONTEXT = b"fedbell round announcement\n"
"""Prefix of what a round signature covers: never valid as an envelope header's."""


def _announcement_bytes(announcement: RoundAnnouncement, site: str) -> bytes:
    fields = announcement.model_dump(mode="json", exclude={"signature"})
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return ROUND_CONTEXT + site.encode() + b"\n" + canonical.encode()


def sign_announcement(
    announcement: RoundAnnouncement, site: str, key: Ed25519PrivateKey
) -> RoundAnnouncement:
    """The announcement with the aggregator's signature over all its fields and the site."""
    unsigned = announcement.model_copy(update={"signature": None})
    signature = base64.b64encode(key.sign(_announcement_bytes(unsigned, site))).decode()
    return unsigned.model_copy(update={"signature": signature})


def verify_announcement(
    announcement: RoundAnnouncement, site: str, key: Ed25519PublicKey | None
) -> None:
    """RejectedMessage unless `key` (the aggregator's) signed exactly this announcement."""
    if key is None:
        raise RejectedMessage("unknown_signer", "no trusted key for the aggregator")
    if announcement.signature is None:
        raise RejectedMessage("unsigned", f"round {announcement.round} announcement is not signed")
    try:
        key.verify(
            base64.b64decode(announcement.signature, validate=True),
            _announcement_bytes(announcement, site),
        )
    except (InvalidSignature, ValueError):
        raise RejectedMessage(
            "bad_signature", f"round {announcement.round} announcement signature does not verify"
        ) from None


def write_key_pair(private_path: Path, public_path: Path) -> None:
    """A fresh key pair; the private file is readable by its owner only."""
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    private_path.touch(mode=0o600)
    private_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
