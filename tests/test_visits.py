"""Per-visit decisions: tracking faces across frames and averaging embeddings over a visit.

The tracker and the decision are tested on hand-made sightings against a
two-person house; the pipeline with the real BlazeFace detector and the real
backbone (tests/recognition_helpers.py), driven by a frame clock and a
recording sink (tests/pipeline_helpers.py).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import cast

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from aggregator.backbone import BackboneModels
from edge.chips import best_indices, chip_quality, scale_face, visit_embedding
from edge.frames import FramePair
from edge.gallery import Gallery
from edge.pipeline import Pipeline, Sighting, Track, Tracker, VisitDecision
from edge.recognition_config import RecognitionConfig
from edge.recognizer import UNKNOWN, ModelKey, Recognizer
from fedbell.faces.detection import Face
from fedbell.faces.embedding import normalize
from fedbell.faces.images import Box
from fedbell.faces.openset import identify
from tests.pipeline_helpers import FrameClock, RecordingSink
from tests.recognition_helpers import (
    detector,
    enrolled_gallery,
    frames_of,
    head,
    ready_recognizer,
)

Frame = npt.NDArray[np.uint8]
NO_FRAME: Frame = np.zeros((4, 4, 3), np.uint8)
CROP: Frame = np.zeros((8, 8), np.uint8)
KEY_1: ModelKey = ("b" * 64, "lineage", 1)
KEY_2: ModelKey = ("b" * 64, "lineage", 2)


class House:
    """Two enrolled people, "a" along x and "b" along y, threshold 0.6, model KEY_1 or KEY_2."""

    key: ModelKey = KEY_1

    def identify(
        self, embedding: npt.NDArray[np.float32], key: ModelKey | None
    ) -> tuple[str, float]:
        if key != self.key:
            return UNKNOWN, 0.0
        unit = normalize(embedding[None, :])[0]
        return identify(unit, np.eye(2, 3, dtype=np.float32), ("a", "b"), 0.6)


HOUSE_ = House()
HOUSE = cast("Recognizer", HOUSE_)  # what Track.decide needs of a recognizer: identify()


def towards_a(cosine: float) -> list[float]:
    """A unit embedding whose similarity to "a" is `cosine` (the rest towards nobody)."""
    return [cosine, 0.0, math.sqrt(1 - cosine * cosine)]


def sighting(box: Box, embedding: list[float] | None = None, key: ModelKey = KEY_1) -> Sighting:
    row = None if embedding is None else np.array([*embedding, 0.0][:3], np.float32)
    person, confidence = (UNKNOWN, 0.0) if row is None else HOUSE_.identify(row, key)
    return Sighting(box, person, confidence, CROP, row, row, None if row is None else key)


# --- the decision and the evidence ------------------------------------------------------


def test_track_averages_embeddings_and_restarts_on_a_new_model() -> None:
    box = (100, 100, 80, 80)
    track = Track(box, 0.0, 0)
    track.add(sighting(box, towards_a(0.55)), NO_FRAME, 0.0, 1)
    assert track.decide(HOUSE)[0] == UNKNOWN  # one weak frame: below 0.6
    track.add(sighting(box, towards_a(0.95)), NO_FRAME, 1.0, 2)
    assert track.frames == 2
    person, similarity = track.decide(HOUSE)  # the mean decides
    assert person == "a"
    assert 0.6 < similarity < 0.95
    assert track.best is not None
    assert track.best.confidence == pytest.approx(0.95)  # equal chips: the most confident

    track.add(sighting(box, [0.0, 1.0], key=KEY_2), NO_FRAME, 2.0, 3)  # hot swap
    assert track.frames == 1
    assert track.model == KEY_2
    assert track.decide(HOUSE) == (UNKNOWN, 0.0)  # the house still runs KEY_1
    HOUSE_.key = KEY_2
    try:
        assert track.decide(HOUSE)[0] == "b"
    finally:
        HOUSE_.key = KEY_1

    track.add(sighting(box, None), NO_FRAME, 3.0, 4)  # model gone: no evidence
    assert track.frames == 1
    assert track.decide(HOUSE) == (UNKNOWN, 0.0)


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
    assert left[0].decide(HOUSE)[0] == "a"
    assert right[0].decide(HOUSE)[0] == "b"

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


# --- the pipeline, with the real detector and backbone -----------------------------------


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return enrolled_gallery(tmp_path_factory.mktemp("gallery"), 3)


def recognizer_for(
    models: BackboneModels, house: Gallery, threshold: float, version: int = 0
) -> Recognizer:
    recognizer = ready_recognizer(models.float_model, models.sha256, house)
    recognizer.set_head(head(version=version, backbone=models.sha256, threshold=threshold))
    return recognizer


def detected(
    recognizer: Recognizer, person: int, count: int, seed: int, named: bool = True
) -> list[tuple[Frame, Sighting]]:
    """Frames with exactly one detected, embedded face, and this frame's reading of it.

    With `named`, only frames whose face alone is named right (rank 1): cartoon
    faces separate with a thin margin, and the tests are about visits, not that.
    """
    probe = Pipeline(detector(), recognizer, RecordingSink())
    found = []
    for frame in frames_of(person, count * 3, seed):
        sightings = probe.process(frame)
        right = not named or sightings[0].person == f"person{person}" if sightings else False
        if len(sightings) == 1 and sightings[0].embedding is not None and right:
            found.append((frame, sightings[0]))
        if len(found) == count:
            return found
    raise AssertionError(f"only {len(found)} of {count} frames with one face")


def embedding(sighting: Sighting) -> npt.NDArray[np.float32]:
    assert sighting.embedding is not None
    return sighting.embedding


def play(pipeline: Pipeline, clock: FrameClock, frames: list[Frame]) -> list[list[Sighting]]:
    seen = []
    for frame in frames:
        seen.append(pipeline.process(frame))
        clock.now += 1.0
    return seen


def test_a_visit_is_named_from_its_mean_not_from_its_first_frame(
    backbone_models: BackboneModels, house: Gallery
) -> None:
    person = 2
    loose = recognizer_for(backbone_models, house, threshold=0.0)
    candidates = detected(loose, person, 4, 41)
    assert all(s.person == f"person{person}" for _, s in candidates)
    candidates.sort(key=lambda fs: fs[1].confidence)  # the weakest frame first
    mean = normalize(np.mean([embedding(s) for _, s in candidates], axis=0)[None, :])[0]
    mean_similarity = float(mean @ loose.model.prototypes[person])
    weakest = candidates[0][1].confidence
    assert weakest < mean_similarity
    threshold = (weakest + mean_similarity) / 2  # the first frame alone is "unknown"

    sink, clock = RecordingSink(), FrameClock()
    config = RecognitionConfig(confirm_frames=4, debounce_s=10.0, absent_after_s=2.0)
    strict = recognizer_for(backbone_models, house, threshold)
    pipeline = Pipeline(detector(), strict, sink, config, clock=clock)
    seen = play(pipeline, clock, [frame for frame, _ in candidates] + [NO_FRAME] * 3)

    assert seen[0][0].person == UNKNOWN  # what a per-frame doorbell would have said
    # Named once, from the mean; the box is the best chip's (edge.chips.chip_quality).
    best = max(candidates, key=lambda fs: (fs[1].quality, fs[1].confidence))[1]
    assert [(e.person, e.box) for e in sink.visitors] == [(f"person{person}", best.box)]
    assert sink.visitors[0].confidence == pytest.approx(mean_similarity, abs=1e-5)
    assert pipeline.counters.visits == pipeline.counters.visitor_events == 1
    assert sink.present_states == [True, False]


def test_one_event_per_visit_and_per_person_within_the_debounce(
    backbone_models: BackboneModels, house: Gallery
) -> None:
    recognizer = recognizer_for(backbone_models, house, threshold=0.0)
    alice = [f for f, _ in detected(recognizer, 0, 15, 51)]
    stranger = [f for f, _ in detected(recognizer, 5, 5, 52, named=False)]
    empty = [NO_FRAME] * 3

    sink, clock = RecordingSink(), FrameClock()
    config = RecognitionConfig(
        confirm_frames=2, visit_frames=None, debounce_s=20.0, absent_after_s=2.0
    )
    strict = recognizer_for(backbone_models, house, threshold=1.0)
    pipeline = Pipeline(detector(), strict, sink, config, clock=clock)
    play(pipeline, clock, alice[:5] + empty)  # "unknown" at threshold 1 (nobody is named)
    play(pipeline, clock, stranger + empty)  # another unknown within the debounce: quiet
    assert sink.persons == [UNKNOWN]

    sink, clock = RecordingSink(), FrameClock()
    decisions: list[VisitDecision] = []
    pipeline = Pipeline(
        detector(), recognizer, sink, config, clock=clock, on_visit=decisions.append
    )
    play(pipeline, clock, alice[:5] + empty)
    play(pipeline, clock, alice[5:10] + empty)  # back within 20 s: not announced again
    clock.now += 20.0
    play(pipeline, clock, alice[10:] + empty)
    assert sink.persons == ["person0"] * 2
    assert pipeline.counters.visits == 3
    assert pipeline.counters.visitor_events == 2
    # Every visit's decision is reported, the debounced one too, with what decided it.
    assert [(d.person, d.announced) for d in decisions] == [
        ("person0", True),
        ("person0", False),
        ("person0", True),
    ]
    assert [e.confidence for e in sink.visitors] == [
        decisions[0].similarity,
        decisions[2].similarity,
    ]
    for decision in decisions:
        assert decision.frames == 2  # decided after confirm_frames
        assert sorted(chip.frame for chip in decision.chips) == [1, 2]
        assert all(chip.face_px > 0 and not chip.full_resolution for chip in decision.chips)


def test_a_model_swap_mid_visit_restarts_its_evidence(
    backbone_models: BackboneModels, house: Gallery
) -> None:
    recognizer = recognizer_for(backbone_models, house, threshold=0.0, version=1)
    visit = [f for f, _ in detected(recognizer, 1, 5, 61)]
    sink, clock = RecordingSink(), FrameClock()
    config = RecognitionConfig(
        confirm_frames=3, visit_frames=None, debounce_s=10.0, absent_after_s=2.0
    )
    pipeline = Pipeline(detector(), recognizer, sink, config, clock=clock)
    play(pipeline, clock, visit[:2])
    recognizer.set_head(head(version=2, backbone=backbone_models.sha256, threshold=0.0))
    seen = play(pipeline, clock, visit[2:4])
    assert sink.visitors == []  # two frames under v1 and two under v2: not yet three
    seen += play(pipeline, clock, visit[4:])
    assert len(sink.visitors) == 1
    assert all(s[0].model is not None and s[0].model[2] == 2 for s in seen)
    mean = normalize(np.mean([embedding(s[0]) for s in seen], axis=0)[None, :])[0]
    assert sink.visitors[0].person == "person1"
    expected = float(mean @ recognizer.model.prototypes[1])  # only the v2 frames count
    assert sink.visitors[0].confidence == pytest.approx(expected, abs=1e-5)


def test_a_ring_names_the_visit_at_the_door(
    backbone_models: BackboneModels, house: Gallery
) -> None:
    recognizer = recognizer_for(backbone_models, house, threshold=0.0)
    visit = [f for f, _ in detected(recognizer, 1, 3, 71)]
    sink, clock = RecordingSink(), FrameClock()
    config = RecognitionConfig(confirm_frames=2, visit_frames=None, absent_after_s=5.0)
    pipeline = Pipeline(detector(), recognizer, sink, config, clock=clock)
    play(pipeline, clock, visit)
    pipeline.ring("button")
    assert sink.rings == [("button", "person1")]
    assert sink.persons == ["person1"] * 2  # the visit, the ring


def test_frames_are_held_only_for_snapshots(
    backbone_models: BackboneModels, house: Gallery
) -> None:
    """Each live track holds its best frame for a snapshot (0.9 MB at 640x480): without
    snapshots (the default) no frame is held, and every event still goes out."""
    recognizer = recognizer_for(backbone_models, house, threshold=0.0)
    visit = [f for f, _ in detected(recognizer, 1, 3, 71)]
    for snapshot in (False, True):
        sink, clock = RecordingSink(), FrameClock()
        config = RecognitionConfig(
            confirm_frames=2, visit_frames=None, absent_after_s=5.0, snapshot=snapshot
        )
        pipeline = Pipeline(detector(), recognizer, sink, config, clock=clock)
        play(pipeline, clock, visit)
        pipeline.ring("button")
        assert sink.persons == ["person1"] * 2  # the visit, the ring
        assert sink.rings == [("button", "person1")]
        held = [track.best_frame for track in pipeline._tracker.tracks]
        assert len(held) == 1
        if snapshot:  # the visit's best frame, the last frame for the ring, the best again
            assert all(any(f is v for v in visit) for f in [*held, *sink.frames])
        else:
            assert held == [None]
            assert sink.frames == [None, None, None]


# --- the best chips of a visit, and chips cut from the full-resolution stream (issue 20) ----


def test_chip_quality_prefers_large_sharp_frontal_faces() -> None:
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 255, (38, 38, 3), dtype=np.uint8)
    texture = np.asarray(cv2.resize(noise, (150, 150), interpolation=cv2.INTER_CUBIC), np.uint8)
    blurred = np.asarray(cv2.GaussianBlur(texture, (0, 0), 3.0), np.uint8)
    frontal = Face((100, 100, 100, 100), 0.9, (125.0, 130.0), (175.0, 130.0))
    small = scale_face(frontal, 0.4, 0.4)
    turned = Face((100, 100, 100, 100), 0.9, (160.0, 130.0), (195.0, 130.0))
    assert small.box == (40, 40, 40, 40)
    assert small.right_eye == pytest.approx((50.0, 52.0))
    best = chip_quality(frontal, texture)
    assert 0 < chip_quality(small, texture) < best  # fewer pixels
    assert 0 < chip_quality(frontal, blurred) < best  # less detail
    assert 0 < chip_quality(turned, texture) < best  # the eyes off to one side
    assert chip_quality(Face((0, 0, 100, 100), 0.9), texture) == pytest.approx(best, rel=1e-6)


def test_a_visit_is_decided_from_its_best_chips() -> None:
    weak, strong = towards_a(0.5), towards_a(0.95)
    embeddings = np.array([weak, weak, strong, strong], np.float32)
    qualities = [0.1, 0.2, 0.9, 0.8]
    assert best_indices(qualities, 2) == [2, 3]
    mean = visit_embedding(embeddings, qualities, 2)
    assert float(mean[0]) == pytest.approx(0.95, abs=1e-5)  # only the two good chips count
    with pytest.raises(ValueError, match="one quality per embedding"):
        visit_embedding(embeddings, qualities[:3], 2)

    box = (100, 100, 80, 80)
    track = Track(box, 0.0, 0, keep=2)
    visit = [(weak, 0.1), (strong, 0.9), (weak, 0.2), (strong, 0.8)]
    for frame, (row, quality) in enumerate(visit):
        track.add(replace(sighting(box, row), quality=quality), NO_FRAME, float(frame), frame)
    assert track.frames == 4
    assert sorted(chip.quality for chip in track.evidence) == [0.8, 0.9]  # not the first two
    assert [chip.frame for chip in track.chosen()] == [2, 4]  # the visit's frames, best first
    person, similarity = track.decide(HOUSE)
    assert person == "a"
    assert similarity == pytest.approx(0.95, abs=1e-5)
    assert track.best is not None
    assert track.best.quality == 0.9


class OneFace:
    max_faces = 1

    def detect(self, frame: Frame) -> list[Face]:
        return [Face((100, 100, 50, 50), 0.9)]


class NoModel:
    """A recognizer before any model arrived: sightings stay unknown, chips are kept."""

    class model:  # noqa: N801 - the attribute the pipeline reads
        ready = False


def test_chips_come_from_the_full_frame_only_when_the_pair_matches() -> None:
    small = np.zeros((360, 640, 3), np.uint8)
    full = np.full((864, 1536, 3), 200, np.uint8)
    pipeline = Pipeline(OneFace(), cast("Recognizer", NoModel()), RecordingSink())
    matched = pipeline.process_pair(FramePair(small, 5.0, full, 5.0))
    assert float(matched[0].crop.mean()) == pytest.approx(200, abs=1)  # cut from the full frame
    assert matched[0].quality > 0
    late = pipeline.process_pair(FramePair(small, 5.0, full, 5.1))
    assert float(late[0].crop.mean()) == pytest.approx(0, abs=1)  # never from another instant
    assert pipeline.counters.mismatched_pairs == 1
    one = pipeline.process(small)
    assert float(one[0].crop.mean()) == pytest.approx(0, abs=1)
    assert pipeline.counters.mismatched_pairs == 1
    assert pipeline.counters.errors == 0


def test_a_replay_runs_on_its_own_time_and_ends_a_visit_after_its_empty_frames(
    backbone_models: BackboneModels, house: Gallery
) -> None:
    """A replay's frames are 1/fps apart however long each takes to judge: with the
    replay settings, 3 empty frames end a visit, 2 do not, and each visit is an event."""
    recognizer = recognizer_for(backbone_models, house, threshold=0.0)
    alice = [detected(recognizer, 0, 1, 61)[0][0]]  # one face that stays where it is
    config = RecognitionConfig(confirm_frames=3, debounce_s=30.0, absent_after_s=5.0)
    replay = config.for_replay(fps=10.0)
    assert replay.debounce_s == 0.0
    stalled = FrameClock()  # the machine's clock: stuck, as if each frame took forever
    sink = RecordingSink()
    pipeline = Pipeline(detector(), recognizer, sink, replay, clock=stalled, frame_period_s=0.1)
    play(pipeline, FrameClock(), [*alice * 4, *[NO_FRAME] * 3, *alice * 4])  # 3 empty: 2 visits
    play(pipeline, FrameClock(), [*[NO_FRAME] * 2, *alice * 4])  # 2 empty: the same visit
    assert pipeline.counters.visits == pipeline.counters.visitor_events == 2
    assert sink.persons == ["person0", "person0"]  # no debounce


def test_a_visit_is_decided_after_visit_frames_or_when_it_ends_sooner(
    backbone_models: BackboneModels, house: Gallery
) -> None:
    config = RecognitionConfig(absent_after_s=2.0)  # the defaults: the best 5 chips of 8
    assert (config.confirm_frames, config.decision_frames()) == (5, 8)
    recognizer = recognizer_for(backbone_models, house, threshold=0.0)
    visit = [f for f, _ in detected(recognizer, 1, 8, 81)]
    sink, clock = RecordingSink(), FrameClock()
    pipeline = Pipeline(detector(), recognizer, sink, config, clock=clock)
    play(pipeline, clock, visit[:7])
    assert sink.visitors == []  # seven frames: still choosing its best chips
    play(pipeline, clock, visit[7:8])
    assert sink.persons == ["person1"]  # decided at the eighth

    short = RecognitionConfig(absent_after_s=2.0, debounce_s=0.0)
    sink, clock = RecordingSink(), FrameClock()
    pipeline = Pipeline(detector(), recognizer, sink, short, clock=clock)
    play(pipeline, clock, visit[:6])
    assert sink.visitors == []
    play(pipeline, clock, [NO_FRAME] * 2)  # the face is gone: the visit ends, decided
    assert sink.persons == ["person1"]
    play(pipeline, clock, visit[:4] + [NO_FRAME] * 3)  # fewer than confirm_frames: no visit
    assert len(sink.visitors) == 1
    assert pipeline.counters.visits == 1


def test_visit_frames_by_default_gives_way_to_more_confirm_frames() -> None:
    assert RecognitionConfig(confirm_frames=10).decision_frames() == 10
    assert RecognitionConfig(visit_frames=None).decision_frames() == 5
    with pytest.raises(ValueError, match="visit_frames"):
        RecognitionConfig(confirm_frames=5, visit_frames=4)
