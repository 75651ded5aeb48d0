"""Issue 13's smaller hardening items that need no broker: names, keys, provisioning."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy import provision
from edge.feedback import FeedbackError, check_person_name
from fedbell.messages import AGGREGATOR
from fedbell.signing import load_public_keys
from fedbell.topics import Topics, check_segment


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
