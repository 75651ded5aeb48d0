"""Live recognition on replayed frames: a doorbell's pipeline with the federated model.

Generates porch frames in which known people (their held-out photos, never
trained on) and strangers walk up to the door, replays them through the edge
node's own pipeline (frame source, Haar detector, LiteRT recogniser, event
publisher) with the int8 TFLite model the aggregator published, and collects
the visitor events from the broker as Home Assistant would see them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge.camera import FolderSource
from edge.detector import FaceDetector
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.homeassistant import DoorbellTopics
from edge.pipeline import Pipeline
from edge.recognition_config import RecognitionConfig
from edge.recognizer import UNKNOWN, ModelArtifact, Recognizer
from fedbell.config import MqttSettings
from fedbell.dataset import Sample
from fedbell.faces import Box, UInt8Image, read_image
from fedbell.messages import parse_tflite
from fedbell.mqtt import connect, make_client
from fedbell.synthetic import make_identities, make_scene, render_face
from simulation.driver import Driver
from simulation.stack import topics

FRAMES_PER_VISITOR = 10
GAP_FRAMES = 6
REPLAY_FPS = 10.0
STRANGER_SEED_OFFSET = 10_007
"""Strangers come from another seed, so none of them is a trained identity."""


class ReplayClock:
    """Video time, one frame per call: debouncing then does not depend on CPU speed,
    and the replay runs as fast as the machine allows."""

    def __init__(self) -> None:
        self.frames = 0

    def __call__(self) -> float:
        self.frames += 1
        return self.frames / REPLAY_FPS


class VisitLog:
    """The pipeline's event sink: forwards to the doorbell's publisher, and notes
    during which visit each visitor event came, to score the names against the truth."""

    def __init__(self, publisher: EventPublisher, clock: ReplayClock, visits: int) -> None:
        self.publisher = publisher
        self.clock = clock
        self.named: list[list[str]] = [[] for _ in range(visits)]

    def visitor(
        self,
        person: str,
        confidence: float,
        box: Box | None,
        crop: UInt8Image | None = None,
        frame: UInt8Image | None = None,
    ) -> str:
        visit = (self.clock.frames - 1) // (FRAMES_PER_VISITOR + GAP_FRAMES)
        if 0 <= visit < len(self.named):
            self.named[visit].append(person)
        return self.publisher.visitor(person, confidence, box, crop, frame)

    def ring(self, source: str, person: str | None = None, frame: UInt8Image | None = None) -> str:
        return self.publisher.ring(source, person, frame)

    def present(self, present: bool) -> None:
        self.publisher.present(present)


@dataclass(frozen=True)
class LiveResult:
    visitors: tuple[str, ...]
    """Who walked up, in order ("unknown" for a stranger)."""
    named: tuple[tuple[str, ...], ...]
    """What the doorbell's visitor events called each of them."""
    frames: int
    faces: int
    events: tuple[dict[str, Any], ...]
    """The visitor events as the broker delivered them."""
    model_version: int
    threshold: float

    @property
    def correct(self) -> int:
        return sum(truth in names for truth, names in zip(self.visitors, self.named, strict=True))

    def as_dict(self) -> dict[str, Any]:
        return {
            "visits": [
                {"visitor": truth, "named": list(names)}
                for truth, names in zip(self.visitors, self.named, strict=True)
            ],
            "visits_named_correctly": self.correct,
            "frames": self.frames,
            "faces": self.faces,
            "model_version": self.model_version,
            "threshold": self.threshold,
            "events": [
                {k: e.get(k) for k in ("topic", "event_type", "person", "confidence")}
                for e in self.events
            ],
        }


def write_frames(
    folder: Path,
    held_out: Sequence[Sample],
    labels: Sequence[str],
    *,
    visitors: int,
    strangers: int,
    seed: int,
) -> list[str]:
    """Numbered porch frames of each visitor in turn, empty porch in between."""
    rng = np.random.default_rng(seed)
    photos = {label: [s.path for s in held_out if s.person == label] for label in labels}
    known = [
        str(p)
        for p in rng.choice(
            [x for x in labels if photos[x]], size=min(visitors, len(labels)), replace=False
        )
    ]
    strange = make_identities(strangers, seed + STRANGER_SEED_OFFSET)
    queue: list[tuple[str, Any]] = [(name, None) for name in known]
    queue += [(UNKNOWN, identity) for identity in strange]
    order = [queue[i] for i in rng.permutation(len(queue))]
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for name, identity in order:
        for k in range(FRAMES_PER_VISITOR + GAP_FRAMES):
            if k >= FRAMES_PER_VISITOR:
                frame = make_scene([], rng).frame
            elif identity is None:
                own = photos[name]
                frame = make_scene([read_image(own[k % len(own)])], rng).frame
            else:
                frame = make_scene([render_face(identity, rng)], rng).frame
            cv2.imwrite(str(folder / f"{index:05d}.png"), frame)
            index += 1
    return [name for name, _ in order]


def load_artifact(
    payload: bytes, site: str, keys: Mapping[str, Ed25519PublicKey] | None, max_bytes: int
) -> ModelArtifact:
    """The int8 model a Pi runs, checked exactly as a node checks it."""
    artifact = parse_tflite(payload, site=site, max_bytes=max_bytes, keys=keys)
    return ModelArtifact(
        tflite=artifact.int8_model,
        labels=artifact.labels,
        threshold=artifact.threshold,
        version=artifact.version,
    )


def replay(
    driver: Driver,
    settings: MqttSettings,
    artifact: ModelArtifact,
    *,
    device: str,
    gallery: Path,
    frames: Path,
    visitors: Sequence[str],
) -> LiveResult:
    """Run `device`'s pipeline over `frames`; its events come back through the driver."""
    recognizer = Recognizer(num_threads=1)
    recognizer.swap(artifact)
    client = make_client(settings, client_id=f"{device}-live")
    connect(client, settings)
    try:
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Only events are published here: the node process owns its availability state.
        events = EventPublisher(
            client=client,
            topics=DoorbellTopics(device),
            availability_topic=topics().status(device),
            crops=RecentCrops(),
            gallery=gallery,
            discovery=False,
        )
        before = len(driver.visitors())
        clock = ReplayClock()
        visits = VisitLog(events, clock, len(visitors))
        pipeline = Pipeline(
            FaceDetector(),
            recognizer,
            visits,
            RecognitionConfig(debounce_s=(FRAMES_PER_VISITOR + GAP_FRAMES / 2) / REPLAY_FPS),
            clock,
        )
        pipeline.run(FolderSource(frames), threading.Event())
        expected = before + pipeline.counters.visitor_events
        deadline = time.monotonic() + 10  # QoS 1 events are still on their way
        while len(driver.visitors()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return LiveResult(
        tuple(visitors),
        tuple(tuple(names) for names in visits.named),
        pipeline.counters.frames,
        pipeline.counters.faces,
        tuple(driver.visitors()[before:]),
        int(artifact.version),
        recognizer.threshold,
    )
