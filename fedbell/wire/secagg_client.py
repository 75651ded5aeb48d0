"""The doorbell's side of secure aggregation: a state machine over bytes.

advertise -> share(roster) -> receive(inbox) -> masked_input(values) -> unmask(request),
each once, in this order. A refused message leaves the client where it was.
"""

from __future__ import annotations

import bisect
import operator
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedbell.wire import masking, shamir
from fedbell.wire.masking import prg
from fedbell.wire.secagg_messages import (
    SALT_BYTES,
    Advert,
    Inbox,
    Masked,
    Roster,
    SealedShare,
    SecAggError,
    Shares,
    UnmaskReply,
    UnmaskRequest,
    advert_at,
    b64,
    check_round,
    dump,
    exchange,
    hkdf,
    mask_key_from_seed,
    pairwise_seed,
    parse,
    public_bytes,
    record_keys,
    seal,
    seed_commitment,
    share_associated_data,
    share_cipher,
    share_commitment,
    sign_advert,
    unb64,
    unseal,
    verify_advert,
)
from fedbell.wire.secagg_params import MAX_DEVICES, SecAggParams, neighbours_of

MAX_LIST_BYTES = 400 * MAX_DEVICES
"""Parse limit of a roster, an inbox or an unmask request (a few hundred bytes a device)."""
_DEVICE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PLAINTEXT_BYTES = SALT_BYTES + 2 * shamir.SHARE_BYTES


@dataclass(frozen=True)
class _Held:
    """Shares a neighbour dealt to this doorbell."""

    salt: bytes
    self_share: bytes
    key_share: bytes


def check_sorted_names(names: tuple[str, ...], what: str) -> None:
    """SecAggError unless the names are strictly increasing (sorted, no duplicates)."""
    # map in C: a generator over 1,000 names took ~1 ms, four times a round per doorbell
    if not all(map(operator.lt, names, names[1:])):
        raise SecAggError("secagg_bad_message", f"{what} is not sorted without duplicates")


class SecAggClient:
    """One doorbell in one round. Keys and seeds are fresh per round (from `rng_seed` in tests).

    `identity` signs the advert (None: unsigned, for open test sites);
    `peer_keys` are the provisioned public keys the neighbours' adverts must
    verify against (None: not checked; then the server could swap a neighbour's
    keys for its own and read the shares dealt to it, so the guarantee is
    against an honest-but-curious server only). Not thread-safe.
    """

    def __init__(
        self,
        device: str,
        params: SecAggParams,
        identity: Ed25519PrivateKey | None,
        peer_keys: Mapping[str, Ed25519PublicKey] | None = None,
        rng_seed: bytes | None = None,
    ) -> None:
        if not _DEVICE.fullmatch(device):
            raise ValueError(f"device {device!r} is not 1-64 of [A-Za-z0-9_-]")
        self.device = device
        self.params = params
        self._identity = identity
        self._peer_keys = peer_keys
        self._rng_seed = rng_seed
        self._ctx = params.context()
        self._enc = X25519PrivateKey.from_private_bytes(self._random(32, b"enc key"))
        self._mask_seed = self._random(16, b"mask seed")
        self._mask = mask_key_from_seed(self._mask_seed)
        self._self_seed = self._random(16, b"self seed")
        self.stage = "new"
        self._advert: Advert | None = None
        self._peer_masks: dict[str, bytes] = {}
        """each neighbour's mask public key, raw (seeds the pairwise masks)"""
        self._neighbours: tuple[str, ...] = ()
        self._roster: frozenset[str] = frozenset()
        self._holders: frozenset[str] = frozenset()
        self._held: dict[str, _Held] = {}
        self._enc_secrets: dict[str, bytes] = {}
        """X25519 secret with each neighbour's enc key (deals and receives shares)"""

    def _random(self, size: int, label: bytes) -> bytes:
        if self._rng_seed is None:
            return os.urandom(size)
        info = b"fedbell secagg test randomness\n" + self._ctx + self.device.encode() + label
        return hkdf(self._rng_seed, info, size)

    def _expect(self, stage: str, step: str) -> None:
        if self.stage != stage:
            raise SecAggError(
                "secagg_wrong_phase", f"{self.device}: {step} in stage {self.stage}, not {stage}"
            )

    def advertise(self) -> bytes:
        """The signed advert of this round's two public keys."""
        self._expect("new", "advertise")
        advert = Advert(
            round=self.params.round_id,
            lineage=self.params.lineage,
            device=self.device,
            enc_key=b64(public_bytes(self._enc)),
            mask_key=b64(public_bytes(self._mask)),
        )
        if self._identity is not None:
            advert = sign_advert(advert, self._identity)
        self._advert, self.stage = advert, "advertised"
        return dump(advert)

    def share(self, roster: bytes) -> bytes:
        """Check the roster, then deal this doorbell's two seeds to its neighbours, encrypted.

        Every name of the roster is read (the neighbour graph is drawn on all of
        them) but only this doorbell's own advert and its k neighbours' are used:
        its own must be there unaltered, its neighbours' must verify against
        their provisioned keys (when `peer_keys` were given).
        """
        self._expect("advertised", "share")
        message = parse(roster, Roster, MAX_LIST_BYTES)
        params, me = self.params, self.device
        check_round(message, params, "roster", None)
        names = message.devices
        check_sorted_names(names, "roster")
        if len(message.records) != len(names):
            raise SecAggError("secagg_bad_message", "roster: not one record per device")
        position = bisect.bisect_left(names, me)
        if position == len(names) or names[position] != me:
            raise SecAggError("secagg_bad_roster", f"roster omits {me}'s advert")
        if len(names) < params.min_cohort:
            raise SecAggError(
                "secagg_below_min_cohort",
                f"roster of {len(names)} doorbells, min_cohort {params.min_cohort}",
            )
        if advert_at(message, position) != self._advert:
            raise SecAggError("secagg_bad_roster", f"roster alters {me}'s advert")
        neighbours = neighbours_of(me, names, params)
        public: dict[str, tuple[bytes, bytes]] = {}  # each neighbour's (enc, mask) key, raw
        for peer in neighbours:
            index = bisect.bisect_left(names, peer)
            if self._peer_keys is not None:
                key = self._peer_keys.get(peer)
                if key is None:
                    raise SecAggError("secagg_unknown_device", f"no trusted key for {peer}", peer)
                verify_advert(advert_at(message, index), key)
            enc_key, mask_key, _ = record_keys(message, index)
            public[peer] = (enc_key, mask_key)
        _, threshold = params.degree(len(names))
        self_shares = shamir.split(self._self_seed, threshold, len(neighbours))
        key_shares = shamir.split(self._mask_seed, threshold, len(neighbours))
        sealed, enc_secrets = [], {}
        for peer, self_share, key_share in zip(neighbours, self_shares, key_shares, strict=True):
            salt = os.urandom(SALT_BYTES)
            commitments = (
                b64(share_commitment(b"self", self._ctx, me, peer, salt=salt, share=self_share)),
                b64(share_commitment(b"key", self._ctx, me, peer, salt=salt, share=key_share)),
            )
            enc_secrets[peer] = exchange(self._enc, public[peer][0], peer)
            cipher = share_cipher(enc_secrets[peer], dealer=me, recipient=peer, ctx=self._ctx)
            associated = share_associated_data(self._ctx, me, peer, *commitments)
            sealed.append(
                SealedShare(
                    peer=peer,
                    ciphertext=b64(seal(cipher, salt + self_share + key_share, associated)),
                    self_commitment=commitments[0],
                    key_commitment=commitments[1],
                )
            )
        self._peer_masks = {peer: keys[1] for peer, keys in public.items()}
        self._enc_secrets = enc_secrets
        self._roster = frozenset(names)
        self._neighbours, self.stage = neighbours, "shared"
        return dump(
            Shares(
                round=params.round_id,
                lineage=params.lineage,
                device=me,
                seed_commitment=b64(seed_commitment(self._ctx, me, self._self_seed)),
                shares=tuple(sealed),
            )
        )

    def receive(self, inbox: bytes, holder_names: Sequence[str]) -> None:
        """Decrypt and check the shares the neighbours dealt to this doorbell.

        `holder_names`: every doorbell whose shares the server holds (they alone mask),
        sorted, as the server published them to all (the signed send announcement).
        """
        self._expect("shared", "receive")
        message = parse(inbox, Inbox, MAX_LIST_BYTES)
        params, me = self.params, self.device
        check_round(message, params, "inbox", None)
        if message.device != me:
            raise SecAggError("secagg_bad_inbox", f"inbox of {message.device} sent to {me}")
        check_sorted_names(tuple(holder_names), "holders")
        holders = frozenset(holder_names)
        if not holders <= self._roster:
            raise SecAggError("secagg_bad_inbox", "holders outside the roster")
        if me not in holders or len(holders) < params.min_cohort:
            raise SecAggError(
                "secagg_below_min_cohort" if me in holders else "secagg_bad_inbox",
                f"{len(holders)} doorbells hold shares (min_cohort {params.min_cohort}), "
                f"{me} {'among' if me in holders else 'not among'} them",
            )
        dealers = tuple(peer for peer in self._neighbours if peer in holders)
        if tuple(entry.peer for entry in message.shares) != dealers:
            raise SecAggError(
                "secagg_bad_inbox", f"{me} expected shares from exactly {', '.join(dealers)}"
            )
        held = {}
        for entry in message.shares:
            dealer = entry.peer
            cipher = share_cipher(
                self._enc_secrets[dealer], dealer=dealer, recipient=me, ctx=self._ctx
            )
            ciphertext = unb64(entry.ciphertext, _PLAINTEXT_BYTES + 16, "ciphertext", dealer)
            associated = share_associated_data(
                self._ctx, dealer, me, entry.self_commitment, entry.key_commitment
            )
            plain = unseal(cipher, ciphertext, associated, dealer)
            salt, self_share, key_share = (
                plain[:SALT_BYTES],
                plain[SALT_BYTES : SALT_BYTES + shamir.SHARE_BYTES],
                plain[SALT_BYTES + shamir.SHARE_BYTES :],
            )
            committed = (
                share_commitment(b"self", self._ctx, dealer, me, salt=salt, share=self_share),
                share_commitment(b"key", self._ctx, dealer, me, salt=salt, share=key_share),
            )
            published = (
                unb64(entry.self_commitment, len(committed[0]), "self_commitment", dealer),
                unb64(entry.key_commitment, len(committed[1]), "key_commitment", dealer),
            )
            in_field = all(int.from_bytes(s, "big") < shamir.PRIME for s in (self_share, key_share))
            if committed != published or not in_field:
                raise SecAggError(
                    "secagg_bad_share",
                    f"{dealer} dealt {me} shares that do not match its own commitments",
                    dealer,
                )
            held[dealer] = _Held(salt, self_share, key_share)
        self._holders, self._held, self.stage = holders, held, "received"

    def masked_input(self, values: np.ndarray) -> bytes:
        """values (uint32, from masking.encode) + self mask +/- pairwise masks; sent mod 2^24."""
        self._expect("received", "masked_input")
        size = self.params.size
        if not (isinstance(values, np.ndarray) and values.dtype == np.uint32):
            raise SecAggError("secagg_wrong_size", f"{self.device}: masked values must be uint32")
        if values.shape != (size,):
            raise SecAggError(
                "secagg_wrong_size", f"{self.device}: {values.shape} values, round masks ({size},)"
            )
        total = values + prg(self._self_seed, size)
        for peer in self._neighbours:
            if peer not in self._holders:
                continue
            seed = pairwise_seed(self._mask, self._peer_masks[peer], self.device, peer, self._ctx)
            mask = prg(seed, size)
            total = total + mask if self.device < peer else total - mask
        self.stage = "masked"
        return dump(
            Masked(
                round=self.params.round_id,
                lineage=self.params.lineage,
                device=self.device,
                values=b64(masking.pack(total)),
            )
        )

    def unmask(self, request: bytes) -> bytes:
        """Reveal, per neighbour, the self-seed share (survived) or the mask-key share (dropped).

        Never both for one doorbell, and only once per round: a request that
        names a doorbell in both lists, leaves out one that holds shares, or
        would reveal a sum of fewer than min_cohort is refused.
        """
        self._expect("masked", "unmask")
        message = parse(request, UnmaskRequest, MAX_LIST_BYTES)
        params, me = self.params, self.device
        check_round(message, params, "unmask request", None)
        check_sorted_names(message.survivors, "survivors")
        check_sorted_names(message.dropped, "dropped")
        survivors, dropped = frozenset(message.survivors), frozenset(message.dropped)
        both = survivors & dropped
        if both:
            raise SecAggError(
                "secagg_both_secrets",
                f"request asks for both secrets of {', '.join(sorted(both))}: refused, "
                "it would unmask a single house",
            )
        if survivors | dropped != self._holders:
            raise SecAggError(
                "secagg_bad_request", "survivors and dropped are not exactly the share holders"
            )
        if me not in survivors or len(survivors) < params.min_cohort:
            raise SecAggError(
                "secagg_below_min_cohort",
                f"{len(survivors)} survivors (min_cohort {params.min_cohort}), "
                f"{me} {'among' if me in survivors else 'not among'} them",
            )
        self_shares, key_shares = bytearray(), bytearray()
        for dealer, held in sorted(self._held.items()):
            if dealer in survivors:
                self_shares += held.self_share + held.salt
            else:
                key_shares += held.key_share + held.salt
        self.stage = "done"
        return dump(
            UnmaskReply(
                round=params.round_id,
                lineage=params.lineage,
                device=me,
                self_shares=b64(bytes(self_shares)),
                key_shares=b64(bytes(key_shares)),
            )
        )
