"""The doorbell's gallery of labelled face crops: `<gallery>/<person>/<image>`.

Enrollment and labelling write it; training and the on-device accuracy check
read it. It never leaves the house: only weight deltas learned from it do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedbell.dataset import IMAGE_SUFFIXES
from fedbell.faces import FACE_SIZE, load_face
from fedbell.model import Images, LabelIds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSet:
    """Normalised crops with label ids in the model's label order."""

    images: Images
    labels: LabelIds
    skipped_persons: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.images)


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


class Gallery:
    """Read access to a gallery folder (which may not exist yet)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def persons(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _visible(p))

    def images(self, person: str) -> list[Path]:
        """A person's images, newest first (by modification time, then name)."""
        folder = self.root / person
        if not folder.is_dir():
            return []
        found = [
            p
            for p in folder.iterdir()
            if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)

    def count(self) -> int:
        """Images in the gallery, all persons; 0 for a missing folder."""
        return sum(len(self.images(person)) for person in self.persons())

    def training_set(self, labels: Sequence[str], max_per_person: int) -> TrainingSet:
        """The newest `max_per_person` crops of every person in `labels`.

        The label set belongs to the site's global model: a person only this
        doorbell knows cannot be trained until the site adds them, so they are
        skipped (and logged) rather than mislabelled. An unreadable image is
        skipped too: one bad file must not cost the whole round.
        """
        index = {name: i for i, name in enumerate(labels)}
        skipped = tuple(p for p in self.persons() if p not in index)
        if skipped:
            log.info("gallery: %s not in the model's labels; not trained on", ", ".join(skipped))
        faces: list[Images] = []
        ids: list[int] = []
        for person in self.persons():
            if person not in index:
                continue
            for path in self.images(person)[:max_per_person]:
                try:
                    faces.append(load_face(path))
                except ValueError as err:
                    log.warning("gallery: skipping %s: %s", path, err)
                    continue
                ids.append(index[person])
        images = (
            np.stack(faces).astype(np.float32)
            if faces
            else np.zeros((0, FACE_SIZE, FACE_SIZE), dtype=np.float32)
        )
        return TrainingSet(images, np.array(ids, dtype=np.int64), skipped)
