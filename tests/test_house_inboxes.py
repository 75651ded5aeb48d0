"""A house's inboxes bundled for the federation tier (fedbell/wire/house_inboxes.py)."""

from __future__ import annotations

import pytest

from fedbell.wire import house_inboxes
from fedbell.wire.house_inboxes import MAX_BUNDLE_BYTES, pack, unpack
from fedbell.wire.topics import Topics, bundle_site


def test_bundles_give_back_every_inbox_byte_for_byte_within_the_size_limit() -> None:
    inboxes = [(f"d{i}", bytes([i % 256]) * 40_000 + b"\n{}") for i in range(60)]
    bundles = pack(12, inboxes)
    assert len(bundles) == 3  # 60 x 40 kB in bundles of at most 1 MB
    assert all(len(bundle) <= MAX_BUNDLE_BYTES for bundle in bundles)
    unpacked = [unpack(bundle) for bundle in bundles]
    assert {round_id for round_id, _ in unpacked} == {12}
    assert [entry for _, entries in unpacked for entry in entries] == inboxes
    assert pack(12, []) == []


def test_a_malformed_bundle_or_device_is_refused() -> None:
    bundle = pack(3, [("cam1", b"abc"), ("cam2", b"de")])[0]
    refusals = {
        bundle[:-1]: "cut short",
        bundle + b"x": "no inbox header",
        b"junk" + bundle: "not a bundle",
        bundle.replace(b"cam2", b"ca/2"): "no inbox header",
    }
    for bad, why in refusals.items():
        with pytest.raises(ValueError, match=why):
            unpack(bad)
    with pytest.raises(ValueError, match="device id"):
        pack(3, [("cam/1", b"abc")])
    with pytest.raises(ValueError, match="alone exceeds"):
        pack(3, [("cam1", bytes(house_inboxes.MAX_BUNDLE_BYTES))])


def test_only_a_bundles_topic_names_its_site() -> None:
    topics = Topics("demo")
    site = bundle_site(topics.house_inboxes("house1", 0))
    assert site == topics
    assert site is not None
    assert site.secagg_inbox("cam1") == "fedbell/demo/secagg/inbox/cam1"
    for other in (topics.secagg_inbox("cam1"), topics.house_inboxes("house1"), "a/b/c"):
        assert bundle_site(other) is None
