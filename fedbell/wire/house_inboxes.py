"""A house's secure-aggregation inboxes in a few messages, for the federation tier.

On the tier (docs/many-houses.md) the aggregator sends the inboxes of one
house's doorbells to that house's hub in messages of at most `MAX_BUNDLE_BYTES`
(the house broker's message size limit) instead of one message each: each
message is one JetStream store on three nodes, and 1,000 of them in a row
took ~4 s of a round of 1,000 (bench.cluster). The hub's Retainer
(broker/cluster_hub.py) hands each doorbell its own inbox on its own topic, byte
for byte, so a doorbell reads an inbox as on a house's own broker.

A bundle is a header line naming the round, then per inbox a line
`<device> <length>` and the inbox's bytes. The round lets the Retainer skip a
bundle of an earlier round that the tier sends again after a reconnection
(bundles are retained, and a house may need fewer parts this round).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from fedbell.wire.topics import check_segment

MAX_BUNDLE_BYTES = 1_000_000
"""Below the house brokers' message_size_limit (1 MiB, broker/production.conf)."""
_HEADER = re.compile(rb"fedbell secagg inboxes v1 round ([0-9]{1,12})\n")
_ENTRY = re.compile(rb"([A-Za-z0-9_-]{1,64}) ([0-9]{1,7})\n")


def pack(round_id: int, inboxes: Sequence[tuple[str, bytes]]) -> list[bytes]:
    """The (device, inbox) pairs in as few bundles of at most MAX_BUNDLE_BYTES as
    their order allows; ValueError for an inbox that alone does not fit."""
    header = f"fedbell secagg inboxes v1 round {round_id}\n".encode()
    bundles, current = [], bytearray(header)
    for device, inbox in inboxes:
        entry = f"{check_segment(device, 'device id')} {len(inbox)}\n".encode() + inbox
        if len(header) + len(entry) > MAX_BUNDLE_BYTES:
            raise ValueError(f"the inbox of {device} alone exceeds {MAX_BUNDLE_BYTES} bytes")
        if len(current) + len(entry) > MAX_BUNDLE_BYTES:
            bundles.append(bytes(current))
            current = bytearray(header)
        current += entry
    if len(current) > len(header):
        bundles.append(bytes(current))
    return bundles


def unpack(bundle: bytes) -> tuple[int, list[tuple[str, bytes]]]:
    """(round, [(device, inbox)]) of a bundle; ValueError unless it is exactly pack's form."""
    header = _HEADER.match(bundle)
    if header is None:
        raise ValueError("not a bundle of inboxes")
    inboxes, at = [], header.end()
    while at < len(bundle):
        entry = _ENTRY.match(bundle, at)
        if entry is None:
            raise ValueError(f"no inbox header at byte {at}")
        end = entry.end() + int(entry.group(2))
        if end > len(bundle):
            raise ValueError(f"the inbox of {entry.group(1).decode()} is cut short")
        inboxes.append((entry.group(1).decode(), bundle[entry.end() : end]))
        at = end
    return int(header.group(1)), inboxes
