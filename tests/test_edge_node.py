"""The doorbell node in the federation, against a real Mosquitto and the real backbone.

The test plays the aggregator: it publishes retained global models (the head),
the backbone artifact and round announcements built with the shared contract,
and reads what the node publishes back: which models it installs or refuses,
which rounds it takes part in, the updates it sends. The helpers here set up
that aggregator for the other doorbell tests too (`tests/test_edge_node_house.py`,
`tests/test_backbone_refusal.py`, ...).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.backbone import BackboneModels
from broker.local import LocalBroker
from edge.config import EdgeConfig, InferenceSettings, TrainingSettings
from edge.gallery import Gallery
from edge.node import EdgeNode
from edge.recognition_config import CameraConfig
from edge.state import KeptAdam, NodeState
from fedbell.config import MqttSettings, SigningSettings
from fedbell.faces.embedding import HEAD_NAMES
from fedbell.wire import signing
from fedbell.wire.backbone import BackboneMessages, build_backbone
from fedbell.wire.envelope import TensorSpec
from fedbell.wire.messages import (
    AGGREGATOR,
    GlobalModel,
    Signer,
    build_global,
    parse_update,
)
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, TrainingPlan, parse_json, to_json
from fedbell.wire.topics import Topics
from tests.mqtt_helpers import Probe, wait_until
from tests.recognition_helpers import (
    LINEAGE,
    chips_of,
    projection,
)

REPO = Path(__file__).resolve().parents[1]
SITE = "home"
DEVICE = "frontdoor"
TOPICS = Topics(SITE)
PERSONS = 3
LABELLED_IMAGES = 6  # two chips of each of three persons

Base = tuple[list[str], list[np.ndarray]]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    for person in range(PERSONS):
        Gallery(root).add(f"person{person}", chips_of(person, 2, 10 + person))
    return root


@pytest.fixture(scope="module")
def base() -> Base:
    return list(HEAD_NAMES), [projection()]


def make_config(tmp_path: Path, port: int, gallery: Path, **signing_files: Path) -> EdgeConfig:
    return EdgeConfig(
        device_id=DEVICE,
        site=SITE,
        mqtt=MqttSettings(port=port, keepalive=5),
        signing=SigningSettings(**signing_files),
        state_dir=tmp_path / "state",
        gallery_dir=gallery,
        training=TrainingSettings(base_model_wait_s=20),
        inference=InferenceSettings(flavour="float"),
        camera=CameraConfig(enabled=False),
    )


def global_payload(
    base: Base,
    version: int,
    key: Ed25519PrivateKey | None = None,
    *,
    backbone: str = "0" * 64,
    lineage: str = LINEAGE,
    epoch: int = 0,
    threshold: float = 0.0,
) -> bytes:
    names, weights = base
    return build_global(
        site=SITE,
        signer=Signer(AGGREGATOR, key),
        version=version,
        round_id=max(0, version - 1),
        names=names,
        weights=weights,
        lineage=lineage,
        epoch=epoch,
        threshold=threshold,
        backbone=backbone,
    )


def backbone_artifact(
    float_model: bytes,
    int8_model: bytes = b"",
    *,
    key: Ed25519PrivateKey | None = None,
    version: int = 0,
    lineage: str = LINEAGE,
    epoch: int = 0,
) -> BackboneMessages:
    """A backbone as the aggregator publishes it, signed with `key` (None: unsigned)."""
    return build_backbone(
        site=SITE,
        signer=Signer(AGGREGATOR, key),
        version=version,
        round_id=0,
        float_model=float_model,
        int8_model=int8_model,
        lineage=lineage,
        epoch=epoch,
    )


def tflite_payload(
    models: BackboneModels,
    lineage: str = LINEAGE,
    version: int = 0,
    float_only: bool = False,
    epoch: int = 0,
) -> BackboneMessages:
    int8_model = b"" if float_only else models.int8_model
    return backbone_artifact(
        models.float_model, int8_model, version=version, lineage=lineage, epoch=epoch
    )


def round_payload(
    number: int,
    phase: str = "train",
    selected: tuple[str, ...] = (DEVICE,),
    send_when_trained: bool = True,
    codec: str = "float16",
    *,
    base_version: int = 1,
    lineage: str | None = LINEAGE,
    key: Ed25519PrivateKey | None = None,
    train: TrainingPlan | None = None,
) -> bytes:
    announcement = RoundAnnouncement.model_validate(
        {
            "round": number,
            "base_version": base_version,
            "lineage": lineage,
            "phase": phase,
            "selected": selected,
            "deadline": time.time() + 120,
            "codec": codec,
            "density": 0.1,
            "train": train or TrainingPlan(epochs=1, batch_size=8, prox_mu=0.01),
            "send_when_trained": send_when_trained,
        }
    )
    if key is not None:  # a site with signing signs its rounds too
        announcement = signing.sign_announcement(announcement, SITE, key)
    return to_json(announcement)


@contextmanager
def running(config: EdgeConfig) -> Iterator[EdgeNode]:
    """The node's `run` loop in a thread, as `python -m edge` runs it in the main thread."""
    node = EdgeNode(config)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(node.session.subscribed.is_set, 10)
        yield node
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


@contextmanager
def aggregator_at(broker: LocalBroker, *topics: str) -> Iterator[Probe]:
    """The test's aggregator: a client listening on `topics`, closed at the end."""
    aggregator = Probe(broker.port, *topics)
    try:
        yield aggregator
    finally:
        aggregator.close()


def serve_backbone_and_head(
    aggregator: Probe, models: BackboneModels, base: Base, version: int, **head: Any
) -> None:
    """The aggregator's retained backbone and, for it, its retained head `version`."""
    aggregator.publish_backbone(TOPICS, tflite_payload(models))
    model = global_payload(base, version, backbone=models.sha256, **head)
    aggregator.publish(TOPICS.global_model, model, retain=True)


def received(probe: Probe, topic: str, timeout: float = 30.0) -> bytes:
    return bytes(probe.wait_for(topic, timeout).payload)


def next_status(probe: Probe, timeout: float = 30.0) -> DeviceStatus:
    return parse_json(received(probe, TOPICS.status(DEVICE), timeout), DeviceStatus)


def no_message(probe: Probe, topic: str, seconds: float) -> bool:
    try:
        probe.wait_for(topic, timeout=seconds)
    except AssertionError:
        return True
    return False


def check_update(
    payload: bytes,
    base: Base,
    round_id: int,
    keys: dict[str, Any] | None = None,
    base_version: int = 1,
) -> None:
    names, weights = base
    update = parse_update(
        payload,
        site=SITE,
        device=DEVICE,
        expected=tuple(
            TensorSpec(name=n, shape=w.shape) for n, w in zip(names, weights, strict=True)
        ),
        max_bytes=1 << 24,
        keys=keys,
    )
    assert (update.round, update.base_version) == (round_id, base_version)
    assert update.num_examples == LABELLED_IMAGES
    assert [d.shape for d in update.delta] == [w.shape for w in weights]
    assert any(float(np.abs(d).max()) > 0 for d in update.delta)


def test_late_joiner_gets_retained_model_and_keeps_it_across_restarts(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base
) -> None:
    with aggregator_at(broker, TOPICS.status(DEVICE)) as aggregator:
        aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
        config = make_config(tmp_path, broker.port, gallery)
        with running(config) as node:
            wait_until(lambda: node.models.version == 1)
            wait_until(lambda: next_status(aggregator).model_version == 1)
            aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
            time.sleep(0.3)
            assert node.models.version == 1  # a repeated version is ignored, not an error
            assert not node.counters
            assert node.recognizer.version == 1  # the head went to the recognizer
        restarted = EdgeNode(config)  # not connected: the model comes from its state folder
        assert restarted.models.version == 1
        assert restarted.recognizer.version == 1


def test_selected_node_waits_for_its_base_model_and_trains_once(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base, backbone_models: BackboneModels
) -> None:
    config = make_config(tmp_path, broker.port, gallery)
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        with running(config) as node:
            aggregator.publish(TOPICS.round, round_payload(1), retain=True)
            time.sleep(0.5)  # the round arrives before the model it is based on
            model = global_payload(base, 1, backbone=backbone_models.sha256)
            aggregator.publish(TOPICS.global_model, model, retain=True)
            first = received(aggregator, TOPICS.update(DEVICE))
            check_update(first, base, 1)
            wait_until(lambda: node.rounds.last_round == 1)
            # Announced again while open (an aggregator or broker restart): the same
            # update once more, since the first may have been lost; no retraining.
            aggregator.publish(TOPICS.round, round_payload(1), retain=True)
            assert received(aggregator, TOPICS.update(DEVICE)) == first
            assert node.training.trainings == 1
        assert NodeState(config.state_dir).load_last_round() == 1


def test_a_doorbell_keeps_its_adam_across_rounds_when_the_plan_says_so(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base, backbone_models: BackboneModels
) -> None:
    """`train.adam_moments: kept`: the local Adam is stored after each round and the next
    round continues it (its step count runs on), across a restart too, but never one that
    trained another lineage's head; a round whose plan says fresh starts a new Adam and
    forgets the stored one."""
    config = make_config(tmp_path, broker.port, gallery)
    kept = TrainingPlan(epochs=2, batch_size=8, adam_moments="kept")  # one batch an epoch
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        serve_backbone_and_head(aggregator, backbone_models, base, 1)
        with running(config) as node:
            aggregator.publish(TOPICS.round, round_payload(1, train=kept), retain=True)
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1)
            wait_until(lambda: node.rounds.last_round == 1)
        stored = NodeState(config.state_dir).load_moments()
        assert stored is not None
        assert stored.moments.steps == 2
        assert [m.shape for m in stored.moments.m] == [w.shape for w in base[1]]
        with running(config) as node:
            assert node.training.kept_adam is not None
            assert node.training.kept_adam.moments.steps == 2
            aggregator.publish(
                TOPICS.global_model,
                global_payload(base, 2, backbone=backbone_models.sha256),
                retain=True,
            )
            aggregator.publish(
                TOPICS.round, round_payload(2, base_version=2, train=kept), retain=True
            )
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 2, base_version=2)
            wait_until(lambda: node.rounds.last_round == 2)
            assert node.training.kept_adam is not None
            assert node.training.kept_adam.moments.steps == 4
            stored = NodeState(config.state_dir).load_moments()
            assert stored is not None
            assert stored.moments.steps == 4
            assert stored.lineage == LINEAGE
            # Another lineage's Adam (a training of an old head that finished after the new
            # head was installed) is never continued: round 3 starts a new one.
            node.training._keep(KeptAdam("an-older-lineage", stored.moments))
            aggregator.publish(
                TOPICS.global_model,
                global_payload(base, 3, backbone=backbone_models.sha256),
                retain=True,
            )
            aggregator.publish(
                TOPICS.round, round_payload(3, base_version=3, train=kept), retain=True
            )
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 3, base_version=3)
            wait_until(lambda: node.rounds.last_round == 3)
            assert node.training.kept_adam is not None
            assert node.training.kept_adam.moments.steps == 2
            assert node.training.kept_adam.lineage == LINEAGE
            aggregator.publish(
                TOPICS.global_model,
                global_payload(base, 4, backbone=backbone_models.sha256),
                retain=True,
            )
            fresh = TrainingPlan(epochs=2, batch_size=8, adam_moments="fresh")
            aggregator.publish(
                TOPICS.round, round_payload(4, base_version=4, train=fresh), retain=True
            )
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 4, base_version=4)
            wait_until(lambda: node.rounds.last_round == 4)
            assert node.training.kept_adam is None
        assert NodeState(config.state_dir).load_moments() is None


def test_a_doorbell_with_an_empty_gallery_skips_the_round(
    tmp_path: Path, broker: LocalBroker, base: Base, backbone_models: BackboneModels
) -> None:
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        serve_backbone_and_head(aggregator, backbone_models, base, 1)
        aggregator.publish(TOPICS.round, round_payload(1), retain=True)
        with running(make_config(tmp_path, broker.port, tmp_path / "nobody")) as node:
            assert no_message(aggregator, TOPICS.all_updates, 3)
            assert node.training.trainings == 0
            assert node.models.version == 1


def test_unselected_node_publishes_nothing(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base
) -> None:
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
        aggregator.publish(TOPICS.round, round_payload(1, selected=("backdoor",)), retain=True)
        with running(make_config(tmp_path, broker.port, gallery)) as node:
            assert no_message(aggregator, TOPICS.all_updates, 3)
            assert node.training.trainings == 0


def test_held_update_is_sent_only_in_the_send_phase(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base, backbone_models: BackboneModels
) -> None:
    """Step-by-step mode, with a top-k update whose remainder stays on the device."""
    config = make_config(tmp_path, broker.port, gallery)
    held = partial(round_payload, 2, send_when_trained=False, codec="topk")
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        serve_backbone_and_head(aggregator, backbone_models, base, 1)
        aggregator.publish(TOPICS.round, held(), retain=True)
        with running(config) as node:
            wait_until(lambda: node.rounds.held_round == 2)
            assert no_message(aggregator, TOPICS.all_updates, 1)
            assert NodeState(config.state_dir).load_residual() is None  # not sent yet
            aggregator.publish(TOPICS.round, held(phase="send"), retain=True)
            check_update(received(aggregator, TOPICS.update(DEVICE), 10), base, 2)
            wait_until(lambda: node.rounds.last_round == 2)
            assert node.rounds.held_round is None
            assert node.training.trainings == 1
        residual = NodeState(config.state_dir).load_residual()
        assert residual is not None
        assert [r.shape for r in residual] == [w.shape for w in base[1]]
        assert any(float(np.abs(r).max()) > 0 for r in residual)


def test_tampered_models_are_refused_and_updates_are_signed(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base, backbone_models: BackboneModels
) -> None:
    keys = tmp_path / "keys"
    signing.write_key_pair(keys / "aggregator.key", keys / "trusted" / "aggregator.pub")
    signing.write_key_pair(keys / "device.key", keys / "device.pub")
    aggregator_key = signing.load_private_key(keys / "aggregator.key")
    config = make_config(
        tmp_path,
        broker.port,
        gallery,
        private_key_file=keys / "device.key",
        trusted_keys_dir=keys / "trusted",
    )
    signed = partial(global_payload, backbone=backbone_models.sha256)
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        backbone = build_backbone(
            site=SITE,
            signer=Signer(AGGREGATOR, aggregator_key),
            version=0,
            round_id=0,
            float_model=backbone_models.float_model,
            int8_model=b"",
            lineage=LINEAGE,
            epoch=0,
        )
        aggregator.publish_backbone(TOPICS, backbone)
        with running(config) as node:
            aggregator.publish(TOPICS.global_model, signed(base, 1, aggregator_key))
            wait_until(lambda: node.models.version == 1)
            rogue = signed(base, 2, Ed25519PrivateKey.generate())
            aggregator.publish(TOPICS.global_model, rogue)
            aggregator.publish(TOPICS.global_model, signed(base, 3))  # unsigned
            corrupted = bytearray(signed(base, 4, aggregator_key))
            corrupted[-1] ^= 0xFF
            aggregator.publish(TOPICS.global_model, bytes(corrupted))
            wait_until(lambda: sum(node.counters.values()) == 3)
            assert node.counters == {"bad_signature": 1, "unsigned": 1, "bad_checksum": 1}
            assert node.models.version == 1
            stored = NodeState(config.state_dir).load_global()
            assert isinstance(stored, GlobalModel)
            assert stored.version == 1

            aggregator.publish(TOPICS.round, round_payload(1, key=aggregator_key))
            device_key = {DEVICE: signing.load_public_key(keys / "device.pub")}
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1, keys=device_key)


def test_a_head_that_does_not_fit_the_backbone_is_refused(
    tmp_path: Path, broker: LocalBroker, gallery: Path, backbone_models: BackboneModels
) -> None:
    with aggregator_at(broker, TOPICS.status(DEVICE)) as aggregator:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        good = (list(HEAD_NAMES), [projection()])
        wrong = (list(HEAD_NAMES), [np.eye(128, dtype=np.float32)])  # takes 128, not 256
        with running(make_config(tmp_path, broker.port, gallery)) as node:
            wait_until(lambda: node.recognizer.backbone is not None)
            aggregator.publish(
                TOPICS.global_model, global_payload(good, 1, backbone=backbone_models.sha256)
            )
            wait_until(lambda: node.recognizer.ready)
            aggregator.publish(
                TOPICS.global_model, global_payload(wrong, 2, backbone=backbone_models.sha256)
            )
            wait_until(lambda: node.counters["bad_shapes"] == 1)
            assert node.models.version == 1
            assert node.recognizer.version == 1


def test_a_new_lineage_is_accepted_at_version_0_and_its_rounds_start_afresh(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base, backbone_models: BackboneModels
) -> None:
    """An aggregator reset or upgrade: version 0 of another lineage replaces version 5.

    Issue 18 item 7: only a lineage of a higher epoch does; the older lineage's signed
    head or backbone replayed on the model topics afterwards is refused."""
    config = make_config(tmp_path, broker.port, gallery)
    old = partial(global_payload, base, backbone=backbone_models.sha256, lineage="old", epoch=1)
    new = partial(global_payload, base, backbone=backbone_models.sha256, lineage="new", epoch=2)
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models, "old", epoch=1))
        aggregator.publish(TOPICS.global_model, old(5), retain=True)
        kept = TrainingPlan(epochs=1, batch_size=8, adam_moments="kept")
        aggregator.publish(
            TOPICS.round, round_payload(7, base_version=5, lineage="old", train=kept), retain=True
        )
        with running(config) as node:
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 7, base_version=5)
            wait_until(lambda: node.rounds.last_round == 7)
            assert node.training.kept_adam is not None  # the old head's Adam, kept
            assert node.training.kept_adam.lineage == "old"
            aggregator.publish(TOPICS.global_model, old(4))  # older, same lineage: ignored
            aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models, "new", epoch=2))
            aggregator.publish(TOPICS.global_model, new(0), retain=True)
            wait_until(lambda: node.models.version == 0)
            # The backbone installs on its own thread: wait for it before replaying the old.
            wait_until(lambda: node.artifacts._installed == ("new", 0))
            assert node.rounds.last_round == 0  # the old lineage's round counter is gone
            assert NodeState(config.state_dir).load_last_round() == 0
            assert node.training.kept_adam is None  # and its Adam
            assert NodeState(config.state_dir).load_moments() is None
            aggregator.publish(TOPICS.global_model, old(6))  # the old lineage replayed: refused
            aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models, "old", epoch=1))
            wait_until(lambda: node.counters["old_lineage"] == 2)
            assert node.models.version == 0
            assert node.artifacts._installed == ("new", 0)
            aggregator.publish(TOPICS.round, round_payload(1, base_version=0, lineage="new"))
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1, base_version=0)
            wait_until(lambda: node.rounds.last_round == 1)
            stored = NodeState(config.state_dir).load_global()
            assert stored is not None
            assert (stored.lineage, stored.version) == ("new", 0)
            assert node.counters == {"old_lineage": 2}


def test_an_old_closed_set_state_folder_is_dropped_for_the_new_lineage(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base, backbone_models: BackboneModels
) -> None:
    """Upgrade: a state folder from the closed-set model (labels, no lineage) is not used."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "global.npz").write_bytes(b"old weights")
    sidecar = {"version": 30, "round": 29, "names": ["dense/kernel"], "meta": {"labels": ["a"]}}
    (state / "global.json").write_text(
        json.dumps({**sidecar, "sha256": hashlib.sha256(b"old weights").hexdigest()})
    )
    NodeState(state).save_last_round(29)
    with aggregator_at(broker, TOPICS.all_updates) as aggregator:
        serve_backbone_and_head(aggregator, backbone_models, base, 0)
        with running(make_config(tmp_path, broker.port, gallery)) as node:
            wait_until(lambda: node.models.version == 0)
            aggregator.publish(TOPICS.round, round_payload(1, base_version=0))
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1, base_version=0)
