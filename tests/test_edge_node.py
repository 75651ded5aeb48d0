"""The doorbell node against a real Mosquitto, real TensorFlow and a real TFLite interpreter.

The test plays the aggregator: it publishes retained global models, TFLite
artifacts and round announcements built with the shared contract, and reads
what the node publishes back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from broker.local import LocalBroker
from edge.config import EdgeConfig, TrainingSettings
from edge.node import EdgeNode
from edge.recognition_config import CameraConfig
from edge.state import NodeState
from fedbell import signing
from fedbell.config import MqttSettings, SigningSettings
from fedbell.messages import (
    AGGREGATOR,
    GlobalModel,
    Signer,
    build_global,
    build_tflite,
    parse_update,
)
from fedbell.model import build_model, get_weights, tensor_specs, to_tflite, weight_names
from fedbell.protocol import DeviceStatus, RoundAnnouncement, TrainingPlan, parse_json, to_json
from fedbell.synthetic import make_dataset
from fedbell.topics import Topics
from tests.mqtt_helpers import Probe

REPO = Path(__file__).resolve().parents[1]
SITE = "home"
DEVICE = "frontdoor"
TOPICS = Topics(SITE)
LABELS = ("person00", "person01")  # the gallery also holds person02, who is not a label
LABELLED_IMAGES = 6


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gallery")
    make_dataset(root, persons=3, images_per_person=3, seed=7)
    return root


@pytest.fixture(scope="module")
def base() -> tuple[list[str], list[np.ndarray]]:
    model = build_model(len(LABELS), seed=3)
    return weight_names(model), get_weights(model)


@pytest.fixture(scope="module")
def tflite(gallery: Path) -> tuple[bytes, bytes]:
    from edge.gallery import Gallery

    faces = Gallery(gallery).training_set(LABELS, 10).images
    return to_tflite(build_model(len(LABELS), seed=3), faces)


def make_config(tmp_path: Path, port: int, gallery: Path, **signing_files: Path) -> EdgeConfig:
    return EdgeConfig(
        device_id=DEVICE,
        site=SITE,
        mqtt=MqttSettings(port=port, keepalive=5),
        signing=SigningSettings(**signing_files),
        state_dir=tmp_path / "state",
        gallery_dir=gallery,
        training=TrainingSettings(base_model_wait_s=20),
        camera=CameraConfig(enabled=False),
    )


def global_payload(
    base: tuple[list[str], list[np.ndarray]], version: int, key: Ed25519PrivateKey | None = None
) -> bytes:
    names, weights = base
    return build_global(
        site=SITE,
        signer=Signer(AGGREGATOR, key),
        version=version,
        round_id=max(0, version - 1),
        names=names,
        weights=weights,
        meta={"labels": list(LABELS)},
    )


def round_payload(
    number: int,
    phase: str = "train",
    selected: tuple[str, ...] = (DEVICE,),
    send_when_trained: bool = True,
    codec: str = "float16",
) -> bytes:
    return to_json(
        RoundAnnouncement.model_validate(
            {
                "round": number,
                "base_version": 1,
                "phase": phase,
                "selected": selected,
                "deadline": time.time() + 120,
                "codec": codec,
                "density": 0.1,
                "train": TrainingPlan(epochs=1, batch_size=8, prox_mu=0.01),
                "send_when_trained": send_when_trained,
            }
        )
    )


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
    base: tuple[list[str], list[np.ndarray]],
    round_id: int,
    keys: dict[str, Any] | None = None,
) -> None:
    names, weights = base
    update = parse_update(
        payload,
        site=SITE,
        device=DEVICE,
        expected=tensor_specs(names, weights),
        max_bytes=1 << 24,
        keys=keys,
    )
    assert (update.round, update.base_version) == (round_id, 1)
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
                assert online.gallery_size == 9
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
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: tuple[list[str], list[np.ndarray]]
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
        restarted = EdgeNode(config)  # not connected: the model comes from its state folder
        assert restarted.model_version == 1
    finally:
        aggregator.close()


def test_selected_node_waits_for_its_base_model_and_trains_once(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: tuple[list[str], list[np.ndarray]]
) -> None:
    aggregator = Probe(broker.port, TOPICS.all_updates)
    config = make_config(tmp_path, broker.port, gallery)
    try:
        with running(config) as node:
            aggregator.publish(TOPICS.round, round_payload(1), retain=True)
            time.sleep(0.5)  # the round arrives before the model it is based on
            aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
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


def test_unselected_node_publishes_nothing(
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: tuple[list[str], list[np.ndarray]]
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
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: tuple[list[str], list[np.ndarray]]
) -> None:
    """Step-by-step mode, with a top-k update whose remainder stays on the device."""
    aggregator = Probe(broker.port, TOPICS.all_updates)
    config = make_config(tmp_path, broker.port, gallery)
    held = partial(round_payload, 2, send_when_trained=False, codec="topk")
    try:
        aggregator.publish(TOPICS.global_model, global_payload(base, 1), retain=True)
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
    tmp_path: Path, broker: LocalBroker, gallery: Path, base: tuple[list[str], list[np.ndarray]]
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
    aggregator = Probe(broker.port, TOPICS.all_updates)
    try:
        with running(config) as node:
            aggregator.publish(TOPICS.global_model, global_payload(base, 1, aggregator_key))
            wait_until(lambda: node.model_version == 1)
            rogue = global_payload(base, 2, Ed25519PrivateKey.generate())
            aggregator.publish(TOPICS.global_model, rogue)
            aggregator.publish(TOPICS.global_model, global_payload(base, 3))  # unsigned
            corrupted = bytearray(global_payload(base, 4, aggregator_key))
            corrupted[-1] ^= 0xFF
            aggregator.publish(TOPICS.global_model, bytes(corrupted))
            wait_until(lambda: sum(node.counters.values()) == 3)
            assert node.counters == {"bad_signature": 1, "unsigned": 1, "bad_checksum": 1}
            assert node.model_version == 1
            stored = NodeState(config.state_dir).load_global()
            assert isinstance(stored, GlobalModel)
            assert stored.version == 1

            # Rounds are signed too (issue 13 item 4): the node trusts a key, so an
            # unsigned announcement would be refused.
            signed = signing.sign_announcement(
                RoundAnnouncement.model_validate_json(round_payload(1)), SITE, aggregator_key
            )
            aggregator.publish(TOPICS.round, to_json(signed))
            device_key = {DEVICE: signing.load_public_key(keys / "device.pub")}
            check_update(received(aggregator, TOPICS.update(DEVICE)), base, 1, keys=device_key)
    finally:
        aggregator.close()


def test_tflite_artifact_is_stored_and_run_on_the_gallery(
    tmp_path: Path, broker: LocalBroker, gallery: Path, tflite: tuple[bytes, bytes]
) -> None:
    float_model, int8_model = tflite
    aggregator = Probe(broker.port, TOPICS.status(DEVICE))
    config = make_config(tmp_path, broker.port, gallery)
    try:
        artifact = build_tflite(
            site=SITE,
            signer=Signer(AGGREGATOR),
            version=1,
            round_id=0,
            float_model=float_model,
            int8_model=int8_model,
            labels=LABELS,
            threshold=0.5,
        )
        aggregator.publish(TOPICS.tflite_model, artifact, retain=True)
        with running(config) as node:
            wait_until(lambda: node.gallery_accuracy is not None)
            assert node.recognizer.version == 1
            wait_until(lambda: "gallery accuracy" in next_status(aggregator).detail)
            broken = build_tflite(
                site=SITE,
                signer=Signer(AGGREGATOR),
                version=2,
                round_id=1,
                float_model=b"not a flatbuffer",
                int8_model=b"junk",
                labels=LABELS,
                threshold=0.5,
            )
            aggregator.publish(TOPICS.tflite_model, broken, retain=True)
            wait_until(lambda: node.counters["bad_artifact"] == 1)
            assert node.recognizer.version == 1
        stored = NodeState(config.state_dir).load_artifact()
        assert stored is not None
        assert (stored.version, stored.flavour, stored.labels) == (1, "int8", LABELS)
        assert stored.model == int8_model
        assert (config.state_dir / "model.tflite").read_bytes() == int8_model
        with running(config) as restarted:  # recognises with the stored model at once
            assert restarted.recognizer.version == 1
            wait_until(lambda: restarted.counters["bad_artifact"] == 1)  # v2 retried, refused
            assert restarted.recognizer.version == 1
    finally:
        aggregator.close()


def test_state_ignores_a_model_whose_sidecar_does_not_match(
    tmp_path: Path, base: tuple[list[str], list[np.ndarray]]
) -> None:
    names, weights = base
    state = NodeState(tmp_path)
    state.save_global(
        GlobalModel(
            version=5, round=4, names=tuple(names), weights=weights, meta={"labels": list(LABELS)}
        )
    )
    loaded = state.load_global()
    assert loaded is not None
    assert loaded.version == 5
    assert loaded.labels == list(LABELS)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.weights, weights, strict=True))
    (tmp_path / "global.npz").write_bytes(b"half-written")
    assert state.load_global() is None


def test_cli_runs_by_default_and_offers_enroll() -> None:
    from edge.__main__ import parse_args

    assert parse_args(["--config", "edge.yaml"]).command == "run"
    assert parse_args(["run", "--config", "edge.yaml", "--log-level", "DEBUG"]).log_level == "DEBUG"
    enroll = parse_args(["enroll", "--config", "edge.yaml", "--person", "ann"])
    assert (enroll.command, enroll.person) == ("enroll", "ann")
