"""The aggregator's side of secure aggregation: a state machine over bytes.

Phases: adverts -> (roster) shares -> (first inbox) masked -> (unmask_request)
unmask -> (result) done, or failed. A refused message is counted in `counters`
by reason and changes nothing; the same message delivered twice (MQTT QoS 1) is
accepted once and then ignored, a different one from the same doorbell refused.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedbell.wire import masking, shamir
from fedbell.wire import secagg_messages as messages
from fedbell.wire.masking import prg
from fedbell.wire.secagg_messages import (
    COMMITMENT_BYTES,
    KEY_BYTES,
    REVEALED_BYTES,
    SALT_BYTES,
    SecAggError,
    check_round,
    dump,
    mask_key_from_seed,
    pairwise_seed,
    parse,
    public_bytes,
    seed_commitment,
    share_commitment,
    unb64,
    verify_advert,
)
from fedbell.wire.secagg_params import SecAggParams, neighbour_graph

_DEVICE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CIPHERTEXT_BYTES = SALT_BYTES + 2 * shamir.SHARE_BYTES + 16


class SecAggServer:
    """The aggregator in one round; it only ever learns the sum of >= min_cohort inputs.

    Not thread-safe: feed it from one thread (or under one lock).

    `device_keys` are the provisioned Ed25519 keys adverts must verify against
    (None: not checked); `selected` are the doorbells the round announced.
    """

    def __init__(
        self,
        params: SecAggParams,
        device_keys: Mapping[str, Ed25519PublicKey] | None,
        selected: Sequence[str],
    ) -> None:
        bad = [name for name in selected if not _DEVICE.fullmatch(name)]
        if bad:
            raise ValueError(f"device names {bad!r} are not 1-64 of [A-Za-z0-9_-]")
        self.params = params
        self.selected = frozenset(selected)
        self.phase = "adverts"
        self.counters: Counter[str] = Counter()
        self._keys = device_keys
        self._ctx = params.context()
        self._adverts: dict[str, messages.Advert] = {}
        self._records: dict[str, str] = {}
        """Each accepted advert's roster record (messages.advert_record), in base64"""
        self._key_owners: dict[bytes, str] = {}
        """Every advertised public key (raw) -> its doorbell (a copied key is refused)"""
        self._roster: bytes | None = None
        self._graph: dict[str, tuple[str, ...]] = {}
        self._threshold = 0
        self._shares: dict[str, messages.Shares] = {}
        self._dealt: dict[str, dict[str, messages.SealedShare]] = {}
        """dealer -> recipient -> the sealed share (with its commitments)"""
        self._commitments: dict[str, dict[str, tuple[bytes, bytes]]] = {}
        """dealer -> recipient -> (commitment to its self-seed share, to its key share)"""
        self._survivors: frozenset[str] = frozenset()
        self._dropped: frozenset[str] = frozenset()
        self._position: dict[str, dict[str, int]] = {}
        """dealer -> neighbour -> the x of the neighbour's share (1..k)"""
        self._holders: tuple[str, ...] = ()
        self._masked: dict[str, tuple[messages.Masked, np.ndarray]] = {}
        self._request: messages.UnmaskRequest | None = None
        self._replies: dict[str, messages.UnmaskReply] = {}
        self._points: dict[str, dict[int, bytes]] = {}
        self._result: tuple[np.ndarray, tuple[str, ...]] | None = None

    @contextmanager
    def _counting(self) -> Iterator[None]:
        try:
            yield
        except SecAggError as err:
            self.counters[err.reason] += 1
            raise

    def _expect(self, phase: str, step: str, device: str | None = None) -> None:
        if self.phase != phase:
            raise SecAggError(
                "secagg_wrong_phase", f"{step} in phase {self.phase}, expected {phase}", device
            )

    def _member(self, device: str, group: Collection[str], what: str) -> None:
        if device not in group:
            raise SecAggError("secagg_unknown_device", f"{device} is not {what}", device)

    @staticmethod
    def _sender(message_device: str, device: str, what: str) -> None:
        if message_device != device:
            raise SecAggError(
                "secagg_wrong_sender", f"{what} of {message_device} sent by {device}", device
            )

    def add_advert(self, device: str, payload: bytes) -> None:
        with self._counting():
            self._expect("adverts", "advert", device)
            self._member(device, self.selected, "selected this round")
            advert = parse(payload, messages.Advert, 1024)
            check_round(advert, self.params, f"advert of {device}", device)
            self._sender(advert.device, device, "advert")
            if self._keys is not None:
                key = self._keys.get(device)
                if key is None:
                    raise SecAggError(
                        "secagg_unknown_device", f"no trusted key for {device}", device
                    )
                verify_advert(advert, key)
            if self._duplicate(self._adverts.get(device), advert, device, "advert"):
                return
            record = messages.advert_record(advert)
            enc_key, mask_key = record[:KEY_BYTES], record[KEY_BYTES : 2 * KEY_BYTES]
            for public in (enc_key, mask_key):
                if public in self._key_owners:
                    raise SecAggError(
                        "secagg_duplicate",
                        f"{device} advertised a key of {self._key_owners[public]}",
                        device,
                    )
            if enc_key == mask_key:
                raise SecAggError("secagg_duplicate", f"{device} advertised one key twice", device)
            self._records[device] = messages.b64(record)
            self._adverts[device] = advert
            self._key_owners.update({enc_key: device, mask_key: device})

    @staticmethod
    def _duplicate(previous: object, message: object, device: str, what: str) -> bool:
        """True for a redelivered copy (ignore it); SecAggError for a different second one."""
        if previous is None:
            return False
        if previous == message:
            return True
        raise SecAggError("secagg_duplicate", f"a second, different {what} from {device}", device)

    def roster(self) -> bytes:
        """The adverts received, sorted: closes the advert phase (the same bytes every call)."""
        with self._counting():
            if self._roster is not None:
                return self._roster
            self._expect("adverts", "roster")
            self._at_least(len(self._adverts), "adverts")
            names = sorted(self._adverts)
            self._graph = neighbour_graph(names, self.params)
            _, self._threshold = self.params.degree(len(names))
            self._position = {
                name: {peer: x for x, peer in enumerate(peers, start=1)}
                for name, peers in self._graph.items()
            }
            self._roster = dump(
                messages.Roster(
                    round=self.params.round_id,
                    lineage=self.params.lineage,
                    devices=tuple(names),
                    records=tuple(self._records[name] for name in names),
                )
            )
            self.phase = "shares"
            return self._roster

    def _at_least(self, count: int, what: str, fail: bool = False) -> None:
        if count < self.params.min_cohort:
            if fail:
                self.phase = "failed"
            raise SecAggError(
                "secagg_below_min_cohort",
                f"{count} {what}, min_cohort {self.params.min_cohort}: nothing is revealed",
            )

    def add_shares(self, device: str, payload: bytes) -> None:
        with self._counting():
            self._expect("shares", "shares", device)
            self._member(device, self._graph.keys(), "in the roster")
            limit = 1024 + 400 * len(self._graph[device])
            message = parse(payload, messages.Shares, limit)
            check_round(message, self.params, f"shares of {device}", device)
            self._sender(message.device, device, "shares")
            unb64(message.seed_commitment, 32, "seed_commitment", device)
            peers = tuple(entry.peer for entry in message.shares)
            if peers != self._graph[device]:
                raise SecAggError(
                    "secagg_bad_share", f"{device} must deal one share to each neighbour", device
                )
            commitments = {}
            for entry in message.shares:
                unb64(entry.ciphertext, _CIPHERTEXT_BYTES, "ciphertext", device)
                commitments[entry.peer] = (
                    unb64(entry.self_commitment, COMMITMENT_BYTES, "self_commitment", device),
                    unb64(entry.key_commitment, COMMITMENT_BYTES, "key_commitment", device),
                )
            if not self._duplicate(self._shares.get(device), message, device, "shares"):
                self._shares[device] = message
                self._dealt[device] = {entry.peer: entry for entry in message.shares}
                self._commitments[device] = commitments

    @property
    def holders(self) -> tuple[str, ...]:
        """The doorbells whose shares arrived, sorted (they alone mask): what the server
        publishes to every doorbell with the inboxes (empty before the first `inbox`)."""
        return self._holders

    def inbox(self, device: str) -> bytes:
        """The shares dealt to `device`. The first call closes the share phase."""
        with self._counting():
            if self.phase == "shares":
                self._at_least(len(self._shares), "doorbells dealt shares", fail=True)
                self._holders = tuple(sorted(self._shares))
                self.phase = "masked"
            self._expect("masked", "inbox", device)
            self._member(device, self._shares.keys(), "a share holder")
            entries = []
            for dealer in self._graph[device]:
                if dealer in self._shares:
                    entry = self._dealt[dealer][device]
                    entries.append(entry.model_copy(update={"peer": dealer}))
            return dump(
                messages.Inbox(
                    round=self.params.round_id,
                    lineage=self.params.lineage,
                    device=device,
                    shares=tuple(entries),
                )
            )

    def add_masked(self, device: str, payload: bytes) -> None:
        with self._counting():
            self._expect("masked", "masked input", device)
            self._member(device, self._shares.keys(), "a share holder")
            expected = masking.VALUE_BYTES * self.params.size
            limit = 512 + 2 * expected
            if len(payload) > limit:
                raise SecAggError(
                    "secagg_wrong_size",
                    f"masked input of {len(payload)} bytes from {device}",
                    device,
                )
            message = parse(payload, messages.Masked, limit)
            check_round(message, self.params, f"masked input of {device}", device)
            self._sender(message.device, device, "masked input")
            raw = unb64(message.values, None, "values", device)
            if len(raw) != expected:
                raise SecAggError(
                    "secagg_wrong_size",
                    f"{device} masked {len(raw) / masking.VALUE_BYTES:g} values, the round masks"
                    f" {self.params.size}",
                    device,
                )
            previous = self._masked.get(device)
            if self._duplicate(
                None if previous is None else previous[0], message, device, "masked input"
            ):
                return
            self._masked[device] = (message, masking.unpack(raw))

    def unmask_request(self) -> bytes:
        """Survivors (masked input arrived) and dropped holders: closes the masked phase.

        Fewer than min_cohort survivors: the round fails closed (nothing is unmasked).
        """
        with self._counting():
            if self._request is not None:
                return dump(self._request)
            self._expect("masked", "unmask request")
            self._at_least(len(self._masked), "masked inputs", fail=True)
            survivors = tuple(sorted(self._masked))
            self._request = messages.UnmaskRequest(
                round=self.params.round_id,
                lineage=self.params.lineage,
                survivors=survivors,
                dropped=tuple(name for name in self._holders if name not in self._masked),
            )
            self._survivors = frozenset(self._request.survivors)
            self._dropped = frozenset(self._request.dropped)
            self.phase = "unmask"
            return dump(self._request)

    def add_unmask(self, device: str, payload: bytes) -> None:
        """A survivor's revealed shares, each checked against its dealer's commitment.

        One share that does not match names `device` (secagg_bad_share) and the
        whole reply is dropped; reconstruction goes on with the other replies.
        """
        with self._counting():
            self._expect("unmask", "unmask reply", device)
            assert self._request is not None
            self._member(device, self._request.survivors, "a survivor")
            limit = 1024 + 2 * REVEALED_BYTES * len(self._graph[device])
            message = parse(payload, messages.UnmaskReply, limit)
            check_round(message, self.params, f"unmask reply of {device}", device)
            self._sender(message.device, device, "unmask reply")
            if self._duplicate(self._replies.get(device), message, device, "unmask reply"):
                return
            neighbours = self._graph[device]
            points: list[tuple[str, int, bytes]] = []
            for kind, packed, owners in (
                (b"self", message.self_shares, [n for n in neighbours if n in self._survivors]),
                (b"key", message.key_shares, [n for n in neighbours if n in self._dropped]),
            ):
                revealed = unb64(packed, None, f"{kind.decode()}_shares", device)
                if len(revealed) != REVEALED_BYTES * len(owners):
                    raise SecAggError(
                        "secagg_bad_share",
                        f"{device} must reveal {kind.decode()} shares of exactly "
                        f"{len(owners)} neighbours ({len(revealed)} bytes)",
                        device,
                    )
                for i, owner in enumerate(owners):
                    value = revealed[i * REVEALED_BYTES : i * REVEALED_BYTES + shamir.SHARE_BYTES]
                    salt = revealed[
                        i * REVEALED_BYTES + shamir.SHARE_BYTES : (i + 1) * REVEALED_BYTES
                    ]
                    committed = share_commitment(
                        kind, self._ctx, owner, device, salt=salt, share=value
                    )
                    if self._commitments[owner][device][kind == b"key"] != committed:
                        raise SecAggError(
                            "secagg_bad_share",
                            f"{device} revealed a {kind.decode()} share of {owner} that "
                            "does not match the share it was dealt",
                            device,
                        )
                    points.append((owner, self._position[owner][device], value))
            self._replies[device] = message
            for owner, x, value in points:
                self._points.setdefault(owner, {})[x] = value

    def _enough_shares(self, owner: str) -> None:
        points = self._points.get(owner, {})
        if len(points) < self._threshold:
            raise SecAggError(
                "secagg_unrecoverable",
                f"{len(points)} honest shares of {owner}, {self._threshold} needed",
                owner,
            )

    def _seed(self, owner: str) -> bytes:
        """The owner's secret (its shares counted first: `_enough_shares`)."""
        return shamir.combine(sorted(self._points[owner].items())[: self._threshold])

    def result(self) -> tuple[np.ndarray, tuple[str, ...]]:
        """(sum of the survivors' inputs modulo 2^24 as uint32, survivors), every mask removed.

        A dealer whose honest shares do not rebuild its committed seed or
        advertised key dealt inconsistent shares: secagg_bad_share names it and
        the round fails. Too few shares yet: secagg_unrecoverable (more replies
        may still come).
        """
        with self._counting():
            if self._result is not None:
                return self._result
            self._expect("unmask", "result")
            assert self._request is not None
            owners = (*self._request.survivors, *self._request.dropped)
            # Enough shares of every secret before rebuilding any: the aggregator asks
            # after each unmask answer, and rebuilding every secret that already could be,
            # each time, cost 2.5 s of CPU in bench.cluster's round of 1,000.
            for owner in owners:
                self._enough_shares(owner)
            size = self.params.size
            total = np.zeros(size, dtype=np.uint32)
            seeds = {owner: self._seed(owner) for owner in self._request.survivors}
            keys = {owner: self._seed(owner) for owner in self._request.dropped}
            for owner, seed in seeds.items():
                if seed_commitment(self._ctx, owner, seed) != unb64(
                    self._shares[owner].seed_commitment, 32, "seed_commitment", owner
                ):
                    self.phase = "failed"
                    raise SecAggError(
                        "secagg_bad_share", f"{owner} dealt shares of no single self seed", owner
                    )
                total += self._masked[owner][1]
                total -= prg(seed, size)
            for owner, seed in keys.items():
                mask_key = mask_key_from_seed(seed)
                if public_bytes(mask_key) != unb64(self._adverts[owner].mask_key, 32, "mask_key"):
                    self.phase = "failed"
                    raise SecAggError(
                        "secagg_bad_share", f"{owner} dealt shares of no advertised mask key", owner
                    )
                for peer in self._graph[owner]:
                    if peer not in self._survivors:
                        continue
                    peer_mask = unb64(self._adverts[peer].mask_key, 32, "mask_key", peer)
                    mask = prg(pairwise_seed(mask_key, peer_mask, owner, peer, self._ctx), size)
                    # the survivor added +mask if its name sorts first, else -mask
                    total = total - mask if peer < owner else total + mask
            self._result = (masking.reduce(total), self._request.survivors)
            self.phase = "done"
            return self._result
