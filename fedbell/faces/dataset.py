"""Face datasets as `<root>/<person>/<image>` folders.

The same layout serves real photographs (../shared/datasets), generated
identities, the aggregator's stranger and held-out folders, and a doorbell's
own gallery.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".pgm", ".bmp", ".webp"}


@dataclass(frozen=True)
class Sample:
    person: str
    path: Path


def list_samples(root: Path) -> list[Sample]:
    """Every image under `<root>/<person>/`, sorted, hidden files skipped."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: dataset folder does not exist")
    samples = [
        Sample(person.name, image)
        for person in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for image in sorted(person.iterdir())
        if image.suffix.lower() in IMAGE_SUFFIXES and not image.name.startswith(".")
    ]
    if not samples:
        raise FileNotFoundError(f"{root}: no images in <person>/<image> layout")
    return samples
