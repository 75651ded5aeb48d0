"""Every MQTT topic fedbell uses, in one place.

Federation topics live under `<root>/<site>/`; a doorbell's home-facing topics
under `doorbell/<device>/` and Home Assistant's discovery prefix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, Protocol

SecAggLeaf = Literal["keys", "shares", "masked", "unmask"]
SECAGG_LEAVES: Final[tuple[SecAggLeaf, ...]] = ("keys", "shares", "masked", "unmask")
"""What a doorbell publishes in a secure round, one topic per phase:
`<base>/secagg/<leaf>/<device>` (its signed key advert, its encrypted seed shares, its
masked update, its answer to the unmask request). The aggregator writes each doorbell's
shares from the others to `<base>/secagg/inbox/<device>`, which only that doorbell reads.

On the federation tier (docs/many-houses.md) a house hub's bridge carries the key advert
up as `<base>/secagg/keys/<house>/<device>`, and the aggregator sends the inboxes of
that house's doorbells to `<base>/secagg/inboxes/<house>/<part>`, a few bundles
(fedbell/wire/house_inboxes.py) that only that house's hub takes down; its Retainer
puts each inbox on `<base>/secagg/inbox/<device>` in the house."""

_SEGMENT = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_segment(value: str, what: str) -> str:
    """A topic segment must not contain MQTT wildcards, separators or spaces."""
    # fullmatch: `re.match` with `$` would accept a trailing newline ("door1\n").
    if not _SEGMENT.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be 1-64 characters of letters, digits, '_' or '-'")
    return value


class SecAggOrigin(NamedTuple):
    """Who sent a secagg message: the phase's leaf, the doorbell, and the house whose hub
    carried it across the federation tier (None on a house's own broker)."""

    leaf: SecAggLeaf
    device: str
    house: str | None


class _Based(Protocol):
    @property
    def base(self) -> str: ...


class Subtopic:
    """A topic at a fixed path below its owner's `base`: in a class body,
    `control = Subtopic("control")` makes `topics.control` read `<base>/control`,
    so a class's fixed topics stand as one table of paths."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __get__(self, owner: _Based, _kind: object = None) -> str:
        return f"{owner.base}/{self.path}"


@dataclass(frozen=True)
class Topics:
    """Topic names of one federation (site)."""

    site: str
    root: str = "fedbell"

    def __post_init__(self) -> None:
        check_segment(self.site, "site id")
        check_segment(self.root, "topic root")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.site}"

    control = Subtopic("control")
    round = Subtopic("round")
    global_model = Subtopic("model/global")
    tflite_model = Subtopic("model/tflite")
    backbone_chunks = Subtopic("model/tflite/+")
    metrics = Subtopic("metrics")
    aggregator_status = Subtopic("aggregator/status")
    reply = Subtopic("aggregator/reply")
    """The aggregator's answer to each command and update (retained: the last one)."""
    all_updates = Subtopic("update/+")
    all_statuses = Subtopic("status/+")

    def backbone_chunk(self, index: int) -> str:
        """Chunk `index` of the backbone whose manifest is on `tflite_model`."""
        return f"{self.tflite_model}/{index}"

    def chunk_index(self, topic: str) -> int:
        """The index in a backbone chunk's topic; ValueError for any other topic."""
        prefix, _, index = topic.rpartition("/")
        if prefix != self.tflite_model or not re.fullmatch(r"[0-9]{1,4}", index):
            raise ValueError(f"{topic!r} is not a backbone chunk topic of site {self.site!r}")
        return int(index)

    def update(self, device: str) -> str:
        return f"{self.base}/update/{check_segment(device, 'device id')}"

    def secagg(self, leaf: SecAggLeaf, device: str) -> str:
        return f"{self.base}/secagg/{leaf}/{check_segment(device, 'device id')}"

    def all_secagg(self, leaf: SecAggLeaf) -> str:
        return f"{self.base}/secagg/{leaf}/+"

    all_house_adverts = Subtopic("secagg/keys/+/+")
    """Key adverts as they cross the federation tier: `<base>/secagg/keys/<house>/<device>`."""
    all_house_inboxes = Subtopic("secagg/inboxes/+/+")

    def house_adverts(self, house: str | None) -> str:
        """The prefix of a doorbell's key advert topic: on the tier, under its house."""
        if house is None:
            return f"{self.base}/secagg/keys/"
        return f"{self.base}/secagg/keys/{check_segment(house, 'house')}/"

    def house_inboxes(self, house: str, part: int | None = None) -> str:
        """A bundle of the house's doorbells' inboxes (None: every part, a filter)."""
        index = "+" if part is None else str(part)
        return f"{self.base}/secagg/inboxes/{check_segment(house, 'house')}/{index}"

    def secagg_inbox(self, device: str) -> str:
        return f"{self.base}/secagg/inbox/{check_segment(device, 'device id')}"

    def secagg_origin(self, topic: str) -> SecAggOrigin:
        """Leaf, device and house (None: not through a hub) of a doorbell's secagg topic;
        ValueError for any other topic."""
        prefix, _, device = topic.rpartition("/")
        for leaf in SECAGG_LEAVES:
            if prefix == f"{self.base}/secagg/{leaf}":
                return SecAggOrigin(leaf, check_segment(device, "device id"), None)
        above, _, house = prefix.rpartition("/")
        if above == f"{self.base}/secagg/keys":
            return SecAggOrigin(
                "keys", check_segment(device, "device id"), check_segment(house, "house")
            )
        raise ValueError(f"{topic!r} is not a doorbell's secagg topic of site {self.site!r}")

    def status(self, device: str) -> str:
        return f"{self.base}/status/{check_segment(device, 'device id')}"

    def device_of(self, topic: str) -> str:
        """The device id in an update or status topic (the last segment).

        The broker's ACL guarantees a device can only publish under its own
        id, so the topic, not the payload, says who sent a message.
        """
        prefix, _, device = topic.rpartition("/")
        if prefix not in (f"{self.base}/update", f"{self.base}/status"):
            raise ValueError(f"{topic!r} is not a device topic of site {self.site!r}")
        return check_segment(device, "device id")


def doorbell_topic(device: str, leaf: str) -> str:
    """`doorbell/<device>/<leaf>`: events and state for the home."""
    return f"doorbell/{check_segment(device, 'device id')}/{leaf}"


def bundle_site(topic: str) -> Topics | None:
    """The site whose house inbox bundle `topic` is (`<root>/<site>/secagg/inboxes/<house>/
    <part>`, Topics.house_inboxes); None for any other topic."""
    base, found, rest = topic.rpartition("/secagg/inboxes/")
    root, _, site = base.partition("/")
    house, _, part = rest.partition("/")
    names = (root, site, house)
    if not (found and all(_SEGMENT.fullmatch(name) for name in names) and part.isdigit()):
        return None
    return Topics(site=site, root=root)
