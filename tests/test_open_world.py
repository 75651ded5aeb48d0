"""Issue 11 with real processes: the aggregator CLI, `python -m edge` doorbells, Mosquitto.

- nothing under `fedbell/<site>/` (retained or not) carries an enrolled person's name;
- the upgrade from the closed-set version's state folders (aggregator and doorbells)
  ends in a working federation on a new lineage;
- an aggregator reset (its state folder deleted, the doorbells keep theirs) ends in
  a working federation: the doorbells take the new lineage's version 0 and its round 1.

Every aggregator uses the session's backbone cache; a process start (TensorFlow, the
backbone, features of the gallery) takes a minute or more on a loaded 2-core machine.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import uuid
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
import zstandard
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker
from fedbell.errors import RejectedMessage
from fedbell.faces.synthetic import person_name
from fedbell.wire import envelope
from fedbell.wire.messages import GlobalModel, parse_global
from fedbell.wire.protocol import DeviceStatus, RoundAnnouncement, TrainingPlan, to_json
from simulation.data import write_synthetic
from tests.federation import STARTUP, Federation, Process, Recorder
from tests.test_aggregator import MAX_BYTES, SITE, TOPICS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

ROUND = 300.0
"""Seconds a round may take (doorbells embed their galleries first)."""
DOORS = ("d1", "d2")
ROUNDS = {"timeout_s": ROUND, "min_updates": len(DOORS), "train": {"epochs": 1, "batch_size": 8}}
"""The aggregator's round settings: rounds of both doorbells, one short epoch each."""
HOUSES = {
    "d1": ("Zenobia-Quill", "Bartholomew_Fenwick"),
    "d2": ("Ottoline-Marsh", "Cassius_Pembrook"),
}
"""Who lives where: names no message, tensor name or number could contain by chance."""


def write_house(root: Path, names: tuple[str, ...], seed: int) -> Path:
    """A doorbell gallery: generated people at the door, in folders named after them."""
    generated = root / "generated"
    write_synthetic(generated, persons=len(names), photos=4, seed=seed)
    gallery = root / "gallery"
    gallery.mkdir()
    for index, name in enumerate(names):
        (generated / person_name(index)).rename(gallery / name)
    return gallery


def start_doorbells(federation: Federation) -> list[Process]:
    """Both doorbells, each with its house's named people, started."""
    galleries = {
        door: write_house(federation.root / f"house-{door}", HOUSES[door], seed)
        for seed, door in enumerate(DOORS, start=11)
    }
    return [federation.start_doorbell(door, gallery) for door, gallery in galleries.items()]


def at_version_0(status: DeviceStatus) -> bool:
    return status.model_version == 0


def installed_round_1(status: DeviceStatus) -> bool:
    return status.model_version == 1 and status.last_round == 1


def global_model(payload: bytes) -> GlobalModel:
    return parse_global(payload, site=SITE, max_bytes=MAX_BYTES, keys=None)


def lineage_of(payload: bytes) -> str | None:
    try:
        return global_model(payload).lineage
    except RejectedMessage:
        return None  # e.g. a closed-set model message: no lineage


def run_round(recorder: Recorder, round_id: int, since: int) -> None:
    """Start a round with both doorbells; it must be published with both updates."""
    recorder.command(cmd="start_round", devices=list(DOORS))
    metrics = recorder.metrics(round_id, timeout=ROUND, since=since)
    assert (metrics.outcome, metrics.participants) == ("published", len(DOORS)), metrics


def version_1_of(recorder: Recorder, lineage: str, since: int) -> GlobalModel:
    """Version 1 of `lineage`, published by round 1 and installed by both doorbells."""
    model = global_model(
        recorder.wait_for(
            TOPICS.global_model,
            lambda p: lineage_of(p) == lineage and global_model(p).version == 1,
            since=since,
        )
    )
    assert model.round == 1
    recorder.statuses(DOORS, installed_round_1, since=since)
    return model


def retained_messages(port: int, topic_filter: str) -> dict[str, bytes]:
    """Every retained message under `topic_filter`, as a new subscriber gets them.

    The broker sends a subscription's retained messages before anything published
    after it acknowledged the subscription: a message of our own, published then,
    marks the end of them.
    """
    barrier = f"fedbell-test/barrier/{uuid.uuid4().hex}"
    retained: dict[str, bytes] = {}
    subscribed, done = threading.Event(), threading.Event()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == barrier:
            done.set()
        elif message.retain:
            retained[message.topic] = bytes(message.payload)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.subscribe([(topic_filter, 1), (barrier, 1)])
        assert subscribed.wait(10), "no SUBACK"
        client.publish(barrier, b"end", qos=1).wait_for_publish(5)
        assert done.wait(30), "the barrier never came back"
    finally:
        client.disconnect()
        client.loop_stop()
    return retained


def readable_forms(payload: bytes) -> list[bytes]:
    """The payload as sent, and for an envelope its decoded header and inflated body."""
    forms = [payload]
    try:
        header, body = envelope.decode(payload, MAX_BYTES)
    except RejectedMessage:
        return forms  # JSON (statuses, rounds, metrics, replies): the raw bytes are the text
    forms.append(header.model_dump_json().encode())
    if header.compression == "zstd":
        forms.append(zstandard.ZstdDecompressor().decompress(body, max_output_size=MAX_BYTES))
    return forms


def test_nothing_under_the_site_names_an_enrolled_person(
    broker: LocalBroker, recorder: Recorder, federation: Federation
) -> None:
    federation.start_aggregator(**ROUNDS, codec="topk")
    nodes = start_doorbells(federation)
    recorder.statuses(DOORS, at_version_0, timeout=STARTUP)
    run_round(recorder, 1, since=0)
    recorder.statuses(DOORS, installed_round_1)
    for node in nodes:  # they did train on their named people
        assert "of 2 person(s)" in node.log(), node.log()[-2000:]

    retained = retained_messages(broker.port, f"{TOPICS.base}/#")
    expected = {
        TOPICS.global_model,
        TOPICS.tflite_model,
        TOPICS.metrics,
        TOPICS.round,
        TOPICS.aggregator_status,
        *(TOPICS.status(door) for door in DOORS),
    }
    assert expected <= set(retained), sorted(retained)
    seen = recorder.everything()  # and everything that went by, updates included
    assert {TOPICS.update(door) for door in DOORS} <= {topic for topic, _ in seen}

    names = [name for house in HOUSES.values() for name in house]
    words = {part for name in names for part in (name, *name.replace("_", "-").split("-"))}
    for topic, payload in [*retained.items(), *seen]:
        for form in readable_forms(payload):
            text = form.lower()
            leaked = [word for word in words if word.lower().encode() in text]
            assert not leaked, f"{topic} carries {leaked}"


# -- the closed-set version's state folders -------------------------------------------

OLD_CNN = {  # fedbell/model.py before lineages: 64x64 grey in, three people out
    "conv1/kernel": (3, 3, 1, 16),
    "conv1/bias": (16,),
    "conv2/kernel": (3, 3, 16, 32),
    "conv2/bias": (32,),
    "conv3/kernel": (3, 3, 32, 64),
    "conv3/bias": (64,),
    "conv4/kernel": (3, 3, 64, 64),
    "conv4/bias": (64,),
    "embed/kernel": (1024, 128),
    "embed/bias": (128,),
    "identity/kernel": (128, 3),
    "identity/bias": (3,),
}
OLD_LABELS = ["Zenobia-Quill", "Bartholomew_Fenwick", "Ottoline-Marsh"]
OLD_VERSION = 15


def old_weights(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.normal(0, 0.05, size=shape).astype(np.float32) for shape in OLD_CNN.values()]


def npz(arrays: list[np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def old_global_payload() -> bytes:
    """The retained closed-set model message the old aggregator left on the broker."""
    body = zstandard.ZstdCompressor().compress(b"".join(w.tobytes() for w in old_weights(0)))
    header = envelope.Header(
        kind="global",
        site=SITE,
        round=OLD_VERSION,
        model_version=OLD_VERSION,
        sender="aggregator",
        codec="float32",
        tensors=tuple(envelope.TensorSpec(name=n, shape=s) for n, s in OLD_CNN.items()),
        body_size=len(body),
        body_sha256=envelope.body_digest(body),
        meta={"labels": OLD_LABELS, "created": 1.0},
    )
    return envelope.encode(header, body)


def write_old_aggregator_state(folder: Path) -> None:
    """state.json as aggregator/state.py wrote it before lineages (e2b916a): no lineage,
    the CNN's tensors, version 15 after round 15, and its retained payloads."""
    folder.mkdir(parents=True)
    model = "model-0123456789ab.npz"
    (folder / model).write_bytes(npz(old_weights(0)))
    retained = {"global": "global-0123456789ab.bin", "metrics": "metrics-0123456789ab.bin"}
    (folder / retained["global"]).write_bytes(old_global_payload())
    (folder / retained["metrics"]).write_bytes(b'{"round": 15, "accuracy": 0.97}')
    state = {
        "model": {
            "version": OLD_VERSION,
            "round": OLD_VERSION,
            "names": list(OLD_CNN),
            "file": model,
            "optimizer": None,
            "optimizer_file": None,
            "optimizer_steps": 0,
        },
        "round": None,
        "last_round": OLD_VERSION,
        "retained": retained,
    }
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def _pair(
    folder: Path, data_name: str, sidecar_name: str, data: bytes, sidecar: dict[str, object]
) -> None:
    (folder / data_name).write_bytes(data)
    record = {**sidecar, "sha256": hashlib.sha256(data).hexdigest()}
    (folder / sidecar_name).write_text(json.dumps(record, indent=1))


def write_old_doorbell_state(folder: Path, seed: int) -> None:
    """A doorbell's state folder as edge/state.py wrote it before lineages (e2b916a):
    the closed-set model v15 with its labels, its TFLite, round 15 done, a top-k residual."""
    folder.mkdir(parents=True)
    meta = {"labels": OLD_LABELS, "created": 1.0}
    sidecar = {"version": OLD_VERSION, "round": OLD_VERSION, "names": list(OLD_CNN), "meta": meta}
    _pair(folder, "global.npz", "global.json", npz(old_weights(seed)), sidecar)
    artifact = {
        "version": OLD_VERSION,
        "round": OLD_VERSION,
        "flavour": "int8",
        "labels": OLD_LABELS,
        "threshold": 0.6,
    }
    _pair(folder, "model.tflite", "model.json", b"\x1c\x00\x00\x00TFL3" + bytes(64), artifact)
    residual = [w * 0.01 for w in old_weights(seed + 1)]
    _pair(folder, "residual.npz", "residual.json", npz(residual), {"tensors": len(residual)})
    (folder / "round.json").write_text(json.dumps({"last_round": OLD_VERSION}))


def publish_retained(port: int, messages: dict[str, bytes]) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        for topic, payload in messages.items():
            client.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    finally:
        client.disconnect()
        client.loop_stop()


def test_upgrade_from_the_closed_set_state_ends_in_a_working_federation(
    tmp_path: Path, broker: LocalBroker, recorder: Recorder, federation: Federation
) -> None:
    write_old_aggregator_state(tmp_path / "state")
    for seed, door in enumerate(DOORS):
        write_old_doorbell_state(tmp_path / door, seed)
    old_round = RoundAnnouncement(
        round=OLD_VERSION,
        base_version=OLD_VERSION - 1,
        phase="closed",
        selected=DOORS,
        deadline=1.0,
        codec="topk",
        train=TrainingPlan(),
    )
    # What the old aggregator left retained on the broker.
    publish_retained(
        broker.port, {TOPICS.global_model: old_global_payload(), TOPICS.round: to_json(old_round)}
    )
    mark = recorder.mark()

    # The doorbells come back first, with their old model and round 15 behind them.
    nodes = start_doorbells(federation)
    aggregator = federation.start_aggregator(**ROUNDS)
    assert "starting a new lineage" in aggregator.log()
    first = global_model(
        recorder.wait_for(
            TOPICS.global_model, lambda p: lineage_of(p) is not None, STARTUP, since=mark
        )
    )
    assert first.version == 0
    recorder.statuses(DOORS, at_version_0, timeout=STARTUP, since=mark)

    run_round(recorder, 1, since=mark)
    version_1_of(recorder, first.lineage, since=mark)
    for node in nodes:
        assert "round 1: update sent" in node.log(), node.log()[-3000:]
    # The closed-set model is gone from the broker: a late doorbell gets the new lineage.
    retained = retained_messages(broker.port, f"{TOPICS.base}/model/#")
    assert lineage_of(retained[TOPICS.global_model]) == first.lineage
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert (state["model"]["lineage"], state["model"]["version"]) == (first.lineage, 1)


def test_an_aggregator_reset_ends_in_a_working_federation(
    tmp_path: Path, recorder: Recorder, federation: Federation
) -> None:
    aggregator = federation.start_aggregator(**ROUNDS)
    start_doorbells(federation)
    recorder.statuses(DOORS, at_version_0, timeout=STARTUP)
    run_round(recorder, 1, since=0)
    before = global_model(recorder.payloads(TOPICS.global_model)[-1])
    assert before.version == 1
    recorder.statuses(DOORS, installed_round_1)

    # The reset: the aggregator's state folder is gone, the doorbells keep theirs
    # (version 1 of the old lineage, round 1 done).
    aggregator.stop()
    shutil.rmtree(tmp_path / "state")
    mark = recorder.mark()
    aggregator.start().wait_log("ready: site", timeout=STARTUP)
    reset = global_model(
        recorder.wait_for(
            TOPICS.global_model,
            lambda p: lineage_of(p) not in (None, before.lineage),
            STARTUP,
            since=mark,
        )
    )
    assert reset.version == 0  # lower than the doorbells' version 1: accepted all the same
    recorder.statuses(DOORS, at_version_0, timeout=STARTUP, since=mark)

    run_round(recorder, 1, since=mark)  # the new lineage's round 1: a number they have done
    announced = RoundAnnouncement.model_validate_json(
        recorder.wait_for(TOPICS.round, lambda p: b'"train"' in p, since=mark)
    )
    assert (announced.round, announced.lineage) == (1, reset.lineage)
    version_1_of(recorder, reset.lineage, since=mark)
