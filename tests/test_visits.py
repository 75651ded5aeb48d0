"""Per-visit decisions: tracking faces across frames and averaging the model over a visit.

The tracker and the decision are tested as pure functions on hand-made
sightings; the pipeline with the real Haar detector and the real TFLite model
from tests/recognition_helpers.py, driven by a frame clock and a recording sink.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pytest

from edge.detector import FaceDetector
from edge.pipeline import Pipeline, Sighting, Track, Tracker, decide
from edge.recognition_config import RecognitionConfig
from edge.recognizer import UNKNOWN, ModelArtifact, Recognizer
from fedbell.faces import Box
from fedbell.synthetic import IdentityParams, make_scene, render_face
from tests.recognition_helpers import KNOWN, trained_model

Frame = npt.NDArray[np.uint8]
NO_FRAME: Frame = np.zeros((4, 4, 3), np.uint8)
CROP: Frame = np.zeros((8, 8), np.uint8)


@dataclass
class Event:
    person: str
    confidence: float
    box: Box | None


@dataclass
class Sink:
    """A recording EventSink."""

    visitors: list[Event] = field(default_factory=list)
    rings: list[tuple[str, str | None]] = field(default_factory=list)
    present_states: list[bool] = field(default_factory=list)

    def visitor(
        self,
        person: str,
        confidence: float,
        box: Box | None,
        crop: Frame | None = None,
        frame: Frame | None = None,
    ) -> str:
        self.visitors.append(Event(person, confidence, box))
        return "event"

    def ring(self, source: str, person: str | None = None, frame: Frame | None = None) -> str:
        self.rings.append((source, person))
        return "ring"

    def present(self, present: bool) -> None:
        self.present_states.append(present)


class FrameClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def named(result: tuple[str, float]) -> tuple[str, float]:
    """A decision with its confidence rounded, to compare with ==."""
    return result[0], round(result[1], 6)


def probabilities(sighting: Sighting) -> npt.NDArray[np.float32]:
    assert sighting.probabilities is not None
    return sighting.probabilities


def sighting(box: Box, probabilities: list[float] | None = None, model: int = 1) -> Sighting:
    row = None if probabilities is None else np.array(probabilities, np.float32)
    person, confidence = decide(row, ("a", "b"), 0.6)
    return Sighting(box, person, confidence, CROP, row, model, ("a", "b"))


# --- the decision and the evidence ------------------------------------------------------


def test_decide_names_the_argmax_only_above_the_threshold() -> None:
    labels = ("alice", "bob", "carol")
    assert named(decide(np.array([0.1, 0.7, 0.2]), labels, 0.6)) == ("bob", 0.7)
    assert named(decide(np.array([0.1, 0.5, 0.4]), labels, 0.6)) == (UNKNOWN, 0.5)
    assert decide(np.array([0.1, 0.6, 0.3]), labels, 0.6)[0] == "bob"  # at the threshold
    assert decide(None, labels, 0.6) == (UNKNOWN, 0.0)  # no model: a stranger
    assert decide(np.array([0.5, 0.5]), labels, 0.0) == (UNKNOWN, 0.0)  # labels do not match


def test_track_averages_probabilities_and_restarts_on_a_new_model() -> None:
    box = (100, 100, 80, 80)
    track = Track(box, 0.0, 0)
    track.add(sighting(box, [0.55, 0.45]), NO_FRAME, 0.0, 1)
    assert named(track.decide(0.6)) == (UNKNOWN, 0.55)  # one weak frame
    track.add(sighting(box, [0.85, 0.15]), NO_FRAME, 1.0, 2)
    assert track.frames == 2
    assert named(track.decide(0.6)) == ("a", 0.70)  # the mean decides
    assert track.best is not None
    assert track.best.confidence == pytest.approx(0.85)  # the most confident frame

    track.add(sighting(box, [0.2, 0.8], model=2), NO_FRAME, 2.0, 3)  # hot swap
    assert track.frames == 1
    assert track.model == 2
    assert named(track.decide(0.6)) == ("b", 0.8)

    track.add(sighting(box, None, model=0), NO_FRAME, 3.0, 4)  # model gone: no evidence
    assert track.frames == 1
    assert track.decide(0.6) == (UNKNOWN, 0.0)


# --- the tracker ----------------------------------------------------------------------------


def test_tracker_follows_nearby_faces_and_ends_tracks_after_absence() -> None:
    tracker = Tracker(max_gap_s=2.0)
    left, right = [], []
    for step in range(3):  # two people, each moving a little
        a = sighting((100 + 15 * step, 100, 80, 80), [0.9, 0.1])
        b = sighting((400 - 15 * step, 120, 90, 90), [0.1, 0.9])
        first, second = tracker.update([b, a], NO_FRAME, float(step))
        left.append(second)
        right.append(first)
    assert all(t is left[0] for t in left)
    assert all(t is right[0] for t in right)
    assert left[0] is not right[0]
    assert left[0].frames == right[0].frames == 3
    assert left[0].decide(0.5)[0] == "a"
    assert right[0].decide(0.5)[0] == "b"

    far = tracker.update([sighting((300, 350, 80, 80)), sighting((400, 120, 90, 90))], NO_FRAME, 3)
    assert far[0] not in (left[0], right[0])  # more than half a box width from both
    assert far[1] is right[0]

    later = tracker.update([sighting((400, 120, 90, 90))], NO_FRAME, 4.5)
    assert later[0] is right[0]  # 1.5 s since seen: still the same visit
    gone = tracker.update([sighting((400, 120, 90, 90))], NO_FRAME, 7.0)
    assert gone[0] is not right[0]  # not seen for 2.5 s: that visit ended
    assert len(tracker.tracks) == 1


def test_a_lone_face_keeps_its_track_even_when_the_box_jumps() -> None:
    tracker = Tracker(max_gap_s=5.0)
    first = tracker.update([sighting((20, 20, 100, 100))], NO_FRAME, 0.0)[0]
    jumped = tracker.update([sighting((500, 300, 100, 100))], NO_FRAME, 0.1)[0]
    assert jumped is first  # the only face, right after the only track's last frame
    tracker.update([], NO_FRAME, 0.2)
    after_gap = tracker.update([sighting((20, 20, 100, 100))], NO_FRAME, 0.3)[0]
    assert after_gap is not first  # a frame without faces in between: distance decides


# --- the pipeline, with the real detector and model --------------------------------------


def scene(identity: IdentityParams, rng: np.random.Generator) -> Frame:
    return np.asarray(make_scene([render_face(identity, rng, 96)], rng).frame, np.uint8)


def frames_of(
    recognizer: Recognizer, identity: IdentityParams, count: int, seed: int, label: int | None
) -> list[tuple[Frame, Sighting]]:
    """Frames with exactly one detected face (of the model's class `label`, when given)."""
    probe = Pipeline(FaceDetector(), recognizer, Sink())
    rng = np.random.default_rng(seed)
    found: list[tuple[Frame, Sighting]] = []
    while len(found) < count:
        frame = scene(identity, rng)
        sightings = probe.process(frame)
        if len(sightings) != 1 or sightings[0].probabilities is None:
            continue
        if label is None or int(np.argmax(sightings[0].probabilities)) == label:
            found.append((frame, sightings[0]))
    return found


def play(pipeline: Pipeline, clock: FrameClock, frames: list[Frame]) -> list[list[Sighting]]:
    seen = []
    for frame in frames:
        seen.append(pipeline.process(frame))
        clock.now += 1.0
    return seen


def float_recognizer(threshold: float | None = None, version: int = 1) -> Recognizer:
    model = trained_model()
    recognizer = Recognizer(threshold_override=threshold)
    recognizer.swap(ModelArtifact(model.float_tflite, model.labels, version=version))
    return recognizer


def test_a_visit_is_named_from_its_mean_not_from_its_first_frame() -> None:
    model = trained_model()
    person = 2
    candidates = frames_of(float_recognizer(), model.identities[person], 4, 41, person)
    candidates.sort(key=lambda fs: fs[1].confidence)  # the weakest frame first
    confidences = [s.confidence for _, s in candidates]
    mean = np.mean([probabilities(s) for _, s in candidates], axis=0)
    assert int(np.argmax(mean)) == person
    assert confidences[0] < mean[person]
    threshold = float(confidences[0] + mean[person]) / 2  # the first frame alone is "unknown"

    sink, clock = Sink(), FrameClock()
    config = RecognitionConfig(confirm_frames=4, debounce_s=10.0, absent_after_s=2.0)
    pipeline = Pipeline(FaceDetector(), float_recognizer(threshold), sink, config, clock)
    seen = play(pipeline, clock, [frame for frame, _ in candidates] + [NO_FRAME] * 3)

    assert seen[0][0].person == UNKNOWN  # what a per-frame doorbell would have said
    # Named once, from the mean; the box is the most confident frame's.
    assert [(e.person, e.box) for e in sink.visitors] == [
        (model.labels[person], candidates[-1][1].box)
    ]
    assert sink.visitors[0].confidence == pytest.approx(float(mean[person]), abs=1e-5)
    assert pipeline.counters.visits == pipeline.counters.visitor_events == 1
    assert sink.present_states == [True, False]


def test_one_event_per_visit_and_per_person_within_the_debounce() -> None:
    model = trained_model()
    recognizer = float_recognizer(threshold=0.0)
    alice = [f for f, _ in frames_of(recognizer, model.identities[0], 15, 51, 0)]
    stranger = [f for f, _ in frames_of(recognizer, model.identities[KNOWN], 5, 52, None)]
    empty = [np.asarray(make_scene([], np.random.default_rng(53)).frame, np.uint8)] * 3

    sink, clock = Sink(), FrameClock()
    config = RecognitionConfig(confirm_frames=2, debounce_s=20.0, absent_after_s=2.0)
    pipeline = Pipeline(FaceDetector(), float_recognizer(threshold=0.99), sink, config, clock)
    play(pipeline, clock, alice[:5] + empty)  # "unknown" at this strict threshold
    play(pipeline, clock, stranger + empty)  # another unknown within the debounce: quiet
    assert [e.person for e in sink.visitors] == [UNKNOWN]

    sink, clock = Sink(), FrameClock()
    pipeline = Pipeline(FaceDetector(), recognizer, sink, config, clock)
    play(pipeline, clock, alice[:5] + empty)
    play(pipeline, clock, alice[5:10] + empty)  # back within 20 s: not announced again
    clock.now += 20.0
    play(pipeline, clock, alice[10:] + empty)
    assert [e.person for e in sink.visitors] == [model.labels[0]] * 2
    assert pipeline.counters.visits == 3
    assert pipeline.counters.visitor_events == 2


def test_a_model_swap_mid_visit_restarts_its_evidence() -> None:
    model = trained_model()
    recognizer = float_recognizer(threshold=0.0, version=1)
    visit = frames_of(recognizer, model.identities[4], 5, 61, 4)

    sink, clock = Sink(), FrameClock()
    config = RecognitionConfig(confirm_frames=3, debounce_s=10.0, absent_after_s=2.0)
    pipeline = Pipeline(FaceDetector(), recognizer, sink, config, clock)
    play(pipeline, clock, [f for f, _ in visit[:2]])
    recognizer.swap(ModelArtifact(model.int8_tflite, model.labels, version=2))
    seen = play(pipeline, clock, [f for f, _ in visit[2:4]])
    assert sink.visitors == []  # two frames under v1 and two under v2: not yet three
    seen += play(pipeline, clock, [visit[4][0]])
    assert len(sink.visitors) == 1
    v2 = np.mean([probabilities(s[0]) for s in seen], axis=0)  # only the v2 frames count
    assert sink.visitors[0].person == model.labels[int(np.argmax(v2))]
    assert sink.visitors[0].confidence == pytest.approx(float(v2.max()), abs=1e-5)


def test_a_ring_names_the_visit_at_the_door() -> None:
    model = trained_model()
    recognizer = float_recognizer(threshold=0.0)
    visit = [f for f, _ in frames_of(recognizer, model.identities[1], 3, 71, 1)]
    sink, clock = Sink(), FrameClock()
    config = RecognitionConfig(confirm_frames=2, absent_after_s=5.0)
    pipeline = Pipeline(FaceDetector(), recognizer, sink, config, clock)
    play(pipeline, clock, visit)
    pipeline.ring("button")
    assert sink.rings == [("button", model.labels[1])]
    assert [e.person for e in sink.visitors] == [model.labels[1]] * 2  # the visit, the ring
