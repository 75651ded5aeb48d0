"""Live recognition after the rounds: visitors at a doorbell, a newcomer enrolled, again.

Porch frames are generated in which people walk up to the door: the
newcomer (whom no doorbell knows yet), residents of the house (a photo their
gallery does not hold) and a stranger (a person in no house). They are
replayed through the doorbell's own pipeline (frame source, detector,
backbone on LiteRT, the federated head, the house's prototypes, the event
publisher) twice: before and after the newcomer is enrolled with the real
`python -m edge enroll` command, which sends nothing to the aggregator and
needs no round. The events come back from the broker as Home Assistant would
see them.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from edge.camera import FolderSource
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.gallery import Gallery
from edge.homeassistant import DoorbellTopics
from edge.pipeline import Pipeline
from edge.recognition_config import RecognitionConfig
from edge.recognizer import Head, Recognizer
from fedbell.config import MqttSettings
from fedbell.faces.dataset import Sample
from fedbell.faces.detection import Detector
from fedbell.faces.features import read_photo
from fedbell.faces.images import crop_face, to_grey
from fedbell.faces.openset import UNKNOWN
from fedbell.faces.synthetic import make_scene
from fedbell.wire.messages import GlobalModel, TfliteArtifact
from fedbell.wire.mqtt import connect, make_client
from simulation.driver import Driver
from simulation.stack import topics

FRAMES_PER_VISITOR = 8
GAP_FRAMES = 6
REPLAY_FPS = 10.0


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

    def visitor(self, person: str, confidence: float, *args: Any, **kwargs: Any) -> str:
        visit = (self.clock.frames - 1) // (FRAMES_PER_VISITOR + GAP_FRAMES)
        if 0 <= visit < len(self.named):
            self.named[visit].append(person)
        return self.publisher.visitor(person, confidence, *args, **kwargs)

    def ring(self, *args: Any, **kwargs: Any) -> str:
        return self.publisher.ring(*args, **kwargs)

    def present(self, present: bool) -> None:
        self.publisher.present(present)


@dataclass(frozen=True)
class Visit:
    truth: str
    """Who walks up: a name, or "unknown" for a stranger."""
    photo: Path


def plan_visits(
    newcomer: str, newcomer_visit: Path, residents: Sequence[Sample], stranger: Sample
) -> list[Visit]:
    visits = [Visit(newcomer, newcomer_visit)]
    visits += [Visit(s.person, s.path) for s in residents]
    return [*visits, Visit(UNKNOWN, stranger.path)]


def write_frames(folder: Path, visits: Sequence[Visit], detector: Detector, seed: int) -> None:
    """Numbered porch frames of each visitor in turn, empty porch in between.

    The visitor's face (found in their photo, with some head around it) is what
    walks up to the generated porch: a whole photo pasted in would make a face
    far smaller than a doorbell sees at its door.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    index = 0
    for visit in visits:
        photo = read_photo(visit.photo)
        faces = detector.detect(photo)
        if faces:
            face = crop_face(photo, max(faces, key=lambda f: f.box[2] * f.box[3]).box, 0.3)
        else:
            face = to_grey(photo)
        for k in range(FRAMES_PER_VISITOR + GAP_FRAMES):
            shown = [face] if k < FRAMES_PER_VISITOR else []
            cv2.imwrite(str(folder / f"{index:05d}.png"), make_scene(shown, rng).frame)
            index += 1


def enroll(config: Path, person: str, photos: Path) -> tuple[float, str]:
    """(seconds, what it printed) of the doorbell's own enrollment command."""
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge",
            "enroll",
            "--config",
            str(config),
            "--person",
            person,
            "--from-folder",
            str(photos),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise RuntimeError(f"edge enroll failed ({done.returncode}): {output}")
    return time.monotonic() - started, output


def make_recognizer(backbone: TfliteArtifact, model: GlobalModel, gallery: Gallery) -> Recognizer:
    """The doorbell's recogniser: int8 backbone, the federated head, the house's prototypes."""
    recognizer = Recognizer(num_threads=1)
    running = recognizer.install_backbone(
        backbone.int8_model or backbone.float_model, model.backbone
    )
    recognizer.set_head(
        Head(
            weights=list(model.weights),
            version=model.version,
            lineage=model.lineage,
            backbone=model.backbone,
            threshold=model.threshold,
        )
    )
    recognizer.set_gallery(gallery.features(running))
    return recognizer


def replay(
    driver: Driver,
    settings: MqttSettings,
    recognizer: Recognizer,
    detector: Detector,
    *,
    device: str,
    gallery: Gallery,
    frames: Path,
    visits: Sequence[Visit],
) -> list[list[str]]:
    """Run the doorbell's pipeline over `frames`; returns what it called each visitor."""
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
        log = VisitLog(events, clock, len(visits))
        pipeline = Pipeline(
            detector,
            recognizer,
            log,
            # A visitor has left once the porch is empty for half the gap between two
            # visitors (a doorbell's default waits 5 s, longer than this video's gaps).
            RecognitionConfig(
                debounce_s=(FRAMES_PER_VISITOR + GAP_FRAMES / 2) / REPLAY_FPS,
                absent_after_s=(GAP_FRAMES / 2) / REPLAY_FPS,
            ),
            clock=clock,
        )
        pipeline.run(FolderSource(frames), threading.Event())
        expected = before + pipeline.counters.visitor_events
        deadline = time.monotonic() + 10  # QoS 1 events are still on their way
        while len(driver.visitors()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return log.named


def verdict(truth: str, named: Sequence[str]) -> bool:
    """A visit went right when the doorbell said the right name (or "unknown") and no other."""
    return bool(named) and set(named) == {truth}
