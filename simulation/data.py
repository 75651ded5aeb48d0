"""The simulation's data: a held-out split per person, the rest spread across nodes.

Galleries and the held-out folder are written as symlinks to the source
images, so a real dataset beside the checkout is never copied or modified.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fedbell.dataset import Sample, dirichlet_partition, holdout_split, list_samples
from fedbell.topics import check_segment


@dataclass(frozen=True)
class Split:
    labels: tuple[str, ...]
    """Every person, sorted: the model's output order."""
    held_out: tuple[Sample, ...]
    train: tuple[Sample, ...]
    per_node: tuple[tuple[Sample, ...], ...]
    """The training samples each node holds; together exactly `train`."""


def dataset_labels(samples: Sequence[Sample]) -> tuple[str, ...]:
    """Sorted person names, each usable as a label (a topic-safe segment)."""
    labels = tuple(sorted({s.person for s in samples}))
    for label in labels:
        try:
            check_segment(label, "person folder name")
        except ValueError as err:
            raise ValueError(f"{err}: rename it to be used as a label") from None
    if len(labels) < 2:
        raise ValueError(f"a face model needs at least 2 persons, the dataset has {len(labels)}")
    return labels


def split_dataset(
    samples: Sequence[Sample], nodes: int, alpha: float, holdout_fraction: float, seed: int
) -> Split:
    """Hold out `holdout_fraction` of each person, then Dirichlet(alpha) the rest over nodes."""
    labels = dataset_labels(samples)
    train, held_out = holdout_split(samples, holdout_fraction, seed)
    if len(train) < nodes:
        raise ValueError(f"{len(train)} training images cannot give {nodes} nodes one each")
    parts = dirichlet_partition([s.person for s in train], nodes, alpha, seed)
    per_node = tuple(tuple(train[i] for i in part) for part in parts)
    return Split(labels, tuple(held_out), tuple(train), per_node)


def load_split(root: Path, nodes: int, alpha: float, holdout_fraction: float, seed: int) -> Split:
    return split_dataset(list_samples(root), nodes, alpha, holdout_fraction, seed)


def write_folder(samples: Sequence[Sample], root: Path) -> None:
    """`<root>/<person>/<image>` links to the source files (copies where links fail)."""
    for sample in samples:
        target = root / sample.person / sample.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        source = sample.path.resolve()
        try:
            target.symlink_to(source)
        except OSError:  # e.g. a filesystem without symlinks
            shutil.copyfile(source, target)
