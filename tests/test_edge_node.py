"""The doorbell node against a real Mosquitto, the real backbone (LiteRT) and real processes.

The test plays the aggregator: it publishes retained global models (the head),
the backbone artifact and round announcements built with the shared contract,
and reads what the node publishes back.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.backbone import BackboneModels
from broker.local import LocalBroker
from edge.config import EdgeConfig, InferenceSettings, TrainingSettings
from edge.gallery import Gallery
from edge.node import EdgeNode
from edge.recognition_config import CameraConfig, HomeAssistantConfig, RecognitionConfig
from edge.state import NodeState
from fedbell.config import MqttSettings, SigningSettings
from fedbell.faces.embedding import HEAD_NAMES
from fedbell.faces.features import Chip
from fedbell.faces.openset import UNKNOWN
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
from tests.mqtt_helpers import Probe
from tests.recognition_helpers import (
    LINEAGE,
    chips_of,
    frames_of,
    projection,
    ready_recognizer,
    write_frames,
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


def tflite_payload(
    models: BackboneModels,
    lineage: str = LINEAGE,
    version: int = 0,
    float_only: bool = False,
    epoch: int = 0,
) -> BackboneMessages:
    return build_backbone(
        site=SITE,
        signer=Signer(AGGREGATOR),
        version=version,
        round_id=0,
        float_model=models.float_model,
        int8_model=b"" if float_only else models.int8_model,
        lineage=lineage,
        epoch=epoch,
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
            "train": TrainingPlan(epochs=1, batch_size=8, prox_mu=0.01),
            "send_when_trained": send_when_trained,
        }
    )
    if key is not None:  # a site with signing signs its rounds too
        announcement = signing.sign_announcement(announcement, SITE, key)
    return to_json(announcement)


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.05)


@contextmanager
def running(config: EdgeConfig) -> Iterator[EdgeNode]:
    """The node's `run` loop in a thread, as `python -m edge` runs it in the main thread."""
    node = EdgeNode(config)
    stop = threading.Event()
    thread = threading.Thread(target=node.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait_until(node.subscribed.is_set, 10)
        yield node
    finally:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()


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


def test_status_online_then_offline_on_sigterm_and_by_last_will(
    tmp_path: Path, broker: LocalBroker, gallery: Path
) -> None:
    config = make_config(tmp_path, broker.port, gallery).model_dump(mode="json")
    config_path = tmp_path / "edge.yaml"
    config_path.write_text(yaml.safe_dump(config))
    status_topic = TOPICS.status(DEVICE)
    probe = Probe(broker.port, status_topic)
    try:
        for how in (signal.SIGTERM, signal.SIGKILL):
            process = subprocess.Popen(
                [sys.executable, "-m", "edge", "--config", str(config_path)],
                cwd=REPO,
                env={**os.environ, "NOTIFY_SOCKET": ""},
            )
            try:
                online = next_status(probe, 20)
                assert online.state == "online"
                assert online.gallery_size == LABELLED_IMAGES
                process.send_signal(how)
                offline = next_status(probe, 20)
                assert offline.state == "offline"
                expected = 0 if how == signal.SIGTERM else -signal.SIGKILL
                assert process.wait(20) == expected
            finally:
                process.kill()
                process.wait()
        late = Probe(broker.port, status_topic)  # the offline status is retained
        try:
            message = late.wait_for(status_topic, 10)
            assert message.retain
            assert parse_json(bytes(message.payload), DeviceStatus).state == "offline"
        finally:
            late.close()
    finally:
        probe.close()


def test_late_joiner_gets_retained_model_and_keeps_it_across_restarts(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base
) -> None:
    aggregator = Probe(broker.port, TOPICS.status(DEVICE))
    try:
        aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
        config = make_config(tmp_path, broker.port, gallery)
        with running(config) as node:
            wait_until(lambda: node.model_version == 1)
            wait_until(lambda: next_status(aggregator).model_version == 1)
            aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
            time.sleep(0.3)
            assert node.model_version == 1  # a repeated version is ignored, not an error
            assert not node.counters
            assert node.recognizer.version == 1  # the head went to the recognizer
        restarted = EdgeNode(config)  # not connected: the model comes from its state folder
        assert restarted.model_version == 1
        assert restarted.recognizer.version == 1
    finally:
        aggregator.close()


def test_selected_node_waits_for_its_base_model_and_trains_once(
    tmp_path: Path,
    broker: LocalBroker,
    gallery: Path,
    base: Base,
    backbone_models: BackboneModels,
) -> None:
    aggregator = Probe(broker.port, TOPICS.all_updates)
    config = make_config(tmp_path, broker.port, gallery)
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        with running(config) as node:
            aggregator.publish(TOPICS.round, round_payload(1), retain=True)
            time.sleep(0.5)  # the round arrives before the model it is based on
            model = global_payload(base, 1, backbone=backbone_models.sha256)
            aggregator.publish(TOPICS.global_model, model, retain=True)
            first = received(aggregator, TOPICS.update(DEVICE))
            check_update(first, base, 1)
            wait_until(lambda: node.last_round == 1)
            # Announced again while open (an aggregator or broker restart): the same
            # update once more, since the first may have been lost; no retraining.
            aggregator.publish(TOPICS.round, round_payload(1), retain=True)
            assert received(aggregator, TOPICS.update(DEVICE)) == first
            assert node.trainings == 1
        assert NodeState(config.state_dir).load_last_round() == 1
    finally:
        aggregator.close()


def test_a_doorbell_with_an_empty_gallery_skips_the_round(
    tmp_path: Path, broker: LocalBroker, base: Base, backbone_models: BackboneModels
) -> None:
    aggregator = Probe(broker.port, TOPICS.all_updates)
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        model = global_payload(base, 1, backbone=backbone_models.sha256)
        aggregator.publish(TOPICS.global_model, model, retain=True)
        aggregator.publish(TOPICS.round, round_payload(1), retain=True)
        with running(make_config(tmp_path, broker.port, tmp_path / "nobody")) as node:
            assert no_message(aggregator, TOPICS.all_updates, 3)
            assert node.trainings == 0
            assert node.model_version == 1
    finally:
        aggregator.close()


def test_unselected_node_publishes_nothing(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: Base
) -> None:
    aggregator = Probe(broker.port, TOPICS.all_updates)
    try:
        aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
        aggregator.publish(TOPICS.round, round_payload(1, selected=("backdoor",)), retain=True)
        with running(make_config(tmp_path, broker.port, gallery)) as node:
            assert no_message(aggregator, TOPICS.all_updates, 3)
            assert node.trainings == 0
    finally:
        aggregator.close()


def test_held_update_is_sent_only_in_the_send_phase(
    tmp_path: Path,
    broker: LocalBroker,
    gallery: Path,
    base: Base,
    backbone_models: BackboneModels,
) -> None:
    """Step-by-step mode, with a top-k update whose remainder stays on the device."""
    aggregator = Probe(broker.port, TOPICS.all_updates)
    config = make_config(tmp_path, broker.port, gallery)
    held = partial(round_payload, 2, send_when_trained=False, codec="topk")
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        model = global_payload(base, 1, backbone=backbone_models.sha256)
        aggregator.publish(TOPICS.global_model, model, retain=True)
        aggregator.publish(TOPICS.round, held(), retain=True)
        with running(config) as node:
            wait_until(lambda: node.held_round == 2)
            assert no_message(aggregator, TOPICS.all_updates, 1)
            assert NodeState(config.state_dir).load_residual() is None  # not sent yet
            aggregator.publish(TOPICS.round, held(phase="send"), retain=True)
            check_update(received(aggregator, TOPICS.update(DEVICE), 10), base, 2)
            wait_until(lambda: node.last_round == 2)
            assert node.held_round is None
            assert node.trainings == 1
        residual = NodeState(config.state_dir).load_residual()
        assert residual is not None
        assert [r.shape for r in residual] == [w.shape for w in base[1]]
        assert any(float(np.abs(r).max()) > 0 for r in residual)
    finally:
        aggregator.close()


def test_tampered_models_are_refused_and_updates_are_signed(
    tmp_path: Path,
    broker: LocalBroker,
    gallery: Path,
    base: Base,
    backbone_models: BackboneModels,
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
    aggregator = Probe(broker.port, TOPICS.all_updates)
    try:
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
            wait_until(lambda: node.model_version == 1)
            rogue = signed(base, 2, Ed25519PrivateKey.generate())
            aggregator.publish(TOPICS.global_model, rogue)
            aggregator.publish(TOPICS.global_model, signed(base, 3))  # unsigned
            corrupted = bytearray(signed(base, 4, aggregator_key))
            corrupted[-1] ^= 0xFF
            aggregator.publish(TOPICS.global_model, bytes(corrupted))
            wait_until(lambda: sum(node.counters.values()) == 3)
            assert node.counters == {"bad_signature": 1, "unsigned": 1, "bad_checksum": 1}
            assert node.model_version == 1
            stored = NodeState(config.state_dir).load_global()
            assert isinstance(stored, GlobalModel)
            assert stored.version == 1

            aggregator.publish(TOPICS.round, round_payload(1, key=aggregator_key))
            device_key = {DEVICE: signing.load_public_key(keys / "device.pub")}
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1, keys=device_key)
    finally:
        aggregator.close()


def test_backbone_is_stored_and_the_gallery_scored(
    tmp_path: Path,
    broker: LocalBroker,
    gallery: Path,
    base: Base,
    backbone_models: BackboneModels,
) -> None:
    aggregator = Probe(broker.port, TOPICS.status(DEVICE))
    config = make_config(tmp_path, broker.port, gallery).model_copy(
        update={"inference": InferenceSettings(flavour="int8")}
    )
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        model = global_payload(base, 1, backbone=backbone_models.sha256)
        aggregator.publish(TOPICS.global_model, model, retain=True)
        with running(config) as node:
            wait_until(lambda: node.gallery_accuracy is not None)
            assert node.gallery_accuracy == 1.0  # each chip named by the others' prototypes
            assert node.recognizer.ready
            # What the operator can act on: every person here has 2 photos, fewer than 3.
            summary = "model v1: 3 people, 6 photos; 3 with fewer than 3 photos: enroll more"
            wait_until(lambda: summary in next_status(aggregator).detail)
            broken = build_backbone(
                site=SITE,
                signer=Signer(AGGREGATOR),
                version=1,
                round_id=1,
                float_model=b"not a flatbuffer",
                int8_model=b"junk",
                lineage=LINEAGE,
                epoch=0,
            )
            aggregator.publish_backbone(TOPICS, broken)
            wait_until(lambda: node.counters["bad_artifact"] == 1)
            assert node.recognizer.ready  # the old backbone stays in use
            backbone = node.recognizer.backbone
            assert backbone is not None
            assert backbone.sha256 == hashlib.sha256(backbone_models.int8_model).hexdigest()
        stored = NodeState(config.state_dir).load_artifact()
        assert stored is not None
        assert (stored.version, stored.flavour, stored.lineage) == (0, "int8", LINEAGE)
        assert stored.backbone_id == backbone_models.sha256
        assert (config.state_dir / "model.tflite").read_bytes() == backbone_models.int8_model
        with running(config) as restarted:  # recognises with the stored backbone at once
            assert restarted.recognizer.ready
            wait_until(lambda: restarted.counters["bad_artifact"] == 1)  # v1 retried, refused
            assert restarted.recognizer.ready
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        as_float = config.model_copy(update={"inference": InferenceSettings(flavour="float")})
        with running(as_float) as changed:  # the flavour changed: the retained copy is used
            float_sha = hashlib.sha256(backbone_models.float_model).hexdigest()
            wait_until(lambda: getattr(changed.recognizer.backbone, "sha256", "") == float_sha)
            assert changed.recognizer.ready
    finally:
        aggregator.close()


def test_the_worker_lets_go_of_a_finished_job(
    tmp_path: Path, broker: LocalBroker, gallery: Path
) -> None:
    """A backbone install's job holds the whole artifact (both flatbuffers, ~28 MB):
    once it has run, nothing may keep it alive until the next round's job."""

    class Payload:
        """Stands for the artifact a job's closure captures."""

    payload = Payload()
    alive = weakref.ref(payload)
    ran = threading.Event()

    def job(held: Payload = payload) -> None:
        ran.set()

    with running(make_config(tmp_path, broker.port, gallery)) as node:
        node._jobs.put(job)
        del job, payload
        assert ran.wait(10)
        wait_until(lambda: alive() is None, 10)


def test_a_head_that_does_not_fit_the_backbone_is_refused(
    tmp_path: Path, broker: LocalBroker, gallery: Path, backbone_models: BackboneModels
) -> None:
    aggregator = Probe(broker.port, TOPICS.status(DEVICE))
    try:
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
            assert node.model_version == 1
            assert node.recognizer.version == 1
    finally:
        aggregator.close()


def test_a_new_lineage_is_accepted_at_version_0_and_its_rounds_start_afresh(
    tmp_path: Path,
    broker: LocalBroker,
    gallery: Path,
    base: Base,
    backbone_models: BackboneModels,
) -> None:
    """An aggregator reset or upgrade: version 0 of another lineage replaces version 5.

    Issue 18 item 7: only a lineage of a higher epoch does; the older lineage's signed
    head or backbone replayed on the model topics afterwards is refused."""
    aggregator = Probe(broker.port, TOPICS.all_updates)
    config = make_config(tmp_path, broker.port, gallery)
    old = partial(global_payload, base, backbone=backbone_models.sha256, lineage="old", epoch=1)
    new = partial(global_payload, base, backbone=backbone_models.sha256, lineage="new", epoch=2)
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models, "old", epoch=1))
        aggregator.publish(TOPICS.global_model, old(5), retain=True)
        aggregator.publish(
            TOPICS.round, round_payload(7, base_version=5, lineage="old"), retain=True
        )
        with running(config) as node:
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 7, base_version=5)
            wait_until(lambda: node.last_round == 7)
            aggregator.publish(TOPICS.global_model, old(4))  # older, same lineage: ignored
            aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models, "new", epoch=2))
            aggregator.publish(TOPICS.global_model, new(0), retain=True)
            wait_until(lambda: node.model_version == 0)
            assert node.last_round == 0  # the old lineage's round counter is gone
            assert NodeState(config.state_dir).load_last_round() == 0
            aggregator.publish(TOPICS.global_model, old(6))  # the old lineage replayed: refused
            aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models, "old", epoch=1))
            wait_until(lambda: node.counters["old_lineage"] == 2)
            assert node.model_version == 0
            assert node.artifacts._installed == ("new", 0)
            aggregator.publish(TOPICS.round, round_payload(1, base_version=0, lineage="new"))
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1, base_version=0)
            wait_until(lambda: node.last_round == 1)
            stored = NodeState(config.state_dir).load_global()
            assert stored is not None
            assert (stored.lineage, stored.version) == ("new", 0)
            assert node.counters == {"old_lineage": 2}
    finally:
        aggregator.close()


def test_an_old_closed_set_state_folder_is_dropped_for_the_new_lineage(
    tmp_path: Path,
    broker: LocalBroker,
    gallery: Path,
    base: Base,
    backbone_models: BackboneModels,
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
    aggregator = Probe(broker.port, TOPICS.all_updates)
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        model = global_payload(base, 0, backbone=backbone_models.sha256)
        aggregator.publish(TOPICS.global_model, model, retain=True)
        with running(make_config(tmp_path, broker.port, gallery)) as node:
            wait_until(lambda: node.model_version == 0)
            aggregator.publish(TOPICS.round, round_payload(1, base_version=0))
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1, base_version=0)
    finally:
        aggregator.close()


def threshold_naming(
    models: BackboneModels, visitor: Chip, gallery: Path, enrolled: list[Chip]
) -> float:
    """Midway between the visitor's similarity to the residents and to their own enrolled
    chips, as the doorbell's recognizer computes them (generated faces separate by a few
    hundredths only, so no fixed threshold holds on every checkout)."""
    residents = ready_recognizer(models.float_model, models.sha256, Gallery(gallery))
    to_others = residents.recognize(visitor)[1]
    own = Gallery(gallery.parent / "own")
    own.add("visitor", enrolled)
    to_own = ready_recognizer(models.float_model, models.sha256, own).recognize(visitor)[1]
    assert to_own - to_others > 0.01, f"own {to_own:.4f}, residents {to_others:.4f}: no room"
    return (to_own + to_others) / 2


def test_enrollment_and_removal_take_effect_at_once_and_send_nothing(
    tmp_path: Path, broker: LocalBroker, base: Base, backbone_models: BackboneModels
) -> None:
    """`python -m edge enroll` in another process; the running doorbell names the person
    within a second; nothing at all is published on fedbell/# meanwhile."""
    gallery = tmp_path / "gallery"
    Gallery(gallery).add("person0", chips_of(0, 3, 100))
    config = make_config(tmp_path, broker.port, gallery)
    config_path = tmp_path / "edge.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    photos = tmp_path / "photos"
    write_frames(photos, frames_of(4, 4, 401))
    visitor = chips_of(4, 1, 400)[0]
    threshold = threshold_naming(backbone_models, visitor, gallery, chips_of(4, 4, 401))
    aggregator = Probe(broker.port)
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        model = global_payload(base, 1, backbone=backbone_models.sha256, threshold=threshold)
        aggregator.publish(TOPICS.global_model, model, retain=True)
        with running(config) as node:
            wait_until(lambda: node.recognizer.persons == ("person0",))
            assert node.recognizer.recognize(visitor)[0] == UNKNOWN
            time.sleep(1.0)  # let the node's own start-up status go out first
            watcher = Probe(broker.port, f"{TOPICS.base}/#")
            try:
                enroll = [sys.executable, "-m", "edge", "enroll", "--config", str(config_path)]
                added = subprocess.run(
                    [*enroll, "--person", "newcomer", "--from-folder", str(photos)],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=True,
                )
                assert "newcomer: kept 4 chip(s) from 4 photo(s)" in added.stdout
                enrolled_at = time.monotonic()  # the CLI left the chips' features too
                wait_until(lambda: node.recognizer.recognize(visitor)[0] == "newcomer", 5)
                assert time.monotonic() - enrolled_at < 1.0
                assert not list((config.state_dir / "incoming-features").glob("*.npz"))
                removed = subprocess.run(
                    [*enroll, "--remove", "newcomer"],
                    cwd=REPO,
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=True,
                )
                assert "removed newcomer (4 image(s))" in removed.stdout
                removed_at = time.monotonic()
                wait_until(lambda: node.recognizer.recognize(visitor)[0] == UNKNOWN, 5)
                assert time.monotonic() - removed_at < 1.0
                time.sleep(0.5)
                published = []
                while not watcher.messages.empty():
                    message = watcher.messages.get()
                    if not message.retain:  # retained: copies sent because we subscribed
                        published.append(message.topic)
                assert published == []  # enrollment sent nothing to the federation
            finally:
                watcher.close()
            assert not node.counters
    finally:
        aggregator.close()


def stranger_events(node: EdgeNode) -> set[str]:
    """The visitor events whose features the doorbell keeps as negatives (its state file)."""
    path = node.strangers.path
    if path is None or not path.is_file():
        return set()
    with np.load(path, allow_pickle=False) as data:
        return {str(e) for e in data["events"]}


def judged_visit(probe: Probe) -> dict[str, Any]:
    """The next visitor event judged with a model (before one, confidence is 0)."""
    while True:
        event: dict[str, Any] = json.loads(received(probe, "doorbell/frontdoor/visitor", 30))
        if event["confidence"] > 0:
            return event


def test_a_labelled_unknown_visitor_is_named_on_the_next_visit(
    tmp_path: Path, broker: LocalBroker, base: Base, backbone_models: BackboneModels
) -> None:
    """The camera side of a running doorbell: an unknown visitor's features become a
    training negative; a label names them, the negative goes, the next visit is named.

    The threshold comes from what this doorbell reports, not from a constant: at
    threshold 1 nobody is named and each event carries the visit's similarity to the
    nearest enrolled person; the visitor's similarity to person0 (before the label) and
    to their own labelled visit (after it) place the threshold midway between them, and
    a new head carries it. (A fixed 0.975 once missed this data by 0.0006.)
    """
    gallery = tmp_path / "gallery"
    Gallery(gallery).add("person0", chips_of(0, 3, 100))
    camera = tmp_path / "camera"  # a looping porch: a visit, then an empty porch
    empty = [np.full((480, 640, 3), 120, np.uint8)] * 8
    write_frames(camera, frames_of(5, 6, 77) + empty)
    config = make_config(tmp_path, broker.port, gallery).model_copy(
        update={
            # 5 frames/s: each frame is judged even on a loaded machine, where a faster
            # replay drops frames and a 6-frame visit may never get its 3 confirmations.
            "camera": CameraConfig(kind="folder", folder=camera, fps=5, loop=True),
            # (A replay: every visit is an event; 8 empty frames end a visit.)
            "recognition": RecognitionConfig(confirm_frames=3),
            "home_assistant": HomeAssistantConfig(enabled=False),
        }
    )
    aggregator = Probe(broker.port, "doorbell/frontdoor/visitor")
    try:
        aggregator.publish_backbone(TOPICS, tflite_payload(backbone_models))
        names_nobody = global_payload(base, 1, backbone=backbone_models.sha256, threshold=1.0)
        aggregator.publish(TOPICS.global_model, names_nobody, retain=True)
        with running(config) as node:
            event = judged_visit(aggregator)
            assert event["person"] == UNKNOWN
            to_others = event["confidence"]  # the visitor against person0, the only resident
            # (Later visits keep adding strangers: the labelled visit is followed by its id.)
            wait_until(lambda: event["event_id"] in stranger_events(node))
            label = {"event_id": event["event_id"], "person": "newcomer"}
            aggregator.publish("doorbell/frontdoor/label", json.dumps(label))
            wait_until(lambda: "newcomer" in node.recognizer.persons, 5)
            assert event["event_id"] not in stranger_events(node)  # no longer a stranger
            # Judged against the newcomer's prototype now (the visit under way when the
            # label came too: a visit is decided against the prototypes of its end).
            to_own = min(judged_visit(aggregator)["confidence"] for _ in range(2))
            gap = to_own - to_others
            # Frames repeat exactly: visits differ only by frames a loaded machine drops
            # (~0.001); 0.04 on this data, 0.01 still leaves 5x that on each side.
            assert gap > 0.01, f"own visit {to_own:.4f}, person0 {to_others:.4f}: no room"
            threshold = (to_own + to_others) / 2
            model = global_payload(base, 2, backbone=backbone_models.sha256, threshold=threshold)
            aggregator.publish(TOPICS.global_model, model, retain=True)
            wait_until(lambda: node.recognizer.threshold == threshold)
            for _ in range(5):  # the visit under the old head ends void (confidence 0)
                event = judged_visit(aggregator)
                if event["person"] != UNKNOWN:
                    break
            assert event["person"] == "newcomer", (event, to_own, to_others)
            assert node.live is not None
            assert node.live.publisher.counters.labels == 1
    finally:
        aggregator.close()


def test_state_ignores_a_model_whose_sidecar_does_not_match(tmp_path: Path, base: Base) -> None:
    names, weights = base
    state = NodeState(tmp_path)
    state.save_global(
        GlobalModel(
            version=5,
            round=4,
            names=tuple(names),
            weights=weights,
            lineage=LINEAGE,
            threshold=0.7,
            backbone="a" * 64,
        )
    )
    loaded = state.load_global()
    assert loaded is not None
    assert (loaded.version, loaded.lineage, loaded.threshold) == (5, LINEAGE, 0.7)
    assert loaded.backbone == "a" * 64
    assert all(np.array_equal(a, b) for a, b in zip(loaded.weights, weights, strict=True))
    (tmp_path / "global.npz").write_bytes(b"half-written")
    assert state.load_global() is None


def test_cli_runs_by_default_and_offers_enroll() -> None:
    from edge.__main__ import parse_args

    assert parse_args(["--config", "edge.yaml"]).command == "run"
    assert parse_args(["run", "--config", "edge.yaml", "--log-level", "DEBUG"]).log_level == "DEBUG"
    enroll = parse_args(["enroll", "--config", "edge.yaml", "--person", "ann"])
    assert (enroll.command, enroll.person) == ("enroll", "ann")
    remove = parse_args(["enroll", "--config", "edge.yaml", "--remove", "ann"])
    assert remove.remove == "ann"
