"""The demo's live replay (simulation/live.py): visits filmed with the default camera's two
streams and replayed through the doorbell's camera and pipeline, on generated faces."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from aggregator.backbone import BackboneModels
from edge.camera import LORES_FOLDER
from edge.gallery import Gallery
from edge.pipeline import VisitDecision
from fedbell.faces.detection import Detector, Face
from fedbell.faces.synthetic import render_face
from simulation.live import film, watch
from simulation.replay import FRAMES_PER_VISIT, Visit
from tests.pipeline_helpers import RecordingSink
from tests.recognition_helpers import detector, enrolled_gallery, identities, ready_recognizer

Frame = npt.NDArray[np.uint8]


class RewritingDetector:
    """BlazeFace, and a camera that overwrites the main stream of `visit`'s frames after their
    small stream was read: those pairs no longer match."""

    def __init__(self, frames: Path, visit: int) -> None:
        self.detector = detector()
        self.max_faces = self.detector.max_faces
        self.frames, self.visit, self.calls = frames, visit, 0

    def detect(self, frame: Frame) -> list[Face]:
        index, self.calls = self.calls, self.calls + 1
        if index // FRAMES_PER_VISIT == self.visit:
            main = self.frames / f"{index:05d}.bmp"
            image = cv2.imread(str(main))
            assert image is not None
            newer = self.frames / "newer.bmp"
            cv2.imwrite(str(newer), image[:, ::-1])  # the next instant: the face elsewhere
            newer.replace(main)
        return self.detector.detect(frame)


@pytest.fixture(scope="module")
def house(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    return enrolled_gallery(tmp_path_factory.mktemp("gallery"), 3)


def filmed(folder: Path, persons: list[int]) -> tuple[Path, list[Visit]]:
    """The porch video of generated people walking up, as the demo films it."""
    rng = np.random.default_rng(7)
    visits = []
    for person in persons:
        photo = folder / f"person{person}.png"
        photo.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(photo), render_face(identities()[person], rng, 96))
        visits.append(Visit(f"person{person}", photo))
    frames = folder / "frames"
    film(frames, visits, detector(), seed=0)
    return frames, visits


def chips_of(decided: list[VisitDecision]) -> list[tuple[bool, int]]:
    return [(chip.full_resolution, chip.face_px) for d in decided for chip in d.chips]


def test_the_demo_films_two_streams_and_cuts_every_chip_from_the_main_one(
    tmp_path: Path, backbone_models: BackboneModels, house: Gallery
) -> None:
    frames, visits = filmed(tmp_path, [0, 1, 2])
    main = cv2.imread(str(frames / "00000.bmp"))
    lores = cv2.imread(str(frames / LORES_FOLDER / "00000.jpg"))
    assert main is not None
    assert lores is not None
    assert (main.shape[:2], lores.shape[:2]) == ((864, 1536), (360, 640))

    recognizer = ready_recognizer(backbone_models.float_model, backbone_models.sha256, house)
    sink = RecordingSink()
    decided, counters = watch(frames, detector(), recognizer, sink, len(visits))
    assert [[d.person for d in visit] for visit in decided] == [[v.truth] for v in visits]
    assert sink.persons == [v.truth for v in visits]
    chips = [chip for visit in decided for chip in chips_of(visit)]
    assert len(chips) == 5 * len(visits)  # each visit decided from confirm_frames chips
    assert all(main for main, _ in chips)
    assert counters.mismatched_pairs == 0
    assert counters.frames == FRAMES_PER_VISIT * len(visits)


def test_a_main_frame_of_another_instant_is_never_cut_from(
    tmp_path: Path, backbone_models: BackboneModels, house: Gallery
) -> None:
    frames, visits = filmed(tmp_path, [0, 1])
    recognizer = ready_recognizer(backbone_models.float_model, backbone_models.sha256, house)
    rewriting: Detector = RewritingDetector(frames, visit=1)
    decided, _ = watch(frames, rewriting, recognizer, RecordingSink(), len(visits))
    first, second = chips_of(decided[0]), chips_of(decided[1])
    assert len(first) == len(second) == 5
    assert all(main for main, _ in first)
    assert not any(main for main, _ in second)  # cut from the lores stream
    # The same faces, with 2.4 times fewer pixels on the lores stream than on the main one.
    assert max(px for _, px in second) < min(px for _, px in first)
