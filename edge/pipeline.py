"""The live loop: frame → faces → aligned chips → embeddings → doorbell events.

`Pipeline.process(frame)` handles one frame and is what tests drive;
`Pipeline.run(source, stop)` is the node's loop around it. A bad frame or a
failing model is logged and counted, never the end of the loop.

Visitors are decided per visit, not per frame: each face joins a `Track` (the
nearest face of the previous frames), the track averages the embeddings of
its frames, and once it has `visit_frames` frames (default 8; a visit that ends
sooner, when it ends, if it has `confirm_frames`) it sends one visitor event,
named from the mean against the prototypes enrolled *at that moment* (so a
person enrolled mid-visit is named). One noisy frame no longer decides
who is at the door. The mean is over the visit's best `confirm_frames` chips
(`edge.chips`: largest, sharpest, most frontal), not its first frames.

With two camera streams, faces are detected and tracked on the small frame
and each chip is cut from the full-resolution frame of the same instant
(`process_pair`); a pair whose timestamps differ is never cut from: its chips
come from the small frame, and `mismatched_pairs` counts it.

A visit that ends up "unknown" lends its features to the stranger store: the
negatives the next round trains against.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from edge.camera import FrameSource, ReconnectingSource, read_pair
from edge.chips import best_indices, cut_chips, visit_embedding
from edge.frames import FramePair
from edge.recognition_config import RecognitionConfig
from edge.recognizer import UNKNOWN, ModelKey, Recognizer
from fedbell.faces.detection import Detector
from fedbell.faces.embedding import Features

Box = tuple[int, int, int, int]

log = logging.getLogger(__name__)

Frame = npt.NDArray[np.uint8]
Vector = npt.NDArray[np.float32]

RING_FACE_WINDOW_S = 2.0
"""A ring names the face seen within this many seconds before it."""

TRACK_GATE = 0.5
"""A face continues a track whose last box centre is within this many box widths."""

MAX_TRACKS = 16
"""Live tracks kept at most (with snapshots on, each holds its best frame)."""


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
    """One face in one frame, with this frame's own reading of it."""

    box: Box
    person: str
    confidence: float
    crop: npt.NDArray[np.uint8]
    """The aligned RGB chip (kept with the visitor event, for labelling)."""
    embedding: Vector | None = None
    """None when no model is ready or it failed on this frame."""
    features: Vector | None = None
    """The backbone's features of the chip (for the stranger store)."""
    model: ModelKey | None = None
    """The model that gave `embedding`."""
    quality: float = 0.0
    """`edge.chips.chip_quality` of the chip: which frames a visit decides from."""
    face_px: int = 0
    """The face's width in the pixels its chip was cut from."""
    full_resolution: bool = False
    """The chip was cut from the full-resolution stream (else from the small frame)."""


@dataclass(frozen=True)
class Evidence:
    """A chip a visit may be decided from."""

    quality: float
    embedding: Vector
    frame: int
    """The visit's frame it was cut from (1: the first under the visit's model)."""
    face_px: int
    full_resolution: bool


@dataclass(frozen=True)
class VisitDecision:
    """Who a visit was decided to be, and from what (a replay's account of each visit)."""

    person: str
    similarity: float
    frames: int
    """Frames the visit had when it was decided."""
    chips: tuple[Evidence, ...]
    """The chips the decision averaged, best first."""
    announced: bool
    """A visitor event went out (not held back by the debounce)."""


@dataclass
class Track:
    """One face followed across frames: a visit, and the evidence for who it is."""

    box: Box
    last_seen: float
    last_frame: int
    model: ModelKey | None = None
    frames: int = 0
    """Frames of evidence under `model` (a model swap starts the count again)."""
    keep: int = 5
    """Chips the decision averages: the visit's best ones."""
    evidence: list[Evidence] = field(default_factory=list)
    """The visit's best `keep` chips so far, in frame order."""
    best: Sighting | None = None
    best_frame: Frame | None = None
    announced: bool = False

    def add(self, sighting: Sighting, frame: Frame | None, now: float, index: int) -> None:
        self.box, self.last_seen, self.last_frame = sighting.box, now, index
        if sighting.model != self.model:  # hot swap: the old model's evidence is void
            self.model = sighting.model
            self.frames, self.evidence, self.best, self.best_frame = 0, [], None, None
        self.frames += 1
        if sighting.embedding is not None:
            self.evidence.append(
                Evidence(
                    sighting.quality,
                    sighting.embedding,
                    self.frames,
                    sighting.face_px,
                    sighting.full_resolution,
                )
            )
            if len(self.evidence) > self.keep:  # the worst chip goes (the later one on a tie)
                worst = min(range(len(self.evidence)), key=lambda i: (self.evidence[i].quality, -i))
                del self.evidence[worst]
        if self.best is None or _rank(sighting) > _rank(self.best):
            self.best, self.best_frame = sighting, frame

    def decide(self, recognizer: Recognizer) -> tuple[str, float]:
        """Who this visit is so far: its best chips' mean embedding against today's
        prototypes (`edge.chips.visit_embedding`, as the benchmark decides)."""
        if not self.evidence:
            return UNKNOWN, 0.0
        qualities = [chip.quality for chip in self.evidence]
        mean = visit_embedding([chip.embedding for chip in self.evidence], qualities, self.keep)
        return recognizer.identify(mean, self.model)

    def chosen(self) -> tuple[Evidence, ...]:
        """The chips `decide` averages, best first."""
        qualities = [chip.quality for chip in self.evidence]
        return tuple(self.evidence[i] for i in best_indices(qualities, self.keep))


def _rank(sighting: Sighting) -> tuple[float, float, int]:
    """The best frame of a track: the best chip, then the most confident, then the largest."""
    return sighting.quality, sighting.confidence, sighting.box[2] * sighting.box[3]


def _distance(a: Box, b: Box) -> float:
    return float(np.hypot(a[0] + a[2] / 2 - b[0] - b[2] / 2, a[1] + a[3] / 2 - b[1] - b[3] / 2))


class Tracker:
    """Assigns each frame's faces to tracks: nearest box centre of a recent track.

    A face joins the nearest track whose last box centre is within
    TRACK_GATE box widths; a lone face also continues a lone track seen in the
    frame just before (a jumpy detector box is still the same visitor). A track
    not seen for `max_gap_s` has ended (`ended`: those the last update dropped).
    """

    def __init__(self, max_gap_s: float, keep: int = 5) -> None:
        self.max_gap_s = max_gap_s
        self.keep = keep
        self.tracks: list[Track] = []
        self.ended: list[Track] = []
        self.frames = 0

    def update(self, sightings: Sequence[Sighting], frame: Frame | None, now: float) -> list[Track]:
        """The track of each sighting, in order; new tracks for new faces (`frame`: the
        frame to keep as a track's best, None when no snapshot will ever be taken)."""
        self.frames += 1
        self.ended = [t for t in self.tracks if now - t.last_seen >= self.max_gap_s]
        self.tracks = [t for t in self.tracks if now - t.last_seen < self.max_gap_s]
        previous = [t for t in self.tracks if t.last_frame == self.frames - 1]
        matched: dict[int, Track] = {}
        if len(sightings) == 1 and len(previous) == 1:
            matched[0] = previous[0]
        else:
            pairs = sorted(
                (_distance(t.box, s.box), ti, si)
                for ti, t in enumerate(self.tracks)
                for si, s in enumerate(sightings)
                if _distance(t.box, s.box) <= TRACK_GATE * t.box[2]
            )
            used: set[int] = set()
            for _, ti, si in pairs:
                if ti not in used and si not in matched:
                    used.add(ti)
                    matched[si] = self.tracks[ti]
        result = []
        for index, sighting in enumerate(sightings):
            track = matched.get(index)
            if track is None:
                track = Track(sighting.box, now, self.frames, keep=self.keep)
                self.tracks.append(track)
            track.add(sighting, frame, now, self.frames)
            result.append(track)
        if len(self.tracks) > MAX_TRACKS:  # a detector running wild: keep the freshest
            self.tracks = sorted(self.tracks, key=lambda t: -t.last_seen)[:MAX_TRACKS]
            # (tracks dropped here are not `ended`: a detector running wild is no visit)
        return result


@dataclass
class PipelineCounters:
    """What the pipeline saw and did since it started (the status shows the frame rate)."""

    frames: int = 0
    faces: int = 0
    visits: int = 0
    visitor_events: int = 0
    rings: int = 0
    errors: int = 0
    mismatched_pairs: int = 0
    """Frame pairs whose two streams were not captured together (chips cut from the small one)."""
    fps: float = 0.0


@dataclass
class _Seen:
    """What the ring and visitor logic remember between frames."""

    last_event: dict[str, float] = field(default_factory=dict)
    face_frames: int = 0
    present: bool = False
    last_face_time: float = float("-inf")
    last_track: Track | None = None
    last_frame: Frame | None = None


class Pipeline:
    def __init__(
        self,
        detector: Detector,
        recognizer: Recognizer,
        events: EventSink,
        config: RecognitionConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        frame_period_s: float | None = None,
        on_stranger: Callable[[str, Features, str], None] | None = None,
        on_visit: Callable[[VisitDecision], None] | None = None,
    ) -> None:
        """`frame_period_s`: for a replay, its own time (frames so far × 1/fps) replaces
        `clock`, so visits end and debounce alike however fast the machine replays."""
        self.detector = detector
        self.on_stranger = on_stranger
        """Called with (backbone sha256, features, event id) of each visit that stayed unknown."""
        self.on_visit = on_visit
        """Called with each visit's decision, whether or not an event went out."""
        self.recognizer = recognizer
        self.events = events
        self.config = config or RecognitionConfig()
        self.counters = PipelineCounters()
        self._clock = clock
        self._frame_period = frame_period_s
        self._seen = _Seen()
        self._tracker = Tracker(self.config.absent_after_s, keep=self.config.confirm_frames)
        self._lock = threading.Lock()  # ring() comes from MQTT/GPIO threads
        self._frame_times: deque[float] = deque(maxlen=30)

    def process(self, frame: Frame) -> list[Sighting]:
        """Detect, recognise and emit events for one frame; never raises."""
        return self.process_pair(FramePair(frame, self._clock()))

    def process_pair(self, pair: FramePair) -> list[Sighting]:
        """`process` for a frame pair: detection on the small frame, chips from the full
        one when both were captured together."""
        frame = pair.small
        now = self._now()
        try:
            sightings = self._recognise(pair)
        except Exception as err:  # a bad frame must not stop the doorbell
            self.counters.errors += 1
            log.warning("frame %d skipped: %s", self.counters.frames, err)
            sightings = []
        with self._lock:
            self.counters.frames += 1
            self.counters.faces += len(sightings)
            self._frame_times.append(time.monotonic())
            self._update_fps()
            # Frames are kept only for snapshots: each live track holds its best one
            # (640x480: 0.9 MB, up to MAX_TRACKS of them, ~15 MB when detections
            # jump about), which a doorbell without snapshots (the default) never sends.
            kept = frame if self.config.snapshot else None
            self._seen.last_frame = kept
            tracks = self._tracker.update(sightings, kept, now)
            self._presence(tracks, now)
            self._visitors(tracks, now)
            self._ended_visits(self._tracker.ended, now)
            ring_now = self._face_ring(sightings)
        if ring_now:
            self.ring("face")
        return sightings

    def _recognise(self, pair: FramePair) -> list[Sighting]:
        faces = self.detector.detect(pair.small)
        cut = cut_chips(pair, faces)
        if cut.mismatched:  # the full frame is of another instant: the chips came from the small
            self.counters.mismatched_pairs += 1
        model = self.recognizer.model  # one snapshot for the whole frame
        embeddings: npt.NDArray[np.float32] | None = None
        features: Features | None = None
        if cut.chips and model.ready:
            try:
                features = self.recognizer.features(cut.chips, model)
                embeddings = model.embed(features)
            except (RuntimeError, ValueError) as err:  # no sighting lost: they stay unknown
                self.counters.errors += 1
                log.warning("recognition failed: %s", err)
                features = embeddings = None
        sightings = []
        for i, (face, chip) in enumerate(zip(faces, cut.chips, strict=True)):
            person, confidence, embedding, feature = UNKNOWN, 0.0, None, None
            if embeddings is not None and features is not None:
                embedding, feature = embeddings[i], features[i]
                person, confidence = self.recognizer.identify(embedding, model.key)
            sightings.append(
                Sighting(
                    face.box,
                    person,
                    confidence,
                    chip,
                    embedding,
                    feature,
                    None if embedding is None else model.key,
                    quality=cut.qualities[i],
                    face_px=cut.face_px[i],
                    full_resolution=cut.full_resolution,
                )
            )
        return sightings

    def _presence(self, tracks: list[Track], now: float) -> None:
        seen = self._seen
        if tracks:
            seen.last_face_time = now
            seen.last_track = tracks[0]
            if not seen.present:
                seen.present = True
                self.events.present(True)
        elif seen.present and now - seen.last_face_time >= self.config.absent_after_s:
            seen.present = False
            self.events.present(False)

    def _visitors(self, tracks: list[Track], now: float) -> None:
        """One event per visit once it has visit_frames frames; per person once per debounce_s."""
        needed = self.config.decision_frames()
        for track in tracks:
            if not track.announced and track.frames >= needed:
                self._announce(track, now)

    def _ended_visits(self, ended: list[Track], now: float) -> None:
        """A visit that ended before visit_frames is decided now, if it has confirm_frames."""
        for track in ended:
            if not track.announced and track.frames >= self.config.confirm_frames:
                self._announce(track, now)

    def _announce(self, track: Track, now: float) -> None:
        """The visit's decision, reported to on_visit and, per person once per debounce_s,
        as one visitor event."""
        track.announced = True
        self.counters.visits += 1
        person, confidence = track.decide(self.recognizer)
        announced = now - self._seen.last_event.get(person, float("-inf")) >= self.config.debounce_s
        self._report_visit(
            VisitDecision(person, confidence, track.frames, track.chosen(), announced)
        )
        if not announced:
            self._remember_stranger(track, person, "")
            return
        self._seen.last_event[person] = now
        self.counters.visitor_events += 1
        best = track.best
        if best is not None:  # always, once a track has frames
            event = self.events.visitor(person, confidence, best.box, best.crop, track.best_frame)
            self._remember_stranger(track, person, event)

    def _report_visit(self, decision: VisitDecision) -> None:
        if self.on_visit is None:
            return
        try:
            self.on_visit(decision)
        except Exception as err:  # a listener's failure is not the doorbell's
            self.counters.errors += 1
            log.warning("visit not reported: %s", err)

    def _remember_stranger(self, track: Track, person: str, event_id: str) -> None:
        """An unknown visit's features join the training negatives, under its event id
        (a label naming that visitor later takes them out again)."""
        best = track.best
        if person != UNKNOWN or self.on_stranger is None or best is None:
            return
        if best.features is None or track.model is None:
            return  # no model was ready: nothing comparable to keep
        try:
            self.on_stranger(track.model[0], best.features[None, :], event_id)
        except Exception as err:  # the store is a nicety; the event still goes out
            self.counters.errors += 1
            log.warning("stranger not stored: %s", err)

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
            track = seen.last_track
            recent = track is not None and self._now() - track.last_seen <= RING_FACE_WINDOW_S
            visit = track if recent else None
            person, confidence = (UNKNOWN, 0.0) if visit is None else visit.decide(self.recognizer)
            best = None if visit is None else visit.best
            best_frame = None if visit is None else visit.best_frame
            frame = seen.last_frame
            self.counters.rings += 1
        self.events.ring(source, None if best is None else person, frame)
        # Whoever rang is a visitor, debounce or not (the face trigger already sent one).
        if best is not None and source != "face":
            self.events.visitor(person, confidence, best.box, best.crop, best_frame)

    def _now(self) -> float:
        if self._frame_period is not None:
            return self.counters.frames * self._frame_period
        return self._clock()

    def _update_fps(self) -> None:
        times = self._frame_times
        if len(times) >= 2 and times[-1] > times[0]:
            self.counters.fps = (len(times) - 1) / (times[-1] - times[0])

    def run(self, source: FrameSource, stop: threading.Event) -> None:
        """Process frames until `stop` is set or a replay ends."""
        while not stop.is_set():
            pair = read_pair(source)
            if pair is not None:
                self.process_pair(pair)
                continue
            if isinstance(source, ReconnectingSource):
                if source.status.state == "ended":
                    return
                source.wait_for_retry()  # camera down: the loop idles, the node stays up
                continue
            return  # a plain source returns None only at its end
