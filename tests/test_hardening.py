"""Issue 13's smaller hardening items that need no broker: names, keys, provisioning."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from deploy import provision
from edge.feedback import FeedbackError, check_person_name
from edge.installer import decode_limit
from fedbell.errors import RejectedMessage
from fedbell.faces import last_level
from fedbell.faces.embedding import HEAD_NAMES, LAST_LEVEL_NAMES
from fedbell.wire.codecs import FIRST_MODEL_MAX_BYTES, MODEL_GROWTH, model_decode_limit
from fedbell.wire.messages import AGGREGATOR, GlobalModel, Signer, build_global, parse_global
from fedbell.wire.signing import load_public_keys
from fedbell.wire.topics import Topics, check_segment


@pytest.mark.parametrize("name", ["door1\n", "alice\n", "door1\r\n"])
def test_names_with_a_trailing_newline_are_refused(name: str) -> None:
    """Issue 13 item 7: `re.match(r"...$")` accepted "door1\\n"; full matches do not."""
    with pytest.raises(ValueError, match="device id"):
        check_segment(name, "device id")
    with pytest.raises(ValueError, match="site id"):
        Topics(name)
    with pytest.raises(FeedbackError, match="person name"):
        check_person_name(name)
    with pytest.raises(provision.ProvisionError, match="bad name"):
        provision.check_name(name)


def test_an_aggregator_with_another_login_name_still_writes_the_key_doorbells_trust(
    tmp_path: Path,
) -> None:
    """Issue 13 item 7: `add-aggregator --name hub` wrote hub.pub; doorbells need aggregator.pub."""
    site = tmp_path / "site"
    for args in (
        ["init", "--site", "home"],
        ["add-device", "door1", "--no-reload"],
        ["add-aggregator", "--name", "hub", "--no-reload"],
        ["add-device", "door2", "--no-reload"],
    ):
        provision.run([*args, "--site-dir", str(site)])
    for device in ("door1", "door2"):
        keys = load_public_keys(site / "clients" / device / "peer-keys")
        assert set(keys) == {AGGREGATOR}, f"{device} would refuse every model: {sorted(keys)}"
    provision.run(["remove-login", "hub", "--no-reload", "--site-dir", str(site)])
    assert list((site / "keys" / "aggregator").glob("*.pub")) == []
    assert load_public_keys(site / "clients" / "door1" / "peer-keys") == {}


def test_a_global_model_cannot_inflate_past_the_shapes_a_doorbell_expects() -> None:
    """Issue 13 item 7: the limit came from the signed header (up to 64 GiB)."""
    current = [np.zeros((128, 64), np.float32)]  # the doorbell's model: 32 KiB of floats
    limit = model_decode_limit(current)
    assert limit == MODEL_GROWTH * 4 * 128 * 64
    assert model_decode_limit(None) == FIRST_MODEL_MAX_BYTES

    def model(shape: tuple[int, ...]) -> bytes:
        return build_global(
            site="home",
            signer=Signer(AGGREGATOR),
            version=2,
            round_id=1,
            names=["head/projection"],
            weights=[np.zeros(shape, np.float32)],
            lineage="l1",
            threshold=0.5,
            backbone="0" * 64,
        )

    bomb = model((4096, 2048))  # 32 MiB of zeros: a few kB once compressed
    assert len(bomb) < 64 * 1024
    with pytest.raises(RejectedMessage) as caught:
        parse_global(bomb, site="home", max_bytes=1 << 20, keys=None, max_decoded_bytes=limit)
    assert caught.value.reason == "too_large_model"
    same = parse_global(
        model((128, 64)), site="home", max_bytes=1 << 20, keys=None, max_decoded_bytes=limit
    )
    assert [w.shape for w in same.weights] == [(128, 64)]


def test_a_head_only_doorbell_lets_a_last_level_model_in_and_no_more() -> None:
    """An aggregator switched to `rounds.trainable: last_level` starts a lineage whose model
    holds 21 times a head's values: a doorbell running the head must let it in (its own
    model's 4x room would refuse it as too large), and still nothing much larger."""
    head = [np.zeros((256, 128), np.float32)]
    current = GlobalModel(1, 1, HEAD_NAMES, head, "l1", 0.5, "0" * 64)
    level = [*(np.zeros(shape, np.float32) for shape in last_level.SHAPES), head[0]]

    def payload(weights: list[np.ndarray], names: tuple[str, ...]) -> bytes:
        return build_global(
            site="home",
            signer=Signer(AGGREGATOR),
            version=0,
            round_id=0,
            names=names,
            weights=weights,
            lineage="l2",
            threshold=0.5,
            backbone="1" * 64,
            codec="int8",
        )

    limit = decode_limit(current)
    with pytest.raises(RejectedMessage, match="too_large_model"):  # the head's own room
        parse_global(
            payload(level, LAST_LEVEL_NAMES),
            site="home",
            max_bytes=1 << 20,
            keys=None,
            max_decoded_bytes=model_decode_limit(head),
        )
    parsed = parse_global(
        payload(level, LAST_LEVEL_NAMES),
        site="home",
        max_bytes=1 << 20,
        keys=None,
        max_decoded_bytes=limit,
    )
    assert parsed.names == LAST_LEVEL_NAMES
    bigger = [np.zeros((4 * limit // (4 * 128) + 1, 128), np.float32)]
    with pytest.raises(RejectedMessage, match="too_large_model"):
        parse_global(
            payload(bigger, HEAD_NAMES),
            site="home",
            max_bytes=1 << 20,
            keys=None,
            max_decoded_bytes=limit,
        )
