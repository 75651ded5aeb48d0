"""Live recognition after the rounds: visitors at a doorbell, a newcomer enrolled, again.

Porch frames are generated (simulation/replay.py) in which people walk up to
the door: the newcomer (whom no doorbell knows yet), residents of the house (a
photo their gallery does not hold) and a stranger (a person in no house). They are
replayed through the doorbell's own pipeline (frame source, detector,
backbone on LiteRT, the federated head, the house's prototypes, the event
publisher) twice: before and after the newcomer is enrolled with the real
`python -m edge enroll` command, which sends nothing to the aggregator and
needs no round. The events come back from the broker as Home Assistant would
see them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from edge.camera import FolderSource
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.gallery import Gallery
from edge.homeassistant import DoorbellTopics
from edge.pipeline import Pipeline
from edge.recognition_config import RecognitionConfig
from edge.recognizer import Head, Recognizer
from fedbell.config import MqttSettings
from fedbell.faces.detection import Detector
from fedbell.wire.messages import GlobalModel, TfliteArtifact, parse_global
from fedbell.wire.mqtt import connect, make_client
from simulation.config import SimulationConfig
from simulation.data import Households, write_folder
from simulation.driver import Driver
from simulation.processes import Fleet
from simulation.replay import (
    FACE_FRAMES,
    FRAMES_PER_VISIT,
    GAP_FRAMES,
    Visit,
    enroll,
    plan_visits,
    visitor_face,
    write_porch,
)
from simulation.stack import SITE, Layout, aggregator_keys, mqtt_settings, topics

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
        visit = (self.clock.frames - 1) // FRAMES_PER_VISIT
        if 0 <= visit < len(self.named):
            self.named[visit].append(person)
        return self.publisher.visitor(person, confidence, *args, **kwargs)

    def ring(self, *args: Any, **kwargs: Any) -> str:
        return self.publisher.ring(*args, **kwargs)

    def present(self, present: bool) -> None:
        self.publisher.present(present)


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
                debounce_s=(FACE_FRAMES + GAP_FRAMES / 2) / REPLAY_FPS,
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


def demo(
    console: Console,
    config: SimulationConfig,
    layout: Layout,
    driver: Driver,
    *,
    homes: Households,
    device: str,
    port: int,
    fleet: Fleet,
    backbone: TfliteArtifact,
    detector: Detector,
) -> dict[str, Any]:
    """Visitors at `device` before and after it enrols a newcomer; reported, not fatal."""
    started = time.monotonic()
    settings = mqtt_settings(port)
    try:
        model = parse_global(
            driver.retained(topics().global_model, 60, fleet.check),
            site=SITE,
            max_bytes=settings.max_message_bytes,
            keys=aggregator_keys(layout, config),
        )
        newcomer = homes.newcomer[0].person
        write_folder(homes.newcomer[:-1], layout.root / "newcomer")
        residents = [s for s in homes.visits if s.person in homes.houses[0]]
        visits = plan_visits(
            newcomer,
            homes.newcomer[-1].path,
            residents[: config.live.visitors],
            homes.held_out[0],
        )
        frames = layout.root / "live" / "frames"
        faces = [visitor_face(visit.photo, detector) for visit in visits]
        write_porch(frames, faces, np.random.default_rng(config.seed))
        gallery = Gallery(
            layout.gallery(device), layout.root / "live" / "state", detector=lambda: detector
        )
        recognizer = make_recognizer(backbone, model, gallery)

        def visitors_at_the_door() -> list[list[str]]:
            return replay(
                driver,
                settings,
                recognizer,
                detector,
                device=device,
                gallery=gallery,
                frames=frames,
                visits=visits,
            )

        with console.status(f"{len(visits)} visitors at {device}'s door"):
            before = visitors_at_the_door()
        seconds, printed = enroll(
            str(layout.config(device)), str(layout.root / "newcomer" / newcomer), person=newcomer
        )
        running = recognizer.model.backbone
        assert running is not None
        recognizer.set_gallery(gallery.features(running))  # what the node does within a second
        with console.status(f"the same visitors at {device}'s door, {newcomer} enrolled"):
            after = visitors_at_the_door()
    except Exception as error:  # the federated results stand on their own
        console.print(f"[bold red]live recognition failed:[/] {error!r}")
        return {"error": repr(error)}
    table = Table(
        title=f"live recognition at {device} (model v{model.version}, "
        f"unknown below {recognizer.threshold:.2f}, calibrated by the aggregator on strangers)"
    )
    for header in ("at the door", f"before enrolling {newcomer}", "after", "right after?"):
        table.add_column(header)
    for visit, said_before, said_after in zip(visits, before, after, strict=True):
        table.add_row(
            visit.truth,
            ", ".join(said_before) or "—",
            ", ".join(said_after) or "—",
            "yes" if verdict(visit.truth, said_after) else "no",
        )
    console.print(table)
    console.print(f"enrolled {newcomer} with `python -m edge enroll` in {seconds:.1f} s: {printed}")
    right = sum(verdict(v.truth, n) for v, n in zip(visits, after, strict=True))
    seconds_live = time.monotonic() - started
    console.print(f"visits named right after enrolling: {right}/{len(visits)}")
    console.print(f"the live replay took {seconds_live:.0f} s")
    return {
        "newcomer": newcomer,
        "enroll_seconds": round(seconds, 2),
        "threshold": recognizer.threshold,
        "model_version": model.version,
        "visits": [
            {"visitor": v.truth, "before": b, "after": a}
            for v, b, a in zip(visits, before, after, strict=True)
        ],
        "named_right_after_enrolling": right,
        "seconds": round(seconds_live, 1),
    }
