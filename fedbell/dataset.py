"""Face datasets as `<root>/<person>/<image>` folders, and how to split them.

The same layout serves real photographs (../shared/datasets), generated
identities, and a doorbell's own gallery.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedbell.faces import load_face
from fedbell.model import Images, LabelIds

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


def load_samples(samples: Sequence[Sample], labels: Sequence[str]) -> tuple[Images, LabelIds]:
    """Normalised crops and label ids; persons outside `labels` are skipped."""
    index = {name: i for i, name in enumerate(labels)}
    kept = [s for s in samples if s.person in index]
    images = (
        np.stack([load_face(s.path) for s in kept])
        if kept
        else np.zeros((0, 1, 1), dtype=np.float32)
    )
    ids = np.array([index[s.person] for s in kept], dtype=np.int64)
    return images.astype(np.float32), ids


def holdout_split(
    samples: Sequence[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): the same `fraction` of every person's images is held out."""
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    held: list[Sample] = []
    for person in sorted({s.person for s in samples}):
        mine = [s for s in samples if s.person == person]
        order = rng.permutation(len(mine))
        cut = max(1, round(len(mine) * fraction)) if len(mine) > 1 else 0
        held += [mine[i] for i in order[:cut]]
        train += [mine[i] for i in order[cut:]]
    return train, held


def dirichlet_partition(
    persons: Sequence[str], nodes: int, alpha: float, seed: int
) -> list[list[int]]:
    """Indices of `persons` for each node; per person, shares ~ Dirichlet(alpha).

    Small alpha gives each node a few people (non-IID, like real doorbells);
    large alpha spreads everyone evenly. Every node gets at least one sample.
    """
    if not 1 <= nodes <= len(persons):
        raise ValueError(f"cannot give {nodes} nodes a sample each from {len(persons)} samples")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(nodes)]
    names = np.array(persons)
    for person in sorted(set(persons)):
        indices = rng.permutation(np.flatnonzero(names == person))
        shares = rng.dirichlet(np.full(nodes, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(indices)).round().astype(int)
        for node, chunk in enumerate(np.split(indices, cuts)):
            parts[node] += [int(i) for i in chunk]
    for node in range(nodes):  # an empty node would have nothing to train on
        if not parts[node]:
            donor = max(range(nodes), key=lambda n: len(parts[n]))
            parts[node].append(parts[donor].pop())
    return [sorted(p) for p in parts]


def class_counts(ids: npt.NDArray[np.int64], classes: int) -> list[int]:
    return [int(c) for c in np.bincount(ids, minlength=classes)]
