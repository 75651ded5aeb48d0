"""The JSON schema of every message the console reads, written for the page.

The page checks each payload against the schema of the model its producer
builds it with: the aggregator's and doorbells' statuses, rounds, metrics and
replies (fedbell/wire/protocol.py) and the doorbells' events (edge/events.py).
The file is generated, never written by hand, and a test regenerates it and
compares, so the page and the producers cannot drift apart:

    python -m console.schema    # rewrites console/static/messages.js

A part that stands in several schemas (a round summary's fields are also a
metrics message's) is written once, in MESSAGE_PARTS, and referenced where it
stands: the page reads the same objects, and the file says each thing once.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from console import STATIC_DIR
from edge.events import RingEvent, VisitorEvent
from fedbell.wire.protocol import DeviceStatus, Reply, RoundAnnouncement, RoundMetrics

SCHEMA_FILE = STATIC_DIR / "messages.js"

MESSAGES: dict[str, type[BaseModel]] = {
    "round": RoundAnnouncement,
    "metrics": RoundMetrics,
    "status": DeviceStatus,  # the doorbells' and the aggregator's
    "reply": Reply,
    "visitor": VisitorEvent,
    "ring": RingEvent,
}
"""The page's name for each message -> the model its producer builds it with."""


def schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in MESSAGES.items()}


SHARED_MIN_CHARS = 80
"""A repeated part shorter than this (a field's title and type) is written again: a
reference would say little less."""
LINE_CHARS = 100
"""An object or list that fits in a line of this many characters is written on one."""


class _Part(str):
    """Where a part of MESSAGE_PARTS stood: the part's name."""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _named_objects(tree: Any) -> list[tuple[str, Any]]:
    """Every object in `tree` that stands under a key (a property, a definition), in order."""
    found: list[tuple[str, Any]] = []
    if isinstance(tree, dict):
        for key, value in sorted(tree.items()):
            if isinstance(value, dict):
                found.append((key, value))
            found += _named_objects(value)
    elif isinstance(tree, list):
        for value in tree:
            found += _named_objects(value)
    return found


def _replace(tree: Any, canonical: str, part: _Part) -> Any:
    if isinstance(tree, dict):
        if _canonical(tree) == canonical:
            return part
        return {key: _replace(value, canonical, part) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_replace(value, canonical, part) for value in tree]
    return tree


def factor(tree: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tree, parts): each object standing more than once in tree moved into parts, by name.

    The largest repeat goes first, so a part found later may stand inside an earlier one
    (never the other way round).
    """
    parts: dict[str, Any] = {}
    while True:
        counts: dict[str, int] = {}
        names: dict[str, str] = {}
        for key, value in _named_objects([tree, *parts.values()]):
            canonical = _canonical(value)
            counts[canonical] = counts.get(canonical, 0) + 1
            names.setdefault(canonical, key)
        repeated = [c for c, n in counts.items() if n > 1 and len(c) >= SHARED_MIN_CHARS]
        if not repeated:
            return tree, parts
        canonical = max(repeated, key=lambda c: (len(c), c))
        name = names[canonical]
        while name in parts:
            name += "_"
        tree = _replace(tree, canonical, _Part(name))
        parts = {key: _replace(value, canonical, _Part(name)) for key, value in parts.items()}
        parts[name] = json.loads(canonical)


def _js(value: Any, indent: int = 0) -> str:
    """`value` as JavaScript: JSON, short objects on one line, parts by reference."""
    if isinstance(value, _Part):
        return f"MESSAGE_PARTS[{json.dumps(str(value))}]"
    if not isinstance(value, dict | list):
        return json.dumps(value)
    items = (
        [f"{json.dumps(key)}: {_js(item, indent + 1)}" for key, item in sorted(value.items())]
        if isinstance(value, dict)
        else [_js(item, indent + 1) for item in value]
    )
    opening, closing = "{}" if isinstance(value, dict) else "[]"
    one_line = f"{opening}{', '.join(items)}{closing}"
    if indent + len(one_line) <= LINE_CHARS:
        return one_line
    inner = " " * (indent + 1)
    return f"{opening}\n{inner}" + f",\n{inner}".join(items) + f"\n{' ' * indent}{closing}"


def script() -> str:
    """console/static/messages.js: the schemas as one global the page reads."""
    tree, parts = factor(schemas())
    # A part refers only to parts found after it (smaller ones): define those first.
    defined = "".join(
        f"MESSAGE_PARTS[{json.dumps(name)}] = {_js(part)};\n"
        for name, part in reversed(parts.items())
    )
    return (
        "// Generated by `python -m console.schema` from the models that build these\n"
        "// messages (fedbell/wire/protocol.py, edge/events.py). Do not edit.\n"
        '"use strict";\n'
        "// What stands in more than one schema, written once.\n"
        f"const MESSAGE_PARTS = {{}};\n{defined}"
        f"const MESSAGE_SCHEMAS = {_js(tree)};\n"
    )


def main() -> None:
    SCHEMA_FILE.write_text(script())
    print(f"wrote {SCHEMA_FILE}")


if __name__ == "__main__":
    main()
