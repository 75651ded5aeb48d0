"""Open-set recognition on never-seen people, under doorbell conditions (issue 11).

    python -m bench.openset [--conditions near|far|clean] [--enrol clean|doorbell]
                            [--visit-frames 8] [--rounds 60] [--seeds 0 1]
                            [--houses-per-round 20] [--test-dataset DIR]
                            [--client-optimizer adam|sgd] [--server-optimizer none|fedadam]
                            [--trainable head|last_level] [--client-learning-rate 1e-4]
                            [--client-epochs 10] [--arms start federated ...]

The headline is per visit, as the doorbell decides (issue 20, `bench.openset_visits`):
each probe and each stranger is a visit of `--visit-frames` frames of one scene
(`bench.openset_frames`), decided from its best `--keep` chips by the doorbell's
own `edge.chips.visit_embedding`, with the threshold calibrated on stranger visits,
against galleries enrolled from clean photos (`--enrol doorbell`: from camera
frames) by the members who have `--min-enrol` of them (as `edge enroll` asks;
the others only ring elsewhere, as strangers). `near` (the default, what the
default two-stream doorbell captures): faces cut from the full-resolution
stream at ring distance; `far` (formerly
`doorbell`): faces from a 640x480 frame. The per-frame figures below (frame 0
of each visit, galleries enrolled from frames) are the second row.

Households are built from real photographs. `lfw_dev`'s people are split into
two disjoint sets: training houses (3-6 people each, a few hundred houses; a
sample of them trains each round) and test houses, whose people no model has
seen. Each test house enrols up to 5 photos per member (always leaving one to
probe); the rest of its members' photos must be named right, and every photo
of the other test houses' people must come out "unknown". `lfw_strangers`
(one photo per person, nobody of lfw_dev) is split in two: the aggregator's
calibration folder, and strangers seen at the doorbells (the negatives of
the doorbells' training, a seeded sample per house).

Every photo goes through what a doorbell does: the whole photo is degraded
by `fedbell.faces.conditions.doorbell_conditions` (unless `--conditions clean`),
then BlazeFace finds the face and its eyes, `fedbell.faces.features.face_chip`
aligns it and the frozen backbone (dlib's ResNet on LiteRT) computes its
features. The backbone never changes, so features are cached under
`reports/cache/`, keyed by photo, conditions, seed and backbone hash.

Arms, on the same split and features:

- `start`: dlib's own projection, no training (version 0 of every lineage);
- `federated`: rounds of the doorbells' own client step
  (`edge.trainer.train_delta`), each update through the real wire path (the
  product's default codec, top-k with error feedback kept per doorbell,
  `build_update` → `parse_update`) and the aggregator's own server step
  (`make_accumulator` / `next_step`);
- `central`: the same `train_head` on the union of the training houses (the
  upper bound);
- `local_only`: each test house adapts the start head on its own enrolment
  photos (and its own strangers) alone, and keeps the start threshold.

`--trainable last_level` (issue 20, item 3): the doorbells train dlib's last
residual level with the head (`fedbell.faces.last_level`, 688,640 values). Every
photo then goes through the backbone cut before that level (the aggregator's
`backbone_models(until_last_level=True)`), which gives the level's 2,816 inputs per
chip, cached as float32 like the pooled features (under the cut backbone's hash,
~11 kB a chip, ~0.4 GB a seed under `far`); every arm starts from dlib's own level
and projection and runs the same functions, the five tensors named by
`model_names`. The start arm scores exactly what the head's does (the same network,
float rounding aside). Each federated arm's report row also has the client step's
median time, the update's and the downlink's bytes per doorbell and, in secure
rounds, the norm of a house's subset before the clip. Measured under `far` (seeds
0-3, visit TAR at 1 % FAR): start 0.956 as the head's, central 0.959 (head 0.965),
federated 0.927 (0.940), secure 0.925 (0.943), at a 62 kB update and a 445.6 kB int8
model; the head stays the default (docs/learning.md, "dlib's last level trained on
the doorbells").

Each arm's threshold is `calibrate_threshold` on the calibration strangers
under the same conditions, ringing at pretend houses of 5 of the held-out
people (150 dev people in no house, enrolled as test houses enrol: the
aggregator's `evaluation.dataset`), for 1 % false accepts per visit (the
aggregator's defaults). Prints a table and writes `reports/openset.json`.

Measured per visit (issue 20's headline; `make bench-openset`, `far` and
`near`, seeds 0 and 1, 60 rounds × 20 houses, visits of 8 frames decided from
their best 5 chips, members enrolled from 3-5 clean photos; TAR at 1 % FAR,
mean of the seeds): `far` start 0.955, federated 0.945, central 0.966; `near`
0.997 / 0.981 / 0.992; 0.990-0.996 of stranger visits rejected at every
shipped threshold. With faces given their pixels, visits decided from several
frames and people enrolled as the product asks, dlib's projection is near the
ceiling and the federated head does not add to it. Per frame (frame 0,
galleries enrolled from frames, every member), the older headline: TAR start
0.593, federated 0.630, central 0.684, where the frozen features bound every
head near 0.68-0.71 (docs/learning.md "What the learning buys" has both, and
what else was tried). A doorbell update is 3.7 kB (top-k 5 % with error
feedback, signed), the int8 global head 32.6 kB.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from aggregator.config import DEFAULT_SECURE_CLIP_NORM, Trainable
from aggregator.export import as_received
from bench import federated
from bench.arms import PRODUCT
from bench.data import CACHE, DATASETS, ROOT, scorer
from bench.households import (
    GALLERY_SIZE,
    TARGET_FAR,
    Bench,
    evaluate,
    house_trials,
    shipped_threshold,
)
from bench.openset_features import ENROL_PER_PERSON, backbone_model, start_model, time_doorbell
from bench.openset_report import ARMS, bar_verdict, print_table, report
from edge.enroll import MIN_CHIPS
from edge.recognition_config import RecognitionConfig
from edge.trainer import round_seed, train_delta
from fedbell.faces.embedding import TrainParams, model_names, train_head
from fedbell.faces.features import ENROL_MIRRORED
from fedbell.faces.openset import OpenSetResult, score_trials
from fedbell.wire.codecs import Weights

# --- arms ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArmSettings:
    rounds: int = 60
    houses_per_round: int = 20
    target_far: float = TARGET_FAR
    gallery_size: int = GALLERY_SIZE
    central_epochs: int = 20
    local_epochs: int | None = None
    """Epochs of local_only adaptation (default: the round plan's)."""
    params: TrainParams = field(default_factory=TrainParams)
    server_optimizer: Literal["none", "fedavgm", "fedadam"] = PRODUCT.server_optimizer
    """The aggregator's `rounds.server_optimizer` (its default: none)."""
    client_optimizer: Literal["adam", "sgd"] = TrainParams().optimizer
    """The doorbells' local step in the federated arms (`rounds.train.optimizer`); central
    and local_only keep `params`'s."""
    secure_density: float = PRODUCT.secure_density
    """The secure arm's shared subset (`rounds.secure_density`)."""
    secure_clip_norm: float = DEFAULT_SECURE_CLIP_NORM
    """The secure arm's clip on each doorbell (`rounds.secure_clip_norm`)."""


@dataclass
class ArmOutcome:
    name: str
    result: OpenSetResult
    threshold: float
    seconds: float
    rounds: list[federated.RoundResult] = field(default_factory=list)
    heads: tuple[Weights, ...] = ()
    """The model(s) scored: one for every house, or one per test house (local_only)."""
    rounds_run: federated.ArmResult | None = None
    """The federated arms' round loop: update bytes, client step times, norms."""


def run_start(bench: Bench, settings: ArmSettings) -> ArmOutcome:
    started = time.perf_counter()
    threshold = shipped_threshold(bench, bench.start, settings.target_far, settings.gallery_size)
    result = evaluate(bench, [bench.start], threshold)
    seconds = time.perf_counter() - started
    return ArmOutcome("start", result, threshold, seconds, heads=(bench.start,))


def run_federated(
    bench: Bench,
    settings: ArmSettings,
    seed: int,
    progress: Callable[[federated.RoundResult], None] | None = None,
    *,
    secure: bool = False,
) -> ArmOutcome:
    """Rounds of the product's client and server steps over the training houses.

    The loop is `bench.federated.run_arm`, the one every benchmark shares: the
    aggregator's device selection, its round checks and default clipping, the
    doorbell's `train_delta` with top-k error feedback, signed envelopes both
    ways (so byte counts are what a doorbell sends and receives; only the
    broker hop is left out), and the aggregator's `next_step`. `secure`: the
    product's default rounds instead, secure aggregation over the round's shared
    subset clipped at the product's secure_clip_norm, without noise (issue 22's bar
    for this arm is secure aggregation without DP).
    """
    started = time.perf_counter()
    name = "secure" if secure else "federated"
    arm = federated.Arm(
        name,
        server=settings.server_optimizer,
        secure=(
            federated.Secure(clip_norm=settings.secure_clip_norm, density=settings.secure_density)
            if secure
            else None
        ),
    )
    outcome = federated.run_arm(
        bench.train,
        bench.start,
        arm,
        settings.rounds,
        # The aggregator calibrates each version's threshold before it publishes it.
        scorer(bench, settings.target_far, settings.gallery_size),
        params=replace(settings.params, seed=seed, optimizer=settings.client_optimizer),
        houses_per_round=settings.houses_per_round,
        backbone=bench.backbone,
        progress=None if progress is None else lambda _arm, row: progress(row),
    )
    # Scored as the doorbells run it: the head decoded from the downlink codec.
    threshold = outcome.final.threshold
    received = as_received(model_names(outcome.weights), outcome.weights, arm.downlink_codec)
    result = evaluate(bench, [received], threshold)
    seconds = time.perf_counter() - started
    return ArmOutcome(
        name, result, threshold, seconds, outcome.rounds, heads=(received,), rounds_run=outcome
    )


def run_central(bench: Bench, settings: ArmSettings, seed: int) -> ArmOutcome:
    """The same trainer on the union of the training houses (people relabelled globally)."""
    started = time.perf_counter()
    rows, labels, offset = [], [], 0
    for house in bench.train:
        rows.append(house.features)
        labels.append(house.labels + offset)
        offset += int(house.labels.max()) + 1
    plan = settings.params
    params = replace(plan, epochs=settings.central_epochs, prox_mu=0.0, seed=seed)
    head = train_head(
        bench.start, np.concatenate(rows), np.concatenate(labels), bench.negatives, params
    ).head
    threshold = shipped_threshold(bench, head, settings.target_far, settings.gallery_size)
    result = evaluate(bench, [head], threshold)
    return ArmOutcome("central", result, threshold, time.perf_counter() - started, heads=(head,))


def run_local_only(bench: Bench, settings: ArmSettings, seed: int) -> ArmOutcome:
    """Each test house adapts the start head on its own enrolment photos and strangers."""
    started = time.perf_counter()
    plan = settings.params
    heads = []
    for index, house in enumerate(bench.test):
        params = replace(
            plan, epochs=settings.local_epochs or plan.epochs, seed=round_seed(f"test{index}", seed)
        )
        heads.append(
            train_delta(bench.start, house.enrol, house.enrol_labels, house.negatives, params)
        )
    trained = [
        [np.asarray(b + d, np.float32) for b, d in zip(bench.start, t.delta, strict=True)]
        for t in heads
    ]
    # No aggregator: the house keeps the threshold shipped with the start model.
    threshold = shipped_threshold(bench, bench.start, settings.target_far, settings.gallery_size)
    result = score_trials(house_trials(bench.test, trained), threshold)
    seconds = time.perf_counter() - started
    return ArmOutcome("local_only", result, threshold, seconds, heads=tuple(trained))


def run_arm(name: str, bench: Bench, settings: ArmSettings, seed: int) -> ArmOutcome:
    if name == "start":
        return run_start(bench, settings)
    if name in {"federated", "secure"}:
        progress = _print_round(seed, name)
        return run_federated(bench, settings, seed, progress, secure=name == "secure")
    if name == "central":
        return run_central(bench, settings, seed)
    if name == "local_only":
        return run_local_only(bench, settings, seed)
    raise ValueError(f"unknown arm {name!r}")


def _print_round(seed: int, arm: str) -> Callable[[federated.RoundResult], None]:
    def show(record: federated.RoundResult) -> None:
        if record.round % 5 == 0 or record.round == 1:
            print(
                f"  seed {seed}  {arm} round {record.round:>3}  "
                f"open-set {record.open_set_accuracy:.3f}"
                f"  TAR@1% {record.tar_at_far_1pct:.3f}  up {record.bytes_up} B",
                flush=True,
            )

    return show


# --- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_blas_thread_each() -> Iterator[None]:
    """Spawned arm workers get one BLAS thread each: one arm a core already fills the cores,
    and BLAS's own threads on top made the last level's rounds about 3 times slower
    (13-18 s a round against 5 s, two arms on two cores)."""
    saved = os.environ.get("OPENBLAS_NUM_THREADS")
    os.environ["OPENBLAS_NUM_THREADS"] = "1"  # read by each worker when it imports numpy
    try:
        yield
    finally:
        if saved is None:
            del os.environ["OPENBLAS_NUM_THREADS"]
        else:
            os.environ["OPENBLAS_NUM_THREADS"] = saved


def _run_arm_task(task: tuple[str, Bench, ArmSettings, int]) -> ArmOutcome:
    name, bench, settings, seed = task
    return run_arm(name, bench, settings, seed)


def run_arms(
    benches: dict[int, Bench], settings: ArmSettings, jobs: int, arms: Sequence[str] = ARMS
) -> dict[int, dict[str, ArmOutcome]]:
    """Every arm on every seed's bench, `jobs` processes at a time (federated first: longest)."""
    order = sorted(arms, key=lambda a: a not in {"federated", "secure"})
    tasks = [(arm, benches[s], settings, s) for s in benches for arm in order]
    if jobs <= 1:
        results = [_run_arm_task(t) for t in tasks]
    else:
        with (
            _one_blas_thread_each(),
            ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool,
        ):
            results = list(pool.map(_run_arm_task, tasks))
    outcomes: dict[int, dict[str, ArmOutcome]] = {s: {} for s in benches}
    for (arm, _, _, seed), outcome in zip(tasks, results, strict=True):
        outcomes[seed][arm] = outcome
    return outcomes


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DATASETS / "lfw_dev")
    parser.add_argument("--strangers", type=Path, default=DATASETS / "lfw_strangers")
    parser.add_argument("--test-dataset", type=Path, default=None)
    parser.add_argument(
        "--conditions",
        choices=("near", "far", "clean", "doorbell"),
        default="near",
        help="near: faces cut from the full-resolution stream at ring distance (the default "
        "doorbell's two streams); far: faces from a 640x480 frame (doorbell is its old name); "
        "clean: the photos themselves",
    )
    parser.add_argument(
        "--enrol",
        choices=("clean", "doorbell"),
        default="clean",
        help="galleries enrolled from clean photos (as the README enrols) or camera frames",
    )
    parser.add_argument(
        "--enrol-mirrored",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each enrolment photo also enrols its mirror image (default: as `edge enroll` "
        "enrols photos, fedbell.faces.features.ENROL_MIRRORED; off for --enrol doorbell, "
        "as camera enrolment does not mirror)",
    )
    parser.add_argument(
        "--min-enrol",
        type=int,
        default=MIN_CHIPS,
        help="enrolment photos with a face a test person needs to be a member of their house "
        "(default: the least `edge enroll` accepts without a warning); fewer, and the person "
        "only rings at the other houses, as a stranger. 1: every person with two photos (half "
        "of LFW's are enrolled from one photo)",
    )
    parser.add_argument(
        "--visit-frames",
        type=int,
        default=RecognitionConfig().decision_frames(),
        help="frames filmed per visit (default: what the default doorbell decides after)",
    )
    parser.add_argument(
        "--keep",
        type=int,
        default=RecognitionConfig().confirm_frames,
        help="best chips a visit is decided from (the doorbell's confirm_frames)",
    )
    parser.add_argument("--rounds", type=int, default=ArmSettings.rounds)
    parser.add_argument("--houses-per-round", type=int, default=ArmSettings.houses_per_round)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--calibration-strangers", type=int, default=1000)
    parser.add_argument("--negative-strangers", type=int, default=1500)
    parser.add_argument("--central-epochs", type=int, default=ArmSettings.central_epochs)
    parser.add_argument("--detector", choices=("blazeface", "haar"), default="blazeface")
    parser.add_argument(
        "--server-optimizer",
        choices=("none", "fedavgm", "fedadam"),
        default=PRODUCT.server_optimizer,
    )
    parser.add_argument(
        "--client-optimizer",
        choices=("adam", "sgd"),
        default=ArmSettings.client_optimizer,
        help="the doorbells' local step in the federated arms (sgd: with "
        "--server-optimizer fedadam, issue 20)",
    )
    parser.add_argument(
        "--adam-moments",
        choices=["fresh", "kept"],
        default=TrainParams.adam_moments,
        help="the doorbells' local Adam: fresh every round, or kept across their rounds "
        "(the round plan's `train.adam_moments`)",
    )
    parser.add_argument(
        "--secure-density",
        type=float,
        default=ArmSettings.secure_density,
        help="the secure arm's shared subset of the update (the aggregator's "
        "rounds.secure_density)",
    )
    parser.add_argument(
        "--secure-clip-norm",
        type=float,
        default=ArmSettings.secure_clip_norm,
        help="the L2 norm each doorbell clips its secure subset to (rounds.secure_clip_norm)",
    )
    parser.add_argument(
        "--trainable",
        choices=get_args(Trainable),
        default=PRODUCT.trainable,
        help="what the doorbells train: the head on pooled features, or dlib's last level "
        "and the head on the level's cached inputs (the backbone cut before it; issue 20)",
    )
    parser.add_argument(
        "--client-epochs",
        type=int,
        default=TrainParams().epochs,
        help="local epochs of every arm's training (the round plan's `train.epochs`)",
    )
    parser.add_argument(
        "--client-learning-rate",
        type=float,
        default=TrainParams().learning_rate,
        help="learning rate of every arm's training (the round plan's `train.learning_rate`)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="the arms to run (issue 11's bar is judged only with the federated arm)",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--report", type=Path, default=ROOT / "reports" / "openset.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.enrol_mirrored is None:  # as the product enrols
        args.enrol_mirrored = ENROL_MIRRORED and args.enrol == "clean"
    started = time.perf_counter()
    backbone = backbone_model(args.cache, args.trainable)
    head = start_model(args.trainable)
    # Visits are scored beside frames (issue 20); the module needs this one's names.
    from bench import openset_visits

    prepared, visit_benches = openset_visits.prepare_visits(args, backbone, head)
    for seed, figures in prepared.detection.items():
        print(f"seed {seed}: {figures}", flush=True)
    settings = ArmSettings(
        rounds=args.rounds,
        houses_per_round=args.houses_per_round,
        central_epochs=args.central_epochs,
        server_optimizer=args.server_optimizer,
        client_optimizer=args.client_optimizer,
        secure_density=args.secure_density,
        secure_clip_norm=args.secure_clip_norm,
        params=TrainParams(
            epochs=args.client_epochs,
            learning_rate=args.client_learning_rate,
            adam_moments=args.adam_moments,
        ),
    )
    outcomes = run_arms(prepared.benches, settings, args.jobs, args.arms)
    scored = openset_visits.score_visits(
        visit_benches, outcomes, head, settings.target_far, settings.gallery_size
    )
    timing_person = next(
        (ps for _, ps in sorted(prepared.everyone.items()) if len(ps) >= ENROL_PER_PERSON), []
    )
    enroll_ms, embed_ms, enroll_best, embed_best = time_doorbell(
        timing_person[:ENROL_PER_PERSON],
        backbone,
        head,
        conditions="clean" if args.conditions == "clean" else "doorbell",
        seed=args.seeds[0],
        detector=args.detector,
    )
    test_name = (
        args.test_dataset.name if args.test_dataset else f"{args.dataset.name} (held-out people)"
    )
    detection = prepared.detection.values()
    data = report(
        test_dataset=test_name,
        conditions=args.conditions,
        seeds=args.seeds,
        outcomes=outcomes,
        extra={
            "trainable": args.trainable,
            "model_values": int(sum(np.size(t) for t in head)),
            "enroll_ms": enroll_ms,
            "embed_ms": embed_ms,
            "enroll_ms_best": enroll_best,
            "embed_ms_best": embed_best,
            "detector": args.detector,
            "detection": {str(s): d for s, d in prepared.detection.items()},
            "detection_rate": float(np.mean([d["detection_rate"] for d in detection])),
            "skipped_no_face": int(sum(d["skipped_no_face"] for d in detection)),
            "backbone_sha256": hashlib.sha256(backbone).hexdigest(),
            "target_far": settings.target_far,
            "gallery_size": settings.gallery_size,
            "rounds_run": settings.rounds,
            "houses_per_round": settings.houses_per_round,
            "train_params": asdict(settings.params),
            "central_epochs": settings.central_epochs,
            "server_optimizer": settings.server_optimizer,
            "client_optimizer": settings.client_optimizer,
            "secure_density": settings.secure_density,
            "secure_clip_norm": settings.secure_clip_norm,
            "seconds": time.perf_counter() - started,
        },
    )
    ran = {a["name"]: a for a in data["arms"]}
    data["bar"] = bar_verdict(ran) if "federated" in ran else []
    openset_visits.add_visit_figures(data, scored, args.seeds, args.visit_frames, args.enrol)
    data["enrolment_mirrored"] = args.enrol_mirrored
    data["min_enrol_photos"] = args.min_enrol
    openset_visits.print_visit_table(data)
    print_table(
        data,
        f"Per frame (the second row): never-seen people ({test_name}), {args.conditions} "
        f"conditions, {args.rounds} rounds × {args.houses_per_round} houses, seeds {args.seeds}",
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(data, indent=2))
    print(f"wrote {args.report} in {data['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
