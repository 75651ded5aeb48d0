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
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedbell.errors import ConfigError, RejectedMessage
from fedbell.wire.envelope import Header
from fedbell.wire.protocol import RoundAnnouncement

log = logging.getLogger(__name__)


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


RESCAN_SHARE = 0.01
"""At most this share of the caller's time goes to looking at every key file again."""


class KeyRing:
    """The trusted public keys of a folder, kept current while the process runs.

    `keys()` looks at the folder itself on every call (one `stat`: adding or
    deleting a `<name>.pub` changes it, so `provision remove-device` revokes
    at once and a new doorbell is trusted at once), at every file at most every
    `rescan_s` (a key rewritten in place), and re-reads everything after
    `request_reload()` (SIGHUP). A folder that fails to load keeps the last
    good keys, minus any whose file is gone, and says why in `error`.

    Looking at every file costs one `stat` each: with 10,000 doorbells a scan
    took 0.43 s on the loaded machine (0.17 s through os.scandir), and a scan
    every second took ~40 % of the aggregator's main loop in a round on the
    federation tier (docs/many-houses.md). So the files are looked at no more
    often than keeps that below RESCAN_SHARE of the time (every 17 s at 0.17 s).
    """

    def __init__(
        self, folder: Path, rescan_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.folder = folder
        self.rescan_s = rescan_s
        self.clock = clock
        self.reloads = 0
        self.error: str | None = None
        self._lock = threading.Lock()
        self._reload_requested = False
        self._keys = load_public_keys(folder)  # a bad folder at start is a config error
        self._scan_s = 0.0  # what the last look at every file took
        self._folder_stamp = self._stamp_folder()
        self._files_stamp = self._stamp_files()
        self._scanned_at = clock()

    def request_reload(self) -> None:
        """Re-read every key on the next `keys()` (safe from a signal handler)."""
        self._reload_requested = True

    def keys(self) -> dict[str, Ed25519PublicKey]:
        with self._lock:
            folder = self._stamp_folder()
            interval = max(self.rescan_s, self._scan_s / RESCAN_SHARE)
            due = self.clock() - self._scanned_at >= interval
            files = self._stamp_files() if due or self._reload_requested else self._files_stamp
            if due or self._reload_requested:
                self._scanned_at = self.clock()
            if self._reload_requested or folder != self._folder_stamp or files != self._files_stamp:
                self._reload_requested = False
                self._folder_stamp, self._files_stamp = folder, self._stamp_files()
                self._load()
            return self._keys

    def _load(self) -> None:
        self.reloads += 1
        try:
            keys = load_public_keys(self.folder)
        except ConfigError as err:
            present = {path.stem for path in self.folder.glob("*.pub")}
            self._keys = {name: key for name, key in self._keys.items() if name in present}
            self.error = str(err)
            log.error("trusted keys not reloaded (kept %d): %s", len(self._keys), err)
            return
        added, removed = sorted(set(keys) - set(self._keys)), sorted(set(self._keys) - set(keys))
        self._keys, self.error = keys, None
        log.info(
            "trusted keys reloaded from %s: %d keys%s%s",
            self.folder,
            len(keys),
            f", added {', '.join(added)}" if added else "",
            f", revoked {', '.join(removed)}" if removed else "",
        )

    def _stamp_folder(self) -> tuple[int, int]:
        try:
            stat = self.folder.stat()
        except OSError:
            return (0, 0)
        return (stat.st_mtime_ns, stat.st_ino)

    def _stamp_files(self) -> tuple[tuple[str, int, int], ...]:
        started = time.perf_counter()
        stamps = []
        try:
            # os.scandir, not Path.glob: a third of the time for 10,000 files.
            entries = list(os.scandir(self.folder))
        except OSError:
            entries = []
        for entry in entries:
            if not entry.name.endswith(".pub"):
                continue
            try:
                stat = entry.stat()
            except OSError:
                continue
            stamps.append((entry.name, stat.st_mtime_ns, stat.st_size))
        stamps.sort()
        self._scan_s = time.perf_counter() - started
        return tuple(stamps)


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
