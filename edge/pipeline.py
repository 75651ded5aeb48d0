"""The live loop: frame → faces → crops → recognition → doorbell events.

`Pipeline.process(frame)` handles one frame and is what tests drive;
`Pipeline.run(source, stop)` is the node's loop around it. A bad frame or a
failing model is logged and counted, never the end of the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge.camera import FrameSource, ReconnectingSource
from edge.detector import FaceDetector
from edge.recognition_config import RecognitionConfig
from edge.recognizer import UNKNOWN, Recognizer, RecognizerError
from fedbell.faces import Box, crop_face, normalize_face

log = logging.getLogger(__name__)

Frame = npt.NDArray[np.uint8]

RING_FACE_WINDOW_S = 2.0
"""A ring names the face seen within this many seconds before it."""


class EventSink(Protocol):
    """Where the pipeline's events go (edge.events.EventPublisher in the node)."""

    def visitor(
        self,
        person: str,
        confidence: float,
        box: Box | None,
        crop: npt.NDArray[np.uint8] | None = None,
        frame: npt.NDArray[np.uint8] | None = None,
    ) -> str: ...

    def ring(
        self, source: str, person: str | None = None, frame: npt.NDArray[np.uint8] | None = None
    ) -> str: ...

    def present(self, present: bool) -> None: ...


@dataclass(frozen=True)
class Sighting:
    """One recognised face in one frame."""

    box: Box
    person: str
    confidence: float
    crop: npt.NDArray[np.uint8]


@dataclass
class PipelineCounters:
    frames: int = 0
    faces: int = 0
    visitor_events: int = 0
    rings: int = 0
    errors: int = 0
    fps: float = 0.0


@dataclass
class _Seen:
    """What the ring and visitor logic remember between frames."""

    streaks: dict[str, int] = field(default_factory=dict)
    last_event: dict[str, float] = field(default_factory=dict)
    face_frames: int = 0
    present: bool = False
    last_face_time: float = float("-inf")
    last_sighting: Sighting | None = None
    last_frame: Frame | None = None


class Pipeline:
    def __init__(
        self,
        detector: FaceDetector,
        recognizer: Recognizer,
        events: EventSink,
        config: RecognitionConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.detector = detector
        self.recognizer = recognizer
        self.events = events
        self.config = config or RecognitionConfig()
        self.counters = PipelineCounters()
        self._clock = clock
        self._seen = _Seen()
        self._lock = threading.Lock()  # ring() comes from MQTT/GPIO threads
        self._frame_times: deque[float] = deque(maxlen=30)

    def process(self, frame: Frame) -> list[Sighting]:
        """Detect, recognise and emit events for one frame; never raises."""
        now = self._clock()
        try:
            sightings = self._recognise(frame)
        except Exception as err:  # a bad frame must not stop the doorbell
            self.counters.errors += 1
            log.warning("frame %d skipped: %s", self.counters.frames, err)
            sightings = []
        with self._lock:
            self.counters.frames += 1
            self.counters.faces += len(sightings)
            self._frame_times.append(time.monotonic())
            self._update_fps()
            self._seen.last_frame = frame
            self._presence(sightings, now)
            self._visitors(sightings, now, frame)
            ring_now = self._face_ring(sightings)
        if ring_now:
            self.ring("face")
        return sightings

    def _recognise(self, frame: Frame) -> list[Sighting]:
        sightings = []
        for box in self.detector.detect(frame):
            crop = crop_face(frame, box, self.detector.config.margin)
            if self.recognizer.ready:
                try:
                    face = normalize_face(crop, self.recognizer.input_size)
                    person, confidence = self.recognizer.recognize(face)
                except RecognizerError as err:
                    log.warning("recognition failed: %s", err)
                    person, confidence = UNKNOWN, 0.0
            else:
                person, confidence = UNKNOWN, 0.0  # no model yet: every face is a stranger
            sightings.append(Sighting(box, person, confidence, crop))
        return sightings

    def _presence(self, sightings: list[Sighting], now: float) -> None:
        seen = self._seen
        if sightings:
            seen.last_face_time = now
            seen.last_sighting = sightings[0]
            if not seen.present:
                seen.present = True
                self.events.present(True)
        elif seen.present and now - seen.last_face_time >= self.config.absent_after_s:
            seen.present = False
            self.events.present(False)

    def _visitors(self, sightings: list[Sighting], now: float, frame: Frame) -> None:
        """One event per person once confirmed over frames, then not again for debounce_s."""
        seen = self._seen
        best: dict[str, Sighting] = {}
        for sighting in sightings:
            current = best.get(sighting.person)
            if current is None or sighting.confidence > current.confidence:
                best[sighting.person] = sighting
        seen.streaks = {person: seen.streaks.get(person, 0) + 1 for person in best}
        for person, sighting in best.items():
            if seen.streaks[person] < self.config.confirm_frames:
                continue
            if now - seen.last_event.get(person, float("-inf")) < self.config.debounce_s:
                continue
            seen.last_event[person] = now
            self.counters.visitor_events += 1
            self.events.visitor(person, sighting.confidence, sighting.box, sighting.crop, frame)

    def _face_ring(self, sightings: list[Sighting]) -> bool:
        """True once per continuous appearance, after ring_on_face_frames frames."""
        seen = self._seen
        seen.face_frames = seen.face_frames + 1 if sightings else 0
        threshold = self.config.ring_on_face_frames
        return threshold > 0 and seen.face_frames == threshold

    def ring(self, source: str) -> None:
        """A ring from the button, an MQTT command or the face trigger (any thread)."""
        with self._lock:
            seen = self._seen
            recent = (
                seen.last_sighting is not None
                and self._clock() - seen.last_face_time <= RING_FACE_WINDOW_S
            )
            sighting = seen.last_sighting if recent else None
            frame = seen.last_frame
            self.counters.rings += 1
        self.events.ring(source, None if sighting is None else sighting.person, frame)
        # Whoever rang is a visitor, debounce or not (the face trigger already sent one).
        if sighting is not None and source != "face":
            self.events.visitor(
                sighting.person, sighting.confidence, sighting.box, sighting.crop, frame
            )

    def _update_fps(self) -> None:
        times = self._frame_times
        if len(times) >= 2 and times[-1] > times[0]:
            self.counters.fps = (len(times) - 1) / (times[-1] - times[0])

    def run(self, source: FrameSource, stop: threading.Event) -> None:
        """Process frames until `stop` is set or a replay ends."""
        while not stop.is_set():
            frame = source.read()
            if frame is not None:
                self.process(frame)
                continue
            if isinstance(source, ReconnectingSource):
                if source.status.state == "ended":
                    return
                source.wait_for_retry()  # camera down: the loop idles, the node stays up
                continue
            return  # a plain source returns None only at its end
