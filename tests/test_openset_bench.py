"""bench.openset without ../shared: the split, the conditions and a tiny synthetic run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench import openset
from bench.openset_features import condition_rng
from fedbell.faces.conditions import doorbell_conditions, draw_setting
from fedbell.faces.embedding import TrainParams


def _people(count: int) -> list[str]:
    return [f"lfw_dev/person{i:03d}" for i in range(count)]


def test_split_is_disjoint_and_deterministic() -> None:
    people = _people(200)
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(300)]

    def split_of(people: list[str], strangers: list[str], seed: int) -> openset.Split:
        return openset.split_people(
            people, strangers, seed, calibration=100, negatives=150, residents=20
        )

    split = split_of(people, strangers, 3)
    assert split == split_of(list(reversed(people)), list(reversed(strangers)), 3)
    assert split != split_of(people, strangers, 4)
    train = [p for h in split.train_houses for p in h]
    test = [p for h in split.test_houses for p in h]
    assert len(train) == len(set(train))
    assert len(test) == len(set(test))
    assert not set(train) & set(test)
    # The aggregator's held-out people live in no house.
    assert len(set(split.residents)) == 20
    assert not set(split.residents) & (set(train) | set(test))
    assert set(train) | set(test) | set(split.residents) == set(people)
    assert sorted(split.people()) == sorted(people)
    assert len(test) == 60
    low, high = openset.HOUSE_SIZES
    assert all(low <= len(h) <= high + 1 for h in split.train_houses + split.test_houses)
    assert len(split.calibration) == 100
    assert len(split.negatives) == 150
    assert not set(split.calibration) & set(split.negatives)


def test_split_with_another_test_dataset() -> None:
    split = openset.split_people(
        _people(30),
        [f"s/{i}" for i in range(50)],
        seed=0,
        test_people=[f"other/p{i}" for i in range(12)],
        calibration=20,
        negatives=20,
        residents=5,
    )
    train = {p for h in split.train_houses for p in h}
    assert train | set(split.residents) == set(_people(30))
    assert len(split.residents) == 5
    assert {p for h in split.test_houses for p in h} == {f"other/p{i}" for i in range(12)}


def test_conditions_are_deterministic_per_seed_and_change_the_photo() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)
    photo[60:190, 70:180] = (40, 120, 200)  # something to blur and tint
    first = doorbell_conditions(photo, condition_rng("a/b/c.jpg", 0))
    second = doorbell_conditions(photo, condition_rng("a/b/c.jpg", 0))
    other = doorbell_conditions(photo, condition_rng("a/b/c.jpg", 1))
    assert first.dtype == np.uint8
    assert first.ndim == 3
    assert first.shape[2] == 3
    assert np.array_equal(first, second)
    assert first.shape != photo.shape or not np.array_equal(first, photo)
    assert first.shape != other.shape or not np.array_equal(first, other)
    # Faces end up 32-65 px wide: the 250 px photo shrinks to 73-148 px.
    assert 70 <= first.shape[1] <= 150
    nights = [draw_setting(np.random.default_rng(s)).night for s in range(200)]
    assert 60 < sum(nights) < 140
    grey = doorbell_conditions(photo[:, :, 0], np.random.default_rng(5))
    assert grey.ndim == 3
    with pytest.raises(ValueError, match="uint8"):
        doorbell_conditions(photo.astype(np.float32), rng)


def _synthetic_features(
    people: list[str], dim: int, rng: np.random.Generator
) -> dict[str, list[np.ndarray]]:
    centres = rng.normal(size=(len(people), dim))
    return {
        person: [
            (centres[i] + 0.6 * rng.normal(size=dim)).astype(np.float32)
            for _ in range(int(rng.integers(2, 7)))
        ]
        for i, person in enumerate(people)
    }


def test_tiny_synthetic_run_writes_the_schema(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    dim = 16
    people = _people(90)
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(160)]
    split = openset.split_people(
        people, strangers, seed=0, calibration=80, negatives=80, residents=10
    )
    features = _synthetic_features(people, dim, rng)
    stranger_features = {k: rng.normal(size=dim).astype(np.float32) for k in strangers}
    start = [np.eye(dim, dtype=np.float32)]
    bench = openset.build_bench(split, features, stranger_features, start, seed=0)
    assert bench.calibration.shape == (80, dim)
    assert len(bench.residents) == 10  # everyone has 2+ photos: all enrolled
    settings = openset.ArmSettings(
        rounds=3, houses_per_round=4, central_epochs=2, params=TrainParams(epochs=2)
    )
    outcomes = openset.run_arms({0: bench}, settings, jobs=1)
    assert [r.round for r in outcomes[0]["federated"].rounds] == [1, 2, 3]
    assert all(r.bytes_up > 0 for r in outcomes[0]["federated"].rounds)
    assert all(r.bytes_down > 0 for r in outcomes[0]["federated"].rounds)
    data = openset.report(
        test_dataset="synthetic",
        conditions="doorbell",
        seeds=[0],
        outcomes=outcomes,
        extra={"enroll_ms": 1.0, "embed_ms": 0.2},
    )
    path = tmp_path / "openset.json"
    path.write_text(json.dumps(data))
    loaded = json.loads(path.read_text())
    assert isinstance(loaded["test_dataset"], str)
    assert loaded["conditions"] == "doorbell"
    assert {a["name"] for a in loaded["arms"]} == set(openset.ARMS)
    for arm in loaded["arms"]:
        for key in ("open_set_accuracy", "rank1", "tar_at_far_1pct", "unknown_rejected"):
            assert isinstance(arm[key], float)
            assert 0.0 <= arm[key] <= 1.0
    for record in loaded["rounds"]:
        assert isinstance(record["round"], int)
        assert isinstance(record["bytes_up"], int)
        assert isinstance(record["bytes_down"], int)
        assert isinstance(record["open_set_accuracy"], float)
    assert isinstance(loaded["enroll_ms"], float)
    assert isinstance(loaded["embed_ms"], float)
    verdict = openset.bar_verdict({a["name"]: a for a in loaded["arms"]})
    assert len(verdict) == 5
