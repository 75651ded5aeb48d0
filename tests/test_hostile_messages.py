"""Hostile input reaches the validation path and is refused, never crashes it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench import fuzz
from fedbell import messages
from fedbell.envelope import TensorSpec
from fedbell.errors import RejectedMessage

SPECS = tuple(TensorSpec(name=n, shape=s) for n, s in fuzz.SHAPES.items())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_arbitrary_bytes_are_rejected_cleanly(payload: bytes) -> None:
    with pytest.raises(RejectedMessage):
        messages.parse_update(
            payload, site="home", device="door", expected=SPECS, max_bytes=1 << 20, keys=None
        )


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=512))
def test_envelope_prefix_with_random_header(header: bytes) -> None:
    payload = b"FBEL\x01" + len(header).to_bytes(4, "big") + header
    with pytest.raises(RejectedMessage):
        messages.parse_update(
            payload, site="home", device="door", expected=SPECS, max_bytes=1 << 20, keys=None
        )


@pytest.mark.parametrize("signed", [False, True])
def test_mutation_fuzzer_finds_no_crash_and_no_model_change(
    signed: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    assert fuzz.run(3000, seed=7, signed=signed) == 0, capsys.readouterr().out
