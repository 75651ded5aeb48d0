"""Open-set recognition scored as the doorbell decides it: per visit (issue 20).

`bench.openset` scores one frame per probe. A doorbell decides per visit: the
track's best `confirm_frames` chips, averaged (`edge.chips.visit_embedding`,
the function `edge.pipeline.Track` decides with). Here every member probe and
every stranger is a visit of `frames` frames (`bench.openset_frames`), the
threshold is calibrated on stranger visits (the calibration folder filmed
as visits, at pretend houses of the held-out residents), and galleries are
enrolled from clean photos (as the README enrols: `python -m edge enroll
--from-folder`) or, with `enrolment="doorbell"`, from camera frames.

The training side (houses, negatives, the federated rounds) is the
frame-level bench of `bench.openset`, built from frame 0 of each photo.
"""

from __future__ import annotations

import argparse
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from bench.data import Prepared, detected, photos_and_splits
from bench.households import Bench, Split, build_bench
from bench.openset import ArmOutcome
from bench.openset_features import ENROL_PER_PERSON, Photo
from bench.openset_frames import FrameCache, VisitConditions, extract_frames, frame_key
from edge.chips import visit_embedding
from edge.enroll import MIN_CHIPS
from fedbell.faces.calibration import calibrate_threshold
from fedbell.faces.embedding import Features, embed, feature_width
from fedbell.faces.openset import OpenSetResult, prototype, score_trials, trial
from fedbell.wire.codecs import Weights

Enrolment = Literal["clean", "doorbell"]


def wanted_frames(
    split: Split,
    everyone: dict[str, list[Photo]],
    strangers: dict[str, Photo],
    frames: int,
) -> list[tuple[Photo, int]]:
    """(photo, frames to film) for a split: visits of `frames` frames for test
    people and calibration strangers, one frame (the training set) for the rest."""
    wanted: list[tuple[Photo, int]] = []
    test = [p for house in split.test_houses for p in house]
    for person in test:
        wanted += [(photo, frames) for photo in everyone[person]]
    wanted += [(strangers[key], frames) for key in split.calibration]
    train = [p for house in split.train_houses for p in house] + list(split.residents)
    for person in train:
        wanted += [(photo, 1) for photo in everyone[person]]
    wanted += [(strangers[key], 1) for key in split.negatives]
    return wanted


def enrolment_photos(split: Split, everyone: dict[str, list[Photo]]) -> list[tuple[Photo, int]]:
    """The photos a gallery may enrol from (test people and residents), one frame each."""
    people = [p for house in split.test_houses for p in house] + list(split.residents)
    return [(photo, 1) for person in people for photo in everyone[person]]


# --- visits as features ----------------------------------------------------------------------


@dataclass(frozen=True)
class Visits:
    """Frames of many visits: features, the visit each frame belongs to, its chip quality."""

    frames: Features
    visit: npt.NDArray[np.int64]
    quality: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]
    """One per visit: the member's label in its house (-1 for a stranger)."""

    @property
    def count(self) -> int:
        return len(self.labels)


def make_visits(
    cache: FrameCache, keys: Sequence[str], labels: Sequence[int], frames: int, width: int
) -> Visits:
    """The visits of photo `keys` (those with a face in at least one frame)."""
    rows: list[npt.NDArray[np.float32]] = []
    visit: list[int] = []
    quality: list[float] = []
    kept: list[int] = []
    for key, label in zip(keys, labels, strict=True):
        found = cache.frames(key, frames)
        if not found:
            continue
        for features, q in found:
            rows.append(features)
            visit.append(len(kept))
            quality.append(q)
        kept.append(label)
    return Visits(
        np.asarray(rows, np.float32).reshape(-1, width),
        np.asarray(visit, np.int64),
        np.asarray(quality, np.float32),
        np.asarray(kept, np.int64),
    )


def visit_embeddings(visits: Visits, head: Weights, keep: int) -> npt.NDArray[np.float32]:
    """(visits, D): what each visit says under `head`, decided as the doorbell decides."""
    embedded = embed(visits.frames, head)
    out = np.zeros((visits.count, embedded.shape[1]), np.float32)
    starts = np.searchsorted(visits.visit, np.arange(visits.count + 1))
    for index in range(visits.count):
        rows = slice(int(starts[index]), int(starts[index + 1]))
        out[index] = visit_embedding(embedded[rows], visits.quality[rows].tolist(), keep)
    return out


@dataclass(frozen=True)
class VisitHouse:
    """A test house: its gallery's enrolment features, its members' probe visits, and
    every visit of its people, enrolled or not (what the other houses see as strangers)."""

    enrol: Features
    enrol_labels: npt.NDArray[np.int64]
    probes: Visits
    everyone: Visits


@dataclass(frozen=True)
class VisitBench:
    houses: tuple[VisitHouse, ...]
    calibration: Visits
    residents: tuple[Features, ...]
    frames: int
    keep: int
    enrolment: Enrolment


def build_visit_bench(
    split: Split,
    everyone: dict[str, list[Photo]],
    doorbell: FrameCache,
    enrol_cache: FrameCache,
    *,
    frames: int,
    keep: int,
    enrolment: Enrolment,
    width: int,
    mirrored: FrameCache | None = None,
    min_enrol: int = MIN_CHIPS,
) -> VisitBench:
    """Test houses as visits. Each member enrols from up to ENROL_PER_PERSON of their first
    photos (one always left to probe); the rest are probe visits. A member needs
    `min_enrol` enrolment photos with a face (`edge enroll` warns below MIN_CHIPS) and a
    probe visit with a face. A person with an enrolment face and a probe visit but fewer
    photos than that is enrolled nowhere: their visits only ring at the other houses, as
    a stranger's (a house left without members stays, with an empty gallery, so the
    strangers and the houses' order do not depend on `min_enrol`). With `mirrored`, each
    enrolment photo also gives its mirrored chip (the photo flipped before detection)."""

    def enrolled(photos: Sequence[Photo]) -> list[npt.NDArray[np.float32]]:
        faces = [f for p in photos for f, _ in enrol_cache.frames(p.key, 1)]
        if mirrored is not None and faces:
            faces += [f for p in photos for f, _ in mirrored.frames(p.key, 1)]
        return faces

    def enrolled_faces(photos: Sequence[Photo]) -> int:
        return sum(bool(enrol_cache.frames(p.key, 1)) for p in photos)

    houses = []
    for people in split.test_houses:
        enrol: list[npt.NDArray[np.float32]] = []
        enrol_labels: list[int] = []
        probe_keys: list[str] = []
        probe_labels: list[int] = []
        visitor_keys: list[str] = []
        label = 0
        for person in people:
            photos = everyone[person]
            if len(photos) < 2:
                continue
            cut = min(ENROL_PER_PERSON, len(photos) - 1)
            faces = enrolled(photos[:cut])
            probes = [p.key for p in photos[cut:] if doorbell.frames(p.key, frames)]
            if not faces or not probes:
                continue
            visitor_keys += [p.key for p in photos]
            if enrolled_faces(photos[:cut]) < min_enrol:
                continue
            enrol += faces
            enrol_labels += [label] * len(faces)
            probe_keys += probes
            probe_labels += [label] * len(probes)
            label += 1
        if visitor_keys:
            houses.append(
                VisitHouse(
                    np.asarray(enrol, np.float32).reshape(-1, width),
                    np.asarray(enrol_labels, np.int64),
                    make_visits(doorbell, probe_keys, probe_labels, frames, width),
                    make_visits(doorbell, visitor_keys, [-1] * len(visitor_keys), frames, width),
                )
            )
    if len(houses) < 2:
        raise ValueError(f"{len(houses)} test houses with visits: too few")
    calibration = make_visits(
        doorbell, list(split.calibration), [-1] * len(split.calibration), frames, width
    )
    residents = []
    for person in split.residents:
        photos = everyone[person]
        if len(photos) < 2:
            continue
        cut = min(ENROL_PER_PERSON, len(photos) - 1)
        faces = enrolled(photos[:cut])  # as the aggregator enrols them (`enrol_held_out`)
        if faces:
            residents.append(np.asarray(faces, np.float32))
    return VisitBench(tuple(houses), calibration, tuple(residents), frames, keep, enrolment)


# --- scoring ---------------------------------------------------------------------------------


def visit_threshold(
    bench: VisitBench, head: Weights, target_far: float, gallery_size: int
) -> float:
    """The threshold that lets `target_far` of the calibration strangers' visits in, at
    pretend houses of the residents (enrolled as the aggregator enrols them: every one
    with an enrolment face, `fedbell.faces.openset.enrol_held_out`)."""
    residents = None
    if len(bench.residents) >= gallery_size:
        residents = np.stack([prototype(embed(faces, head)) for faces in bench.residents])
    strangers = visit_embeddings(bench.calibration, head, bench.keep)
    return calibrate_threshold(strangers, target_far, gallery_size, residents=residents)


def evaluate_visits(bench: VisitBench, heads: Sequence[Weights], threshold: float) -> OpenSetResult:
    """Every house's member visits named (or not) at `threshold`; every other house's
    people's visits must come out unknown. One head for all, or one per house (a house
    without members is no gallery, only its people's visits ring elsewhere)."""
    shared = len(heads) == 1
    pooled = (
        [visit_embeddings(h.everyone, heads[0], bench.keep) for h in bench.houses]
        if shared
        else None
    )
    trials = []
    for index, house in enumerate(bench.houses):
        if house.probes.count == 0:
            continue
        head = heads[0] if shared else heads[index]
        enrolled = embed(house.enrol, head)
        prototypes = np.stack(
            [
                prototype(enrolled[house.enrol_labels == p])
                for p in range(int(house.enrol_labels.max()) + 1)
            ]
        )
        others = [j for j in range(len(bench.houses)) if j != index]
        if pooled is not None:
            strangers = np.concatenate([pooled[j] for j in others])
        else:
            strangers = np.concatenate(
                [visit_embeddings(bench.houses[j].everyone, head, bench.keep) for j in others]
            )
        probes = visit_embeddings(house.probes, head, bench.keep)
        trials.append(trial(prototypes, probes, house.probes.labels, strangers))
    return score_trials(trials, threshold)


# --- the run ---------------------------------------------------------------------------------


def prepare_visits(
    args: argparse.Namespace, backbone: bytes, head: Weights
) -> tuple[Prepared, dict[int, VisitBench]]:
    """`bench.data.prepare` for a visit run: each seed's frame-level bench (frame 0 of
    every photo: training houses, negatives and the frame-level row) and its visit bench."""
    conditions: VisitConditions = "far" if args.conditions == "doorbell" else args.conditions
    frames = 1 if conditions == "clean" else args.visit_frames
    sha = hashlib.sha256(backbone).hexdigest()
    run_photos, splits = photos_and_splits(args)
    everyone, strangers = run_photos.everyone, run_photos.strangers
    width = feature_width(head)
    benches: dict[int, Bench] = {}
    visit_benches: dict[int, VisitBench] = {}
    detection: dict[int, dict[str, Any]] = {}
    for seed, split in splits.items():
        film = {"backbone": backbone, "seed": seed, "detector": args.detector, "jobs": args.jobs}
        doorbell = FrameCache.open(args.cache, conditions, seed, sha)
        wanted = wanted_frames(split, everyone, strangers, frames)
        extract_frames(wanted, doorbell, conditions=conditions, **film)
        enrol_cache, mirrored = doorbell, None
        enrolment = enrolment_photos(split, everyone)
        if args.enrol == "clean":
            enrol_cache = FrameCache.open(args.cache, "clean", seed, sha)
            extract_frames(enrolment, enrol_cache, conditions="clean", **film)
        if args.enrol_mirrored:
            source: VisitConditions = "clean" if args.enrol == "clean" else conditions
            mirrored = FrameCache.open(args.cache, source, seed, sha, mirrored=True)
            extract_frames(enrolment, mirrored, conditions=source, mirrored=True, **film)
        photos = [photo for photo, _ in wanted]
        first = {p.key: doorbell.frames(p.key, 1) for p in photos}
        per_person = {
            person: [first[p.key][0][0] for p in everyone[person] if first[p.key]]
            for person in split.people()
        }
        stranger_features = {
            k: first[k][0][0] for k in split.calibration + split.negatives if first[k]
        }
        bench = build_bench(split, per_person, stranger_features, head, seed=seed)
        benches[seed] = replace(bench, backbone=sha)
        visit_benches[seed] = build_visit_bench(
            split,
            everyone,
            doorbell,
            enrol_cache,
            frames=frames,
            keep=args.keep,
            enrolment=args.enrol,
            width=width,
            mirrored=mirrored,
            min_enrol=args.min_enrol,
        )
        flags = np.asarray([doorbell.flags[frame_key(p.key, 0)] for p in photos])
        visits = visit_benches[seed]
        members = [h for h in visits.houses if h.probes.count]
        detection[seed] = {
            **detected(flags),
            "train_houses": len(bench.train),
            "test_houses": len(bench.test),
            "member_probes": int(sum(len(h.probes) for h in bench.test)),
            "visit_houses": len(members),
            "members": int(sum(int(h.enrol_labels.max()) + 1 for h in members)),
            "member_visits": int(sum(h.probes.count for h in visits.houses)),
            "calibration_visits": visits.calibration.count,
            "mean_frames_with_a_face": float(
                np.mean([len(h.probes.visit) / h.probes.count for h in members])
            ),
        }
    return Prepared(everyone, benches, detection), visit_benches


def score_visits(
    visit_benches: dict[int, VisitBench],
    outcomes: dict[int, dict[str, ArmOutcome]],
    start: Weights,
    target_far: float,
    gallery_size: int,
) -> dict[int, dict[str, tuple[OpenSetResult, float]]]:
    """(visit result, visit threshold) per seed and arm, with each arm's trained head(s).
    local_only keeps the start model's threshold, as it does frame by frame."""
    scored: dict[int, dict[str, tuple[OpenSetResult, float]]] = {}
    for seed, arms in outcomes.items():
        bench = visit_benches[seed]
        scored[seed] = {}
        for name, outcome in arms.items():
            shipped = start if name == "local_only" else outcome.heads[0]
            threshold = visit_threshold(bench, shipped, target_far, gallery_size)
            scored[seed][name] = (evaluate_visits(bench, outcome.heads, threshold), threshold)
    return scored


def add_visit_figures(
    data: dict[str, Any],
    scored: dict[int, dict[str, tuple[OpenSetResult, float]]],
    seeds: Sequence[int],
    frames: int,
    enrolment: Enrolment,
) -> None:
    """The visit figures in `bench.openset`'s report: per arm (mean of the seeds, and per
    seed), and `visit_frames` and `enrolment` at the top."""
    data["visit_frames"] = frames
    data["enrolment"] = enrolment
    for arm in data["arms"]:
        per_seed = [scored[s][arm["name"]] for s in seeds if arm["name"] in scored[s]]
        arm["visit_open_set_accuracy"] = float(np.mean([r.open_set_accuracy for r, _ in per_seed]))
        arm["visit_tar_at_far_1pct"] = float(np.mean([r.tar_at_far_1pct for r, _ in per_seed]))
        arm["visit_unknown_rejected"] = float(np.mean([r.unknown_rejected for r, _ in per_seed]))
        arm["visit_rank1"] = float(np.mean([r.rank1 for r, _ in per_seed]))
        arm["visit_threshold"] = float(np.mean([t for _, t in per_seed]))
        for row, (result, threshold) in zip(arm["per_seed"], per_seed, strict=True):
            row["visit_open_set_accuracy"] = result.open_set_accuracy
            row["visit_tar_at_far_1pct"] = result.tar_at_far_1pct
            row["visit_unknown_rejected"] = result.unknown_rejected
            row["visit_threshold"] = threshold
            row["member_visits"] = result.members
            row["stranger_visits"] = result.strangers


def print_visit_table(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Per visit (as the doorbell decides): {data['conditions']} conditions, "
        f"{data['visit_frames']} frames a visit, members enrolled from "
        f"{data['min_enrol_photos']}-5 {data['enrolment']} photos, seeds {data['seeds']}"
    )
    columns = ("open-set acc.", "rank-1", "TAR @ 1 % FAR", "unknown rejected", "threshold")
    for column in ("arm", *columns):
        table.add_column(column)
    keys = ("open_set_accuracy", "rank1", "tar_at_far_1pct", "unknown_rejected", "threshold")
    for arm in data["arms"]:
        table.add_row(arm["name"], *(f"{arm['visit_' + k]:.3f}" for k in keys))
    Console(width=140).print(table)
