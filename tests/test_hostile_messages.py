"""Hostile input reaches the validation path and is refused, never crashes it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import rounds
from bench import fuzz
from fedbell.errors import RejectedMessage
from fedbell.wire import messages, signing
from fedbell.wire.codecs import TENSOR_CODECS
from fedbell.wire.envelope import TensorSpec

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
    assert fuzz.run(4000, seed=7, signed=signed) == 0, capsys.readouterr().out
    printed = capsys.readouterr().out
    for codec in TENSOR_CODECS:  # every codec, top-k (the default) included
        assert f"fuzz {codec:<7} {'signed' if signed else 'unsigned'}" in printed


def test_fuzzer_folds_accepted_messages_into_the_real_accumulator() -> None:
    report = fuzz.run_codec("topk", 1500, seed=3, signed=False)
    assert report.ok, report.crashes + report.model_changes
    assert report.outcomes["accepted"] > 0  # the expectation was compared, not skipped


def test_model_change_is_reported_when_the_norm_check_is_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Absurd but finite deltas (float16 at 60000) pass the envelope: only the round's
    norm check stops them. Without it the fuzzer must say so.

    int8 (scales x 1e30) is no longer part of this: with rounds.clip_norm 1.0 (issue 18
    item 2) such a delta is scaled down to the documented norm and the published model
    is the expected one (measured over fuzz seeds 0-7: no change at clip 1.0 or 1.5; at
    the former 2.0 a difference of 0.0048, a float32 rounding of the clip of 1e30-sized
    values)."""
    monkeypatch.setattr(rounds, "update_norm", lambda _delta: 0.0)
    for codec in ("float16",):
        report = fuzz.run_codec(codec, 1500, seed=5, signed=False)
        assert report.model_changes, f"{codec}: {report.outcomes}"
        assert "off the expectation" in report.model_changes[0]


def test_model_change_is_reported_when_signatures_are_not_verified(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a signed site weighing by examples (rounds.weighting examples) a header lying
    about its example count must be refused; with the signature check gone it is accepted
    and weighs wrong, which the fuzzer catches. (Weighing houses, the default, a count
    weighs nothing.)"""
    monkeypatch.setattr(signing, "verify", lambda _header, _keys: None)
    report = fuzz.run_codec("topk", 1500, seed=5, signed=True, weighting="examples")
    assert report.model_changes, report.outcomes
    assert report.outcomes["bad_signature"] == 0
