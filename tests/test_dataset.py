"""Face folders: listing `<person>/<image>` (the aggregator's stranger and held-out
folders, the simulation's datasets), held-out per person, Dirichlet partition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbell.dataset import Sample, dirichlet_partition, holdout_split, list_samples


def samples(persons: int, each: int) -> list[Sample]:
    return [Sample(f"p{p}", Path(f"p{p}/{i}.png")) for p in range(persons) for i in range(each)]


def test_holdout_takes_the_same_share_of_every_person() -> None:
    train, held = holdout_split(samples(5, 10), 0.3, seed=1)
    for person in {s.person for s in train}:
        assert sum(s.person == person for s in held) == 3
        assert sum(s.person == person for s in train) == 7
    assert holdout_split(samples(5, 10), 0.3, seed=1) == (train, held)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(1, 9), st.floats(0.05, 100.0), st.integers(0, 99))
def test_dirichlet_partition_covers_everything_once(
    persons: int, nodes: int, alpha: float, seed: int
) -> None:
    labels = [s.person for s in samples(persons, 8)]
    if nodes > len(labels):
        with pytest.raises(ValueError, match="cannot give"):
            dirichlet_partition(labels, nodes, alpha, seed)
        return
    parts = dirichlet_partition(labels, nodes, alpha, seed)
    flat = sorted(i for part in parts for i in part)
    assert flat == list(range(len(labels)))
    assert all(parts)


def test_small_alpha_is_less_even_than_large_alpha() -> None:
    labels = [s.person for s in samples(10, 20)]

    def spread(alpha: float) -> float:
        parts = dirichlet_partition(labels, 5, alpha, seed=3)
        persons_per_node = [len({labels[i] for i in part}) for part in parts]
        return float(np.mean(persons_per_node))

    assert spread(0.1) < spread(100.0)


def test_list_samples_takes_images_of_person_folders_only(tmp_path: Path) -> None:
    for relative in ("bob/2.jpg", "bob/1.PNG", "ann/a.pgm", "ann/.hidden.png", "ann/notes.txt"):
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / relative).write_bytes(b"x")
    (tmp_path / ".cache" / "x.png").parent.mkdir()
    (tmp_path / ".cache" / "x.png").write_bytes(b"x")
    (tmp_path / "loose.png").write_bytes(b"x")  # not in a person's folder
    assert list_samples(tmp_path) == [
        Sample("ann", tmp_path / "ann" / "a.pgm"),
        Sample("bob", tmp_path / "bob" / "1.PNG"),
        Sample("bob", tmp_path / "bob" / "2.jpg"),
    ]


def test_list_samples_says_what_is_wrong_with_a_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_samples(tmp_path / "absent")
    (tmp_path / "ann").mkdir()
    (tmp_path / "ann" / "notes.txt").write_text("no photos")
    with pytest.raises(FileNotFoundError, match="no images"):
        list_samples(tmp_path)
