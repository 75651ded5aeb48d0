"""JSON from the network, bounded in size and nesting before any parser sees it.

A payload of 5,000 `[` makes `json.loads` raise RecursionError; raised in a
paho callback, that kills paho's network thread and the client hears nothing
more (DESIGN.md pitfalls). Every JSON payload a callback reads goes through
`check_shape` (size, then nesting depth, counted without recursion) and
`loads` turns every failure into a RejectedMessage with a stable reason.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fedbell.errors import RejectedMessage

MAX_JSON_BYTES = 64 * 1024
"""No command, label, round or status message comes near this."""
MAX_JSON_DEPTH = 16
"""The deepest fedbell message nests 3 levels; Home Assistant's discovery 5."""

# A JSON string, written as runs of plain characters between escapes: the same matches
# as '"(?:[^"\\]|\\.)*"', which tried one character per alternation and took 13 ms on a
# secure round's roster of 1,000 key adverts (278 kB), read by every doorbell of the round
# (2 ms this way; bench.cluster's doorbells parse 1,000 of them).
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_OPEN = frozenset(b"[{")


def check_shape(
    payload: bytes, *, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH
) -> None:
    """RejectedMessage("too_large" | "too_deep") unless the payload is within bounds.

    Brackets inside strings do not count; an unterminated string's brackets do
    (the payload is not valid JSON anyway).
    """
    if len(payload) > max_bytes:
        raise RejectedMessage("too_large", f"{len(payload)} bytes of JSON, limit {max_bytes}")
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b'""', payload)):
        if match.group()[0] in _OPEN:
            depth += 1
            if depth > max_depth:
                raise RejectedMessage("too_deep", f"JSON nested deeper than {max_depth} levels")
        else:
            depth -= 1


def loads(payload: bytes, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The decoded JSON value, or RejectedMessage saying why not (never anything else)."""
    check_shape(payload, max_bytes=max_bytes)
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RejectedMessage("bad_json", f"not JSON: {err}") from None
