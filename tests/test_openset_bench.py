"""bench.openset without ../shared: the split, the conditions and a tiny synthetic run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import households, openset, openset_report
from bench.openset_features import Photo, condition_rng
from bench.openset_frames import FrameCache, frame_image, frame_key
from bench.openset_visits import (
    add_visit_figures,
    build_visit_bench,
    evaluate_visits,
    score_visits,
    visit_embeddings,
)
from edge.chips import visit_embedding
from fedbell.faces import last_level
from fedbell.faces.conditions import doorbell_conditions, draw_setting
from fedbell.faces.dlib_resnet import FEATURES
from fedbell.faces.embedding import TrainParams, embed


def assert_types(record: dict[str, Any], types: dict[str, type]) -> None:
    """Each field of a benchmark's JSON record that `types` names holds a value of its type."""
    wrong = {
        key: record.get(key) for key, kind in types.items() if not isinstance(record.get(key), kind)
    }
    assert not wrong, f"fields of the wrong type: {wrong}"


def _people(count: int) -> list[str]:
    return [f"lfw_dev/person{i:03d}" for i in range(count)]


def test_split_is_disjoint_and_deterministic() -> None:
    people = _people(200)
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(300)]

    def split_of(people: list[str], strangers: list[str], seed: int) -> households.Split:
        return households.split_people(
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
    low, high = households.HOUSE_SIZES
    assert all(low <= len(h) <= high + 1 for h in split.train_houses + split.test_houses)
    assert len(split.calibration) == 100
    assert len(split.negatives) == 150
    assert not set(split.calibration) & set(split.negatives)


def test_split_with_another_test_dataset() -> None:
    split = households.split_people(
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


def _tiny_bench(seed: int, dim: int = 16) -> households.Bench:
    """90 generated people with `dim` features, 160 strangers, the identity as the start."""
    rng = np.random.default_rng(seed)
    people = _people(90)
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(160)]
    split = households.split_people(
        people, strangers, seed=0, calibration=80, negatives=80, residents=10
    )
    features = _synthetic_features(people, dim, rng)
    stranger_features = {k: rng.normal(size=dim).astype(np.float32) for k in strangers}
    start = [np.eye(dim, dtype=np.float32)]
    return households.build_bench(split, features, stranger_features, start, seed=0)


def test_tiny_synthetic_run_writes_the_schema(tmp_path: Path) -> None:
    dim = 16
    bench = _tiny_bench(1, dim)
    assert bench.calibration.shape == (80, dim)
    assert len(bench.residents) == 10  # everyone has 2+ photos: all enrolled
    settings = openset.ArmSettings(
        rounds=3, houses_per_round=4, central_epochs=2, params=TrainParams(epochs=2)
    )
    outcomes = openset.run_arms({0: bench}, settings, jobs=1)
    assert [r.round for r in outcomes[0]["federated"].rounds] == [1, 2, 3]
    assert all(r.bytes_up > 0 for r in outcomes[0]["federated"].rounds)
    assert all(r.bytes_down > 0 for r in outcomes[0]["federated"].rounds)
    data = openset_report.report(
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
    assert {a["name"] for a in loaded["arms"]} == set(openset_report.ARMS)
    for arm in loaded["arms"]:
        for key in ("open_set_accuracy", "rank1", "tar_at_far_1pct", "unknown_rejected"):
            assert isinstance(arm[key], float)
            assert 0.0 <= arm[key] <= 1.0
    for record in loaded["rounds"]:
        assert_types(
            record, {"round": int, "bytes_up": int, "bytes_down": int, "open_set_accuracy": float}
        )
    assert_types(loaded, {"enroll_ms": float, "embed_ms": float})
    verdict = openset_report.bar_verdict({a["name"]: a for a in loaded["arms"]})
    assert len(verdict) == 6  # issue 11's five lines and issue 22's secure-rounds line
    assert "secure rounds" in verdict[-1]


def test_the_secure_arm_masks_the_subset_its_settings_name() -> None:
    bench = _tiny_bench(2)
    args = openset._parser().parse_args(["--secure-density", "0.5", "--secure-clip-norm", "0.04"])
    assert (args.secure_density, args.secure_clip_norm) == (0.5, 0.04)
    sent = {}
    for density in (openset.ArmSettings.secure_density, 0.5):
        settings = openset.ArmSettings(
            rounds=2,
            houses_per_round=5,
            params=TrainParams(epochs=2),
            secure_density=density,
            secure_clip_norm=args.secure_clip_norm,
        )
        run = openset.run_federated(bench, settings, seed=0, secure=True).rounds_run
        assert run is not None
        sent[density] = max(r.bytes_up / r.participants for r in run.rounds)
    # The masked values are the subset: half the head against the product's tenth (here 78
    # and 384 bytes for 26 and 128 of the 256 values).
    small, large = sent[openset.ArmSettings.secure_density], sent[0.5]
    assert 4 * small < large < 6 * small, sent


# --- visits (issue 20) ------------------------------------------------------------------------


def test_visit_frames_share_the_scene_and_redraw_the_distance() -> None:
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (250, 250, 3), dtype=np.uint8)
    key = "lfw_dev/p/p_0001.jpg"
    nights = {}
    for seed in range(6):
        far = [frame_image(photo, key, seed, i, "far") for i in range(4)]
        # Frame 0 of a far visit is the frame-level bench's frame, bit for bit.
        assert np.array_equal(far[0], doorbell_conditions(photo, condition_rng(key, seed)))
        assert len({f.shape for f in far} | {f.tobytes() for f in far}) > 2  # frames differ
        grey = [bool(np.array_equal(f[..., 0], f[..., 2])) for f in far]
        assert len(set(grey)) == 1  # night vision is the scene's, shared by its frames
        nights[seed] = grey[0]
        near = [frame_image(photo, key, seed, i, "near") for i in range(1, 4)]
        assert min(f.shape[1] for f in near) > max(f.shape[1] for f in far)  # more pixels
        assert np.array_equal(frame_image(photo, key, seed, 3, "near"), near[2])  # seeded
    assert len(set(nights.values())) == 2
    assert frame_image(photo, key, 0, 2, "clean") is photo


def _frame_cache(
    tmp_path: Path, everyone: dict[str, list[Photo]], stranger_keys: list[str], frames: int
) -> FrameCache:
    """Features of every photo's frames: a person's centre plus noise that shrinks with
    the chip's quality (a good chip says more)."""
    rng = np.random.default_rng(2)
    cache = FrameCache(tmp_path / "frames.npz")
    centres = {person: rng.normal(size=DIM) for person in everyone}
    keys = [(p.key, centres[person]) for person, ps in everyone.items() for p in ps]
    keys += [(k, rng.normal(size=DIM)) for k in stranger_keys]
    for key, centre in keys:
        for index in range(frames):
            quality = float(rng.uniform(0.1, 1.0))
            name = frame_key(key, index)
            noise = rng.normal(size=DIM) * (1.2 - quality)
            cache.features[name] = (centre + noise).astype(np.float32)
            cache.flags[name] = 0 if index == 1 and key.endswith("3.jpg") else 2
            cache.quality[name] = quality
    return cache


DIM = 16


def test_tiny_synthetic_visit_run_scores_what_the_doorbell_decides(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    people = _people(90)
    everyone = {
        person: [
            Photo(Path(f"{person}/{j}.jpg"), f"{person}/{j}.jpg")
            for j in range(int(rng.integers(2, 7)))
        ]
        for person in people
    }
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(160)]
    split = households.split_people(
        people, strangers, seed=0, calibration=80, negatives=80, residents=10
    )
    frames, keep = 4, 2
    cache = _frame_cache(tmp_path, everyone, strangers, frames)

    def frame0(key: str) -> np.ndarray:
        return cache.frames(key, 1)[0][0]

    per_person = {person: [frame0(p.key) for p in everyone[person]] for person in people}
    stranger_features = {k: frame0(k) for k in strangers}
    start = [np.eye(DIM, dtype=np.float32)]
    bench = households.build_bench(split, per_person, stranger_features, start, seed=0)
    visits = build_visit_bench(
        split, everyone, cache, cache, frames=frames, keep=keep, enrolment="doorbell", width=DIM
    )
    assert len(visits.houses) == len(bench.test)
    assert visits.calibration.count == 80
    # A visit is decided by edge.chips.visit_embedding, the doorbell's own function.
    probes = visits.houses[0].probes
    decided = visit_embeddings(probes, start, keep)
    rows = probes.visit == 0
    expected = visit_embedding(
        embed(probes.frames[rows], start), probes.quality[rows].tolist(), keep
    )
    assert np.allclose(decided[0], expected)
    settings = openset.ArmSettings(
        rounds=2, houses_per_round=4, central_epochs=2, params=TrainParams(epochs=2)
    )
    outcomes = openset.run_arms({0: bench}, settings, jobs=1)
    assert all(len(o.heads) >= 1 for o in outcomes[0].values())
    scored = score_visits({0: visits}, outcomes, start, 0.01, 5)
    data = openset_report.report(
        test_dataset="synthetic", conditions="far", seeds=[0], outcomes=outcomes, extra={}
    )
    add_visit_figures(data, scored, [0], frames, "doorbell")
    loaded = json.loads(json.dumps(data))
    assert loaded["visit_frames"] == frames
    assert loaded["enrolment"] == "doorbell"
    for arm in loaded["arms"]:
        for key in ("visit_open_set_accuracy", "visit_tar_at_far_1pct", "visit_unknown_rejected"):
            assert 0.0 <= arm[key] <= 1.0
    start_arm = next(a for a in loaded["arms"] if a["name"] == "start")
    # Visits of several frames, their best chips averaged, beat single frames here.
    assert start_arm["visit_rank1"] >= start_arm["rank1"] - 0.05


def test_a_person_with_too_few_enrolment_photos_only_rings_as_a_stranger(tmp_path: Path) -> None:
    people = _people(60)
    everyone = {  # as in LFW, most people have two photos
        person: [
            Photo(Path(f"{person}/{j}.jpg"), f"{person}/{j}.jpg") for j in range(2 if i % 4 else 6)
        ]
        for i, person in enumerate(people)
    }
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(60)]
    split = households.split_people(
        people, strangers, seed=0, calibration=30, negatives=20, residents=6
    )
    cache = _frame_cache(tmp_path, everyone, strangers, 3)

    def bench(least: int) -> Any:
        return build_visit_bench(
            split,
            everyone,
            cache,
            cache,
            frames=3,
            keep=2,
            enrolment="doorbell",
            width=DIM,
            min_enrol=least,
        )

    everybody, enrolled_well = bench(1), bench(3)

    def members(visits: Any) -> int:
        return sum(len(set(h.enrol_labels.tolist())) for h in visits.houses)

    assert members(enrolled_well) < members(everybody)  # people with 2-3 photos are out...
    for house in enrolled_well.houses:
        if len(house.enrol_labels):
            assert np.bincount(house.enrol_labels).min() >= 3
    # ...but still ring at the other houses: the same houses, the same strangers' visits.
    assert len(enrolled_well.houses) == len(everybody.houses)
    for before, after in zip(everybody.houses, enrolled_well.houses, strict=True):
        assert np.array_equal(before.everyone.frames, after.everyone.frames)
    assert any(h.probes.count == 0 for h in enrolled_well.houses)  # a house of no members
    start = [np.eye(DIM, dtype=np.float32)]
    assert (
        evaluate_visits(enrolled_well, [start], 0.5).members
        < evaluate_visits(everybody, [start], 0.5).members
    )
    # The aggregator's pretend residents are enrolled as it enrols them, whatever the bar.
    assert len(enrolled_well.residents) == len(everybody.residents)


# --- dlib's last level as the trainable part (issue 20, item 3) -------------------------------


def _random_level(rng: np.random.Generator) -> list[np.ndarray]:
    """A last level of dlib's shapes with random values (dlib's own needs ../shared)."""
    return [
        (
            rng.normal(size=shape) / np.sqrt(shape[0])
            if len(shape) == 2
            else rng.normal(size=shape)
        ).astype(np.float32)
        for shape in last_level.SHAPES
    ]


def test_a_last_level_bench_starts_where_the_head_does_and_trains_the_level_through_rounds() -> (
    None
):
    rng = np.random.default_rng(5)
    people = _people(60)
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(120)]
    split = households.split_people(
        people, strangers, seed=0, calibration=60, negatives=60, residents=6
    )
    # Level inputs are activations (non-negative); the head reads what the level makes of them.
    inputs = {
        person: [np.maximum(f, 0.0) for f in faces]
        for person, faces in _synthetic_features(people, last_level.LEVEL_INPUTS, rng).items()
    }
    stranger_inputs = {
        k: np.maximum(rng.normal(size=last_level.LEVEL_INPUTS), 0.0).astype(np.float32)
        for k in strangers
    }
    level = _random_level(rng)

    def pooled(rows: list[np.ndarray]) -> list[np.ndarray]:
        return list(last_level.forward(np.asarray(rows, np.float32), level)[0])

    projection = (rng.normal(size=(FEATURES, 32)) / 16).astype(np.float32)
    head_bench = households.build_bench(
        split,
        {person: pooled(rows) for person, rows in inputs.items()},
        dict(zip(stranger_inputs, pooled(list(stranger_inputs.values())), strict=True)),
        [projection],
        seed=0,
    )
    start = [*level, projection]
    level_bench = households.build_bench(split, inputs, stranger_inputs, start, seed=0)
    assert level_bench.calibration.shape == (60, last_level.LEVEL_INPUTS)
    settings = openset.ArmSettings(
        rounds=2, houses_per_round=3, central_epochs=1, params=TrainParams(epochs=2)
    )
    head_start = openset.run_start(head_bench, settings)
    outcomes = openset.run_arms({0: level_bench}, settings, jobs=1)[0]
    level_start = outcomes["start"]
    # The same faces through the level in numpy or as pooled features: the same decisions.
    assert level_start.threshold == pytest.approx(head_start.threshold, abs=1e-5)
    assert level_start.result.tar_at_far_1pct == head_start.result.tar_at_far_1pct
    assert level_start.result.open_set_accuracy == head_start.result.open_set_accuracy
    # The rounds send all five tensors over the wire and move the level, not only the head.
    for name in ("federated", "secure"):
        received = outcomes[name].heads[0]
        assert len(received) == len(start)
        assert not np.allclose(received[0], level[0]), f"{name}: the level did not move"
        run = outcomes[name].rounds_run
        assert run is not None
        assert run.rejected == 0
        assert len(run.client_seconds) == settings.rounds * settings.houses_per_round
    secure = outcomes["secure"].rounds_run
    assert secure is not None
    # One norm per house per round, as the run trained it.
    assert sorted(secure.update_norms) == list(range(1, settings.rounds + 1))
    assert all(len(n) == settings.houses_per_round for n in secure.update_norms.values())
    assert all(norm > 0 for n in secure.update_norms.values() for norm in n)
    costs = openset_report.round_costs(outcomes["federated"])
    assert costs["update_bytes"] > 0
    assert costs["client_step_seconds_median"] > 0


def test_arms_in_worker_processes_score_what_one_process_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`run_arms` with two spawned workers (one BLAS thread each) gives the same rounds as
    in one process, and leaves this process's BLAS setting as it found it."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    rng = np.random.default_rng(2)
    people = _people(60)
    strangers = [f"lfw_strangers/s{i}/s{i}.jpg" for i in range(120)]
    split = households.split_people(
        people, strangers, seed=0, calibration=60, negatives=60, residents=8
    )
    features = _synthetic_features(people, 16, rng)
    stranger_features = {k: rng.normal(size=16).astype(np.float32) for k in strangers}
    bench = households.build_bench(
        split, features, stranger_features, [np.eye(16, dtype=np.float32)], seed=0
    )
    settings = openset.ArmSettings(
        rounds=2, houses_per_round=3, central_epochs=1, params=TrainParams(epochs=1)
    )
    arms = ("federated", "central")
    alone = openset.run_arms({0: bench}, settings, jobs=1, arms=arms)[0]
    pooled = openset.run_arms({0: bench}, settings, jobs=2, arms=arms)[0]
    for arm in arms:
        assert len(alone[arm].heads) == len(pooled[arm].heads) == 1
        for mine, theirs in zip(alone[arm].heads[0], pooled[arm].heads[0], strict=True):
            np.testing.assert_array_equal(mine, theirs)
        assert alone[arm].result == pooled[arm].result
    assert not np.allclose(alone["federated"].heads[0][0], np.eye(16))  # the rounds trained
    assert os.environ["OPENBLAS_NUM_THREADS"] == "3"
