"""End to end: a generated doorbell video → OpenCV file source → Haar → TFLite → real Mosquitto."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from broker.local import LocalBroker
from edge.camera import open_source
from edge.detector import FaceDetector
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.homeassistant import DoorbellTopics
from edge.pipeline import Pipeline
from edge.recognition_config import CameraConfig, RecognitionConfig
from edge.recognizer import ModelArtifact, Recognizer
from fedbell.calibration import calibrate_threshold
from fedbell.synthetic import make_identities, write_visitor_video
from tests.mqtt_helpers import Probe
from tests.recognition_helpers import KNOWN, SEED, faces_of, trained_model

STATUS = "fedbell/home/status/door1"
FRAMES_PER_VISIT = 8
GAP_FRAMES = 4


class FrameClock:
    """One second per frame, so debounce and presence do not depend on machine speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def node_client(port: int) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="door1", protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    return client


def calibrated_threshold(recognizer: Recognizer) -> float:
    """As the aggregator would: held-out known faces and held-out strangers, 1 % FAR.

    Stricter than the aggregator's default 5 %: at 5 % the video's stranger
    was named on one machine and not on another (same code and packages,
    other CPU: training's floating point differs), while known visitors'
    per-visit scores (~0.97) leave ample room above a 1 % threshold."""
    model = trained_model()
    known = [f for i in range(KNOWN) for f in faces_of(model.identities[i], 10, 700 + i)]
    strangers = make_identities(6, SEED + 2000)  # neither enrolled nor the test's visitors
    unknown = [f for j, o in enumerate(strangers) for f in faces_of(o, 10, 800 + j)]
    return calibrate_threshold(
        recognizer.probabilities_batch(known), 0.01, recognizer.probabilities_batch(unknown)
    )


def drain_visitors(probe: Probe, expected: int, timeout: float = 10.0) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    while len(events) < expected:
        events.append(json.loads(probe.wait_for("doorbell/door1/visitor", timeout).payload))
    return events


def test_video_replay_names_each_visitor_and_unknown_stranger(
    broker: LocalBroker, tmp_path: Path
) -> None:
    model = trained_model()
    recognizer = Recognizer()
    recognizer.swap(ModelArtifact(model.float_tflite, model.labels, version=1))
    threshold = calibrated_threshold(recognizer)
    recognizer.swap(ModelArtifact(model.float_tflite, model.labels, threshold, version=2))

    stranger = KNOWN  # identity KNOWN was never enrolled
    visitors = [0, 3, stranger, 5, 1]
    video = tmp_path / "porch.avi"
    write_visitor_video(
        video,
        [model.identities[i] for i in visitors],
        np.random.default_rng(42),
        frames_per_visitor=FRAMES_PER_VISIT,
        gap_frames=GAP_FRAMES,
    )

    probe = Probe(broker.port, "doorbell/door1/#")
    client = node_client(broker.port)
    publisher = EventPublisher(
        client, DoorbellTopics("door1"), STATUS, RecentCrops(), tmp_path / "g"
    )
    clock = FrameClock()
    config = RecognitionConfig(debounce_s=10.0, confirm_frames=2, absent_after_s=2.0)
    pipeline = Pipeline(FaceDetector(), recognizer, publisher, config, clock=clock)
    source = open_source(CameraConfig(kind="opencv", device=str(video)))
    try:
        names_per_visit = []
        for _visit in visitors:
            before = pipeline.counters.visitor_events
            for _ in range(FRAMES_PER_VISIT + GAP_FRAMES):
                frame = source.read()
                assert frame is not None
                pipeline.process(frame)
                clock.now += 1.0
            new = pipeline.counters.visitor_events - before
            names_per_visit.append([e["person"] for e in drain_visitors(probe, new)])
        assert source.read() is None
        assert source.status.state == "ended"
    finally:
        source.close()
        probe.close()
        client.loop_stop()
        client.disconnect()

    expected = [model.labels[i] if i != stranger else "unknown" for i in visitors]
    # One event per visit, named from the visit's frames, not from its first frame.
    assert names_per_visit == [[name] for name in expected], (names_per_visit, threshold)
    assert pipeline.counters.frames == len(visitors) * (FRAMES_PER_VISIT + GAP_FRAMES)
    assert pipeline.counters.faces >= 0.8 * len(visitors) * FRAMES_PER_VISIT
    assert pipeline.counters.errors == 0


def test_events_are_not_retained_but_state_is(broker: LocalBroker, tmp_path: Path) -> None:
    client = node_client(broker.port)
    publisher = EventPublisher(
        client, DoorbellTopics("door1"), STATUS, RecentCrops(), tmp_path / "g"
    )
    publisher.announce()
    publisher.visitor("alice", 0.9, (1, 2, 3, 4))
    publisher.ring("command")
    publisher.present(True)
    time.sleep(0.3)
    late = Probe(broker.port, "doorbell/door1/#", "homeassistant/#")
    try:
        seen = {}
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                msg = late.messages.get(timeout=0.2)
            except Exception:
                continue
            seen[msg.topic] = msg
        assert set(seen) == {
            "doorbell/door1/present",
            "homeassistant/device/door1/config",
        }
        assert all(msg.retain for msg in seen.values())
        assert seen["doorbell/door1/present"].payload == b"ON"
    finally:
        late.close()
        client.loop_stop()
        client.disconnect()


def test_commands_ring_and_face_trigger(broker: LocalBroker, tmp_path: Path) -> None:
    model = trained_model()
    recognizer = Recognizer(threshold_override=0.0)
    recognizer.swap(ModelArtifact(model.float_tflite, model.labels))
    client = node_client(broker.port)
    publisher = EventPublisher(
        client, DoorbellTopics("door1"), STATUS, RecentCrops(), tmp_path / "g"
    )
    config = RecognitionConfig(ring_on_face_frames=3, confirm_frames=1)
    pipeline = Pipeline(FaceDetector(), recognizer, publisher, config)
    publisher.on_ring_command = lambda: pipeline.ring("command")
    publisher.attach()
    for topic, qos in publisher.subscriptions():
        client.subscribe(topic, qos)
    probe = Probe(broker.port, "doorbell/door1/ring")
    visitors = Probe(broker.port, "doorbell/door1/visitor")
    try:
        time.sleep(0.3)
        probe.publish("doorbell/door1/command", b"not json")
        probe.publish("doorbell/door1/command", json.dumps({"cmd": "ring"}))
        ring = json.loads(probe.wait_for("doorbell/door1/ring", 5).payload)
        assert ring["source"] == "command"
        assert ring["person"] is None
        assert publisher.counters.rejected == 1

        from fedbell.synthetic import make_scene, render_face

        rng = np.random.default_rng(3)
        for _ in range(5):
            face = render_face(model.identities[2], rng)
            pipeline.process(make_scene([face], rng).frame)
        ring = json.loads(probe.wait_for("doorbell/door1/ring", 5).payload)
        assert ring["source"] == "face"
        assert pipeline.counters.rings == 2

        # Label that visitor over MQTT: the event's crop joins the gallery.
        visitor = json.loads(visitors.wait_for("doorbell/door1/visitor", 5).payload)
        probe.publish("doorbell/door1/label", json.dumps({"event_id": "nope", "person": "x"}))
        probe.publish(
            "doorbell/door1/label", json.dumps({"event_id": visitor["event_id"], "person": "dora"})
        )
        deadline = time.monotonic() + 5
        while publisher.counters.labels == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(list((tmp_path / "g" / "dora").glob("*.png"))) == 1
        assert publisher.counters.rejected == 2  # the bad command and the unknown event id
    finally:
        probe.close()
        visitors.close()
        client.loop_stop()
        client.disconnect()


def test_run_loop_stops_and_survives_bad_frames(tmp_path: Path) -> None:
    class Sink:
        def __init__(self) -> None:
            self.present_states: list[bool] = []

        def visitor(self, *args: object, **kwargs: object) -> str:
            return "x"

        def ring(self, *args: object, **kwargs: object) -> str:
            return "x"

        def present(self, present: bool) -> None:
            self.present_states.append(present)

    class Frames:
        def __init__(self) -> None:
            self.items: list[np.ndarray] = [
                np.zeros((480, 640, 3), np.uint8),
                np.zeros((0, 0), np.uint8),  # broken frame
                np.zeros((480, 640, 3), np.uint8),
            ]

        def read(self) -> np.ndarray | None:
            return self.items.pop(0) if self.items else None

        def close(self) -> None:
            pass

    pipeline = Pipeline(FaceDetector(), Recognizer(), Sink())
    pipeline.run(Frames(), threading.Event())
    assert pipeline.counters.frames == 3
    assert pipeline.counters.errors == 1


@pytest.mark.parametrize("kind", ["ring"])
def test_ring_without_face_names_nobody(kind: str, tmp_path: Path) -> None:
    rings: list[tuple[str, str | None]] = []

    class Sink:
        def visitor(self, *args: object, **kwargs: object) -> str:
            raise AssertionError("no face, no visitor event")

        def ring(self, source: str, person: str | None = None, frame: object = None) -> str:
            rings.append((source, person))
            return "x"

        def present(self, present: bool) -> None:
            pass

    Pipeline(FaceDetector(), Recognizer(), Sink()).ring("button")
    assert rings == [("button", None)]
