"""Live recognition after the rounds: visitors at a doorbell, a newcomer enrolled, again.

A porch video is filmed (simulation/replay.py, as `make bench-edge` films
its own) in which people walk up to the door: the newcomer (whom no doorbell
knows yet), residents of the house (a photo their gallery does not hold) and
strangers (`live.strangers`, people in no house). It is recorded as the default doorbell
camera gives it: a 1536×864 main stream with the face at ring distance and the
small lores stream beside it. It is replayed through the doorbell's own camera
and pipeline (the folder source opened from the default camera config:
detection on the lores stream, each chip cut from the main stream of the same
instant; backbone on LiteRT, the federated head, the house's prototypes, the
event publisher) twice: before and after the newcomer is enrolled with the
real `python -m edge enroll` command, which sends nothing to the aggregator and
needs no round. Each visit is printed with what the doorbell said and from
which chips; the events reach the broker as Home Assistant would see them.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from edge.camera import open_raw_source
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.frames import small_size
from edge.gallery import Gallery
from edge.homeassistant import DoorbellTopics
from edge.pipeline import EventSink, Pipeline, PipelineCounters, VisitDecision
from edge.recognition_config import CameraConfig, RecognitionConfig
from edge.recognizer import Head, Recognizer
from fedbell.config import MqttSettings
from fedbell.faces.detection import Detector
from fedbell.faces.openset import UNKNOWN
from fedbell.wire.messages import GlobalModel, TfliteArtifact, parse_global
from fedbell.wire.mqtt import connect, make_client
from simulation.config import SimulationConfig
from simulation.data import Households, one_photo_each, write_folder
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
"""The video's frame rate: its time, whatever the machine's speed."""
READ_FPS = 120.0
"""The camera reads the recording as fast as a camera config allows (the pipeline is slower)."""
CAMERA = CameraConfig()
"""The default doorbell camera: two streams."""


class ReplayClock:
    """Video time, one frame per call: debouncing then does not depend on CPU speed,
    and the replay runs as fast as the machine allows."""

    def __init__(self) -> None:
        self.frames = 0

    def __call__(self) -> float:
        self.frames += 1
        return self.frames / REPLAY_FPS


class VisitLog:
    """The pipeline's visit listener: notes during which visit of the video each announced
    decision came, to score it against who walked up."""

    def __init__(self, clock: ReplayClock, visits: int) -> None:
        self.clock = clock
        self.decided: list[list[VisitDecision]] = [[] for _ in range(visits)]

    def __call__(self, decision: VisitDecision) -> None:
        visit = (self.clock.frames - 1) // FRAMES_PER_VISIT
        if decision.announced and 0 <= visit < len(self.decided):
            self.decided[visit].append(decision)


def film(folder: Path, visits: Sequence[Visit], detector: Detector, seed: int) -> None:
    """The porch video of `visits`, recorded as the default camera gives it: two streams."""
    faces = [visitor_face(visit.photo, detector) for visit in visits]
    write_porch(
        folder,
        faces,
        np.random.default_rng(seed),
        full=CAMERA.full_size(),
    )


def watch(
    frames: Path, detector: Detector, recognizer: Recognizer, events: EventSink, visits: int
) -> tuple[list[list[VisitDecision]], PipelineCounters]:
    """The doorbell's camera (the default config's, on the recording in `frames`) and
    pipeline: what it announced in each of the video's `visits`, and its counters."""
    clock = ReplayClock()
    log = VisitLog(clock, visits)
    pipeline = Pipeline(
        detector,
        recognizer,
        events,
        # A visitor has left once the porch is empty for half the gap between two
        # visitors (a doorbell's default waits 5 s, longer than this video's gaps).
        RecognitionConfig(
            debounce_s=(FACE_FRAMES + GAP_FRAMES / 2) / REPLAY_FPS,
            absent_after_s=(GAP_FRAMES / 2) / REPLAY_FPS,
        ),
        clock=clock,
        on_visit=log,
    )
    # The default camera config (two streams), its kind and folder those of the recording.
    source = open_raw_source(CameraConfig(kind="folder", folder=frames, fps=READ_FPS))
    try:
        pipeline.run(source, threading.Event())
    finally:
        source.close()
    return log.decided, pipeline.counters


def make_recognizer(backbone: TfliteArtifact, model: GlobalModel, gallery: Gallery) -> Recognizer:
    """The doorbell's recogniser: int8 backbone, the federated head, the house's prototypes."""
    recognizer = Recognizer(num_threads=1)
    running = recognizer.install_backbone(
        backbone.int8_model or backbone.float_model, model.backbone
    )
    recognizer.set_head(Head.of(model))
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
    visits: int,
) -> list[list[VisitDecision]]:
    """`watch` with the doorbell's event publisher: each visit's announced decisions, once
    their events have reached the broker."""
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
        decided, counters = watch(frames, detector, recognizer, events, visits)
        expected = before + counters.visitor_events
        deadline = time.monotonic() + 10  # QoS 1 events are still on their way
        while len(driver.visitors()) < expected and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        client.disconnect()
        client.loop_stop()
    return decided


def verdict(expected: str, decided: Sequence[VisitDecision]) -> str:
    """Right when the doorbell said the expected name (or "unknown") and no other, else how
    it went wrong."""
    said = {decision.person for decision in decided}
    if not said:
        return "said nothing"
    if said == {expected}:
        return "right"
    if expected == UNKNOWN:
        return "named a stranger"
    return "missed" if said == {UNKNOWN} else "named wrong"


def describe(decision: VisitDecision) -> str:
    """What the doorbell said of a visit, and from which chips."""
    said = f"{decision.person} {decision.similarity:.2f} after {decision.frames} frames"
    if not decision.chips:
        return f"{said}, no chips (no model ready)"
    frames = ",".join(str(chip.frame) for chip in decision.chips)
    main = sum(chip.full_resolution for chip in decision.chips)
    if main == len(decision.chips):
        stream = "main stream"
    elif main == 0:
        stream = "lores stream"
    else:
        stream = f"{main} of them from the main stream"
    widths = [chip.face_px for chip in decision.chips]
    return f"{said}, chips of frames {frames} ({stream}, faces {min(widths)}-{max(widths)} px)"


def record(decision: VisitDecision) -> dict[str, Any]:
    return {
        "person": decision.person,
        "similarity": round(decision.similarity, 3),
        "frames": decision.frames,
        "chips": [
            {
                "frame": chip.frame,
                "face_px": chip.face_px,
                "main_stream": chip.full_resolution,
                "quality": round(chip.quality, 3),
            }
            for chip in decision.chips
        ],
    }


def print_visits(
    console: Console,
    visits: Sequence[Visit],
    decided: Sequence[Sequence[VisitDecision]],
    expected: Sequence[str],
) -> list[str]:
    """One line per visit: who walked up, what the doorbell said, right or wrong; then the
    counts. Returns the verdicts."""
    verdicts = [verdict(e, d) for e, d in zip(expected, decided, strict=True)]
    width = max(len(visit.truth) for visit in visits)
    for visit, decisions, judged in zip(visits, decided, verdicts, strict=True):
        said = "; ".join(describe(d) for d in decisions) or "—"
        console.print(f"  {visit.truth:<{width}}  said {said}: {judged}", highlight=False)
    counts = Counter(verdicts)
    wrong = ", ".join(f"{how} {n}" for how, n in sorted(counts.items()) if how != "right")
    console.print(f"  right {counts['right']}/{len(visits)}" + (f" ({wrong})" if wrong else ""))
    return verdicts


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
            one_photo_each(homes.held_out)[: config.live.strangers],
        )
        frames = layout.root / "live" / "frames"
        film(frames, visits, detector, config.seed)
        gallery = Gallery(
            layout.gallery(device), layout.root / "live" / "state", detector=lambda: detector
        )
        recognizer = make_recognizer(backbone, model, gallery)

        def visitors_at_the_door() -> list[list[VisitDecision]]:
            return replay(
                driver,
                settings,
                recognizer,
                detector,
                device=device,
                gallery=gallery,
                frames=frames,
                visits=len(visits),
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
    main = CAMERA.full_size()
    assert main is not None  # the default camera has two streams
    lores = small_size(*main, CAMERA.width)
    console.print(
        f"live recognition at {device}: {len(visits)} visits filmed as the default camera "
        f"records them, a {main[0]}x{main[1]} main stream beside a {lores[0]}x{lores[1]} "
        "lores one, "
        f"replayed through the doorbell's camera and pipeline (detection on lores, chips cut "
        f"from main; model v{model.version}, unknown below {recognizer.threshold:.2f}, "
        "calibrated by the aggregator on strangers)",
        highlight=False,
    )
    console.print(f"before enrolling {newcomer} (whom no gallery holds: unknown is right):")
    expected_before = [UNKNOWN if v.truth == newcomer else v.truth for v in visits]
    verdicts_before = print_visits(console, visits, before, expected_before)
    console.print(f"enrolled {newcomer} with `python -m edge enroll` in {seconds:.1f} s: {printed}")
    console.print(f"after enrolling {newcomer}:")
    verdicts_after = print_visits(console, visits, after, [v.truth for v in visits])
    live_seconds = time.monotonic() - started
    console.print(f"the live replay took {live_seconds:.0f} s (filming, two replays, enrolling)")
    return {
        "newcomer": newcomer,
        "enroll_seconds": round(seconds, 2),
        "threshold": recognizer.threshold,
        "model_version": model.version,
        "camera": {"main": list(main), "lores": list(lores)},
        "visits": [
            {
                "visitor": v.truth,
                "before": [d.person for d in b],
                "after": [d.person for d in a],
                "decided_before": [record(d) for d in b],
                "decided_after": [record(d) for d in a],
            }
            for v, b, a in zip(visits, before, after, strict=True)
        ],
        "right_before_enrolling": verdicts_before.count("right"),
        "named_right_after_enrolling": verdicts_after.count("right"),
        "seconds": round(live_seconds, 1),
    }
