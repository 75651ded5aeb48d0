"""Generated identities, enrolled the way a doorbell enrolls a real visitor.

Each synthetic face is pasted into a porch frame and goes through the edge's
own enrollment (Haar detection, `crop_face`), so the galleries hold the same
kind of crop the live pipeline later recognises: the detector's framing, with
its jitter, not the generator's perfectly centred render.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edge.detector import FaceDetector
from edge.enroll import enroll
from fedbell.synthetic import make_identities, make_scene, person_name, render_face

ATTEMPTS_PER_IMAGE = 4
"""Frames offered per wanted crop: Haar misses a few percent of faces."""


class _Frames:
    """A FrameSource over generated porch frames (the enroll() interface)."""

    def __init__(self, frames: Iterator[np.ndarray]) -> None:
        self._frames = frames

    def read(self) -> np.ndarray | None:
        return next(self._frames, None)

    def close(self) -> None:
        pass


def enroll_synthetic(
    root: Path, persons: int, images_per_person: int, seed: int, size: int = 96
) -> list[str]:
    """Write `<root>/<person>/<crop>.png` for generated identities; returns the names."""
    rng = np.random.default_rng(seed + 1)
    detector = FaceDetector()
    names = []
    for index, identity in enumerate(make_identities(persons, seed)):
        frames = (
            make_scene([render_face(identity, rng, size)], rng).frame
            for _ in range(images_per_person * ATTEMPTS_PER_IMAGE)
        )
        result = enroll(
            _Frames(frames), detector, root, person_name(index), count=images_per_person
        )
        if not result.saved:
            raise RuntimeError(f"no face of {person_name(index)} was detected to enroll")
        names.append(person_name(index))
    return names
