"""The wire contract: envelope, codecs, signatures, JSON messages, topics."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbell.errors import RejectedMessage
from fedbell.wire import envelope, messages
from fedbell.wire.backbone import assemble, build_backbone, parse_manifest
from fedbell.wire.codecs import decode_tensors, encode_tensors
from fedbell.wire.protocol import Command, RoundAnnouncement, parse_json
from fedbell.wire.topics import Topics

NAMES = ["conv/kernel", "conv/bias", "dense/kernel"]
LIMIT = 1 << 20


def arrays(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(3, 3, 1, 4)).astype(np.float32),
        rng.normal(size=(4,)).astype(np.float32),
        rng.normal(size=(16, 5)).astype(np.float32),
    ]


def specs() -> tuple[envelope.TensorSpec, ...]:
    return tuple(
        envelope.TensorSpec(name=n, shape=a.shape) for n, a in zip(NAMES, arrays(), strict=True)
    )


def update(signer: messages.Signer | None = None, **overrides: object) -> bytes:
    fields: dict[str, object] = {
        "site": "home",
        "signer": signer or messages.Signer("door"),
        "round_id": 1,
        "base_version": 0,
        "num_examples": 10,
        "names": NAMES,
        "delta": arrays(),
        "codec": "float32",
    }
    fields.update(overrides)
    return messages.build_update(**fields)  # type: ignore[arg-type]


def parse(payload: bytes, **overrides: object) -> messages.Update:
    fields: dict[str, object] = {
        "site": "home",
        "device": "door",
        "expected": specs(),
        "max_bytes": LIMIT,
        "keys": None,
    }
    fields.update(overrides)
    return messages.parse_update(payload, **fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("codec", "tolerance"), [("float32", 0.0), ("float16", 1e-2), ("int8", 0.02)]
)
def test_codecs_round_trip_within_their_precision(codec: str, tolerance: float) -> None:
    decoded = parse(update(codec=codec)).delta
    for original, got in zip(arrays(), decoded, strict=True):
        assert got.shape == original.shape
        peak = float(np.max(np.abs(original)))
        assert float(np.max(np.abs(got - original))) <= tolerance * peak


def test_int8_update_is_about_four_times_smaller_than_float32() -> None:
    big = [np.random.default_rng(1).normal(size=(64, 128)).astype(np.float32)]
    _, f32 = encode_tensors(["w"], big, "float32")
    _, i8 = encode_tensors(["w"], big, "int8")
    assert len(i8) < len(f32) / 3.5


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 6), st.integers(1, 6)), min_size=1, max_size=4),
    st.sampled_from(["float32", "float16", "int8"]),
)
def test_any_shapes_round_trip(shapes: list[tuple[int, int]], codec: str) -> None:
    rng = np.random.default_rng(0)
    values = [rng.normal(size=s).astype(np.float32) for s in shapes]
    names = [f"t{i}" for i in range(len(values))]
    tensor_specs, body = encode_tensors(names, values, codec)  # type: ignore[arg-type]
    decoded = decode_tensors(tensor_specs, body, codec, "zstd")  # type: ignore[arg-type]
    assert [d.shape for d in decoded] == [v.shape for v in values]


def test_envelope_rejects_each_kind_of_corruption() -> None:
    good = update()
    header_len = struct.unpack_from(">I", good, 5)[0]
    cases = {
        "truncated": good[:7],
        "bad_magic": b"XXXX" + good[4:],
        "bad_version": good[:4] + b"\x09" + good[5:],
        "header_too_large": good[:5] + struct.pack(">I", 10**6) + good[9:],
        "bad_header": good[:9] + b"{" * header_len + good[9 + header_len :],
        "bad_checksum": good[:-1] + bytes([good[-1] ^ 1]),
        "too_large": good + b"\0" * LIMIT,
    }
    for reason, payload in cases.items():
        with pytest.raises(RejectedMessage) as err:
            parse(payload)
        assert err.value.reason == reason, (reason, str(err.value))


@pytest.mark.parametrize(
    ("scale", "why"),
    [(np.inf, "NaN or Inf"), (np.nan, "NaN or Inf"), (3e38, "overflow")],
)
@pytest.mark.filterwarnings("error::RuntimeWarning")  # refused before any arithmetic warns
def test_a_hostile_int8_scale_is_refused_without_a_warning(scale: float, why: str) -> None:
    column = np.array([[1.0, 0.0], [0.5, 0.0], [1.0, 1.0]], np.float32)  # Inf x 0 warned
    specs, body = encode_tensors(["w"], [column], "int8", "none")
    scales = np.frombuffer(body[:8], "<f4").copy()  # one scale per column, then the values
    scales[1] = scale
    hostile = scales.astype("<f4").tobytes() + body[8:]
    with pytest.raises(RejectedMessage, match=why) as err:
        decode_tensors(specs, hostile, "int8", "none")
    assert err.value.reason == "not_finite"


def test_nan_and_inf_are_rejected() -> None:
    poisoned = arrays()
    poisoned[2][0, 0] = np.nan
    with pytest.raises(RejectedMessage, match="not_finite"):
        parse(update(delta=poisoned))
    poisoned[2][0, 0] = np.inf
    with pytest.raises(RejectedMessage, match="not_finite"):
        parse(update(delta=poisoned, codec="float16"))


def test_header_that_lies_about_shapes_is_rejected() -> None:
    wrong = [a.reshape(-1) for a in arrays()]
    with pytest.raises(RejectedMessage, match="bad_shapes"):
        parse(update(delta=wrong))
    with pytest.raises(RejectedMessage, match="bad_shapes"):
        parse(update(delta=arrays()[:2], names=NAMES[:2]))


def test_decompression_bomb_costs_nothing() -> None:
    """A body that inflates far past what the specs allow is refused unread."""
    bomb = zstandard.ZstdCompressor().compress(b"\0" * (64 << 20))
    header = envelope.Header(
        kind="update",
        site="home",
        round=1,
        model_version=0,
        sender="door",
        num_examples=1,
        codec="float32",
        tensors=specs(),
        body_size=len(bomb),
        body_sha256=envelope.body_digest(bomb),
    )
    with pytest.raises(RejectedMessage, match="bad_size"):
        parse(envelope.encode(header, bomb))


def test_sender_must_match_the_topic_and_site() -> None:
    with pytest.raises(RejectedMessage, match="wrong_sender"):
        parse(update(), device="backdoor")
    with pytest.raises(RejectedMessage, match="wrong_site"):
        parse(update(site="cottage"))


def test_signatures_stop_forged_and_unsigned_updates() -> None:
    device_key, forger_key = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    keys = {"door": device_key.public_key()}
    assert parse(update(messages.Signer("door", device_key)), keys=keys).num_examples == 10
    with pytest.raises(RejectedMessage, match="bad_signature"):
        parse(update(messages.Signer("door", forger_key)), keys=keys)
    with pytest.raises(RejectedMessage, match="unsigned"):
        parse(update(), keys=keys)
    with pytest.raises(RejectedMessage, match="unknown_signer"):
        parse(update(messages.Signer("door", device_key)), keys={})


def test_signature_covers_the_header_fields() -> None:
    key = Ed25519PrivateKey.generate()
    payload = update(messages.Signer("door", key))
    tampered = payload.replace(b'"num_examples":10', b'"num_examples":99')
    assert tampered != payload
    with pytest.raises(RejectedMessage, match="bad_signature"):
        parse(tampered, keys={"door": key.public_key()})


def test_the_backbone_travels_as_chunks_under_a_signed_manifest() -> None:
    key = Ed25519PrivateKey.generate()
    published = build_backbone(
        site="home",
        signer=messages.Signer("aggregator", key),
        version=0,
        round_id=0,
        float_model=b"F" * 3000,
        int8_model=b"I" * 500,
        lineage="0123abcd",
        epoch=5,
        chunk_bytes=1024,
    )
    assert [len(chunk) for chunk in published.chunks] == [1024, 1024, 1024, 428]
    keys = {"aggregator": key.public_key()}
    manifest = parse_manifest(published.manifest, site="home", max_bytes=LIMIT, keys=keys)
    assert (manifest.version, manifest.lineage, manifest.epoch) == (0, "0123abcd", 5)
    artifact = assemble(manifest, dict(enumerate(published.chunks)))
    assert (artifact.float_model, artifact.int8_model) == (b"F" * 3000, b"I" * 500)
    with pytest.raises(RejectedMessage, match="incomplete_backbone"):
        assemble(manifest, dict(enumerate(published.chunks[:3])))
    with pytest.raises(RejectedMessage, match="bad_chunk"):
        assemble(manifest, {**dict(enumerate(published.chunks)), 2: b"G" * 1024})
    with pytest.raises(RejectedMessage, match="bad_signature"):  # a chunk list changed
        parse_manifest(
            with_meta(published.manifest, chunks=list(reversed(manifest.chunks))),
            site="home",
            max_bytes=LIMIT,
            keys=keys,
        )
    for lineage in ("", "a/b", "x" * 65, "line\n", None, 7):
        with pytest.raises(RejectedMessage, match="bad_lineage"):
            parse_manifest(
                with_meta(published.manifest, lineage=lineage),
                site="home",
                max_bytes=LIMIT,
                keys=None,
            )


def with_meta(payload: bytes, **meta: object) -> bytes:
    """The same message with these header meta fields (None: removed), re-encoded."""
    header, body = envelope.decode(payload, LIMIT)
    changed = {k: v for k, v in {**header.meta, **meta}.items() if v is not None}
    return envelope.encode(header.model_copy(update={"meta": changed}), body)


HEAD = [np.random.default_rng(2).normal(size=(8, 4)).astype(np.float32)]
BACKBONE = "ab" * 32


def global_model(**overrides: object) -> bytes:
    fields: dict[str, object] = {
        "site": "home",
        "signer": messages.Signer("aggregator"),
        "version": 3,
        "round_id": 3,
        "names": ["head/projection"],
        "weights": HEAD,
        "lineage": "f00d",
        "threshold": 0.91,
        "backbone": BACKBONE,
    }
    fields.update(overrides)
    return messages.build_global(**fields)  # type: ignore[arg-type]


def test_global_model_names_its_lineage_threshold_and_backbone() -> None:
    head_spec = (envelope.TensorSpec(name="head/projection", shape=(8, 4)),)
    model = messages.parse_global(
        global_model(), site="home", max_bytes=LIMIT, keys=None, expected=head_spec
    )
    assert (model.version, model.lineage, model.backbone) == (3, "f00d", BACKBONE)
    assert model.threshold == pytest.approx(0.91)
    np.testing.assert_array_equal(model.weights[0], HEAD[0])
    assert model.names == ("head/projection",)
    with pytest.raises(RejectedMessage, match="bad_shapes"):
        messages.parse_global(
            global_model(weights=[HEAD[0].T]),
            site="home",
            max_bytes=LIMIT,
            keys=None,
            expected=head_spec,
        )


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"lineage": "not a lineage"}, "bad_lineage"),
        ({"lineage": "a" * 65}, "bad_lineage"),
        ({"threshold": 1.5}, "bad_header"),
        ({"threshold": -1.01}, "bad_header"),
        ({"backbone": "ab" * 31}, "bad_header"),
        ({"backbone": "AB" * 32}, "bad_header"),
    ],
)
def test_global_model_with_a_bad_identity_is_refused(
    overrides: dict[str, object], reason: str
) -> None:
    with pytest.raises(RejectedMessage) as err:
        messages.parse_global(global_model(**overrides), site="home", max_bytes=LIMIT, keys=None)
    assert err.value.reason == reason


def test_global_model_without_a_lineage_is_refused() -> None:
    """A closed-set model message (from before lineages) is not taken for a head."""
    with pytest.raises(RejectedMessage, match="bad_lineage"):
        messages.parse_global(
            with_meta(global_model(), lineage=None), site="home", max_bytes=LIMIT, keys=None
        )
    for missing in ("threshold", "backbone"):
        with pytest.raises(RejectedMessage, match="bad_header"):
            messages.parse_global(
                with_meta(global_model(), **{missing: None}),
                site="home",
                max_bytes=LIMIT,
                keys=None,
            )


def test_round_announcement_lineage_is_a_full_match() -> None:
    fields = {
        "round": 1,
        "base_version": 0,
        "phase": "train",
        "selected": ["door"],
        "deadline": 1.0,
        "codec": "topk",
        "train": {},
    }
    assert RoundAnnouncement.model_validate({**fields, "lineage": "ab_-9"}).lineage == "ab_-9"
    assert RoundAnnouncement.model_validate(fields).lineage is None  # an older aggregator
    for bad in ("ab\n", "a b", "", "x" * 65):
        with pytest.raises(ValueError, match="lineage"):
            RoundAnnouncement.model_validate({**fields, "lineage": bad})


def test_json_messages_are_strict() -> None:
    assert parse_json(b'{"cmd":"start_round"}', Command).cmd == "start_round"
    for bad in (
        b"not json",
        b'{"cmd":"explode"}',
        b'{"cmd":"auto","rounds":0}',
        b'{"cmd":"start_round","extra":1}',
    ):
        with pytest.raises(RejectedMessage, match="bad_json"):
            parse_json(bad, Command)
    with pytest.raises(RejectedMessage, match="bad_json"):
        parse_json(b'{"round":1}', RoundAnnouncement)


def test_topics_refuse_wildcards_and_name_devices() -> None:
    topics = Topics("home")
    assert topics.update("door") == "fedbell/home/update/door"
    assert topics.device_of("fedbell/home/update/door") == "door"
    for bad in ("+", "#", "a/b", "", "x y"):
        with pytest.raises(ValueError, match="device id"):
            topics.update(bad)
    with pytest.raises(ValueError, match="not a device topic"):
        topics.device_of("fedbell/other/update/door")


def test_fixed_topics_stand_below_the_root_and_site() -> None:
    topics = Topics("home", root="fb")
    fixed = [
        (topics.control, "fb/home/control"),
        (topics.round, "fb/home/round"),
        (topics.global_model, "fb/home/model/global"),
        (topics.tflite_model, "fb/home/model/tflite"),
        (topics.backbone_chunks, "fb/home/model/tflite/+"),
        (topics.backbone_chunk(7), "fb/home/model/tflite/7"),
        (topics.metrics, "fb/home/metrics"),
        (topics.aggregator_status, "fb/home/aggregator/status"),
        (topics.reply, "fb/home/aggregator/reply"),
        (topics.all_updates, "fb/home/update/+"),
        (topics.all_statuses, "fb/home/status/+"),
    ]
    for topic, expected in fixed:
        assert topic == expected
    assert Topics("away", root="fb").control == "fb/away/control"  # per instance, not per class


def test_topk_sends_only_the_largest_entries() -> None:
    delta = arrays()
    decoded = parse(update(delta=delta, codec="topk", density=0.1)).delta
    for original, got in zip(delta, decoded, strict=True):
        kept = np.flatnonzero(got.reshape(-1))
        assert len(kept) == max(1, int(np.ceil(0.1 * original.size)))
        smallest_kept = np.min(np.abs(original.reshape(-1)[kept]))
        dropped = np.delete(np.abs(original.reshape(-1)), kept)
        assert dropped.size == 0 or np.max(dropped) <= smallest_kept


def test_error_feedback_sends_everything_eventually() -> None:
    """The sum of what top-k sent plus the residual equals the sum of the deltas.

    Each round's delta carries the previous residual, as training from base +
    residual makes it (`edge.trainer.train_delta`); here "training" adds nothing.
    """
    from fedbell.wire.sparsify import with_error_feedback

    residual = [np.zeros_like(a) for a in arrays()]
    sent_total = [np.zeros_like(a) for a in arrays()]
    true_total = [np.zeros_like(a) for a in arrays()]
    for seed in range(5):
        delta = arrays(seed)
        carried = [d + r for d, r in zip(delta, residual, strict=True)]
        sent, residual = with_error_feedback(NAMES, carried, density=0.1)
        decoded = parse(update(delta=sent, codec="topk", density=0.1)).delta
        sent_total = [t + d for t, d in zip(sent_total, decoded, strict=True)]
        true_total = [t + d for t, d in zip(true_total, delta, strict=True)]
    assert residual is not None
    for got, want, left in zip(sent_total, true_total, residual, strict=True):
        np.testing.assert_allclose(got + left, want, atol=1e-4)


def test_topk_with_lying_indices_is_rejected() -> None:
    specs_ = (envelope.TensorSpec(name="w", shape=(4,)),)
    raw = (
        struct.pack("<I", 2)
        + np.array([3, 5], "<u4").tobytes()
        + np.float32(1).tobytes()
        + bytes([1, 2])
    )
    with pytest.raises(RejectedMessage, match="bad_indices"):
        decode_tensors(specs_, raw, "topk", "none")
    raw = struct.pack("<I", 9) + b"\0" * 10
    with pytest.raises(RejectedMessage, match="bad_size"):
        decode_tensors(specs_, raw, "topk", "none")
