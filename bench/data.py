"""The benchmark's data: a face dataset split the same way as the simulation's."""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.federated import Federation, NodeData
from fedbell.dataset import Sample, list_samples, load_samples
from fedbell.model import TrainParams
from fedbell.synthetic import make_dataset
from simulation.data import split_dataset

DEFAULT_DATASET = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "att_faces"


def _load(samples: tuple[Sample, ...], labels: tuple[str, ...]) -> NodeData:
    images, ids = load_samples(samples, labels)
    return NodeData(images, ids)


def load_federation(
    dataset: Path | None, nodes: int, alpha: float, seed: int, plan: TrainParams
) -> tuple[Federation, str]:
    """The split (30 % held out per person, Dirichlet(alpha) over nodes) and its name.

    With no dataset given, ../shared/datasets/att_faces when present, else
    generated identities (so the benchmark runs on a fresh clone too).
    """
    if dataset is None and DEFAULT_DATASET.is_dir():
        dataset = DEFAULT_DATASET
    if dataset is None:
        with tempfile.TemporaryDirectory() as tmp:
            make_dataset(Path(tmp), persons=20, images_per_person=15, seed=seed)
            samples = list_samples(Path(tmp))
            split = split_dataset(samples, nodes, alpha, 0.3, seed)
            fed = Federation(
                tuple(_load(p, split.labels) for p in split.per_node),
                _load(split.held_out, split.labels),
                len(split.labels),
                plan,
                seed,
            )
        return fed, "synthetic (20 persons x 15)"
    split = split_dataset(list_samples(dataset), nodes, alpha, 0.3, seed)
    fed = Federation(
        tuple(_load(p, split.labels) for p in split.per_node),
        _load(split.held_out, split.labels),
        len(split.labels),
        plan,
        seed,
    )
    return fed, str(dataset)
