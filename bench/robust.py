"""Poisoned updates: plain FedAvg against the robust strategies, side by side.

    python -m bench.robust [--houses 10] [--rounds 40] [--seeds 0 1] [--jobs 2]
                           [--dataset DIR] [--people N]

`--houses` training houses of real photos (`bench.data`: LFW people under
doorbell conditions; test houses of people no model has seen) take part in
every round of THE round loop (`bench.federated.run_arm`: the doorbells'
`train_delta`, signed updates in the product's default codec, the
aggregator's checks, accumulator and server step, with its defaults: every
update clipped to norm 2, weighing at most 200 examples). Two of them are hostile:
one sends its delta scaled by -10, the other sign-flipped. Every arm starts
from the same head on the same split; the all-honest FedAvg run is the
reference the robust strategies must approach. Two more references leave
the two hostile houses out altogether (with plain FedAvg and with server
momentum): their data is lost to any rule that drops their updates, so these
show what a perfect detector could reach.

Each arm's score is the mean open-set accuracy (at the calibrated threshold)
of its last `--tail` rounds, averaged over the seeds (each seed its own
split); the per-seed scores are printed too. The arms run in parallel
processes. Top-k updates under the buffered rules: see issue 13 item 9 (the
aggregator refuses or handles the combination; an arm the configuration
refuses is reported as such, not run).
"""

from __future__ import annotations

import os

# One BLAS thread: the head's matrices are small, and OpenBLAS threads fighting for two
# shared cores made a round 15x slower (measured: 10 doorbells' train_delta 20.9 s vs 1.4 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import dataclasses
import json
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from bench.data import DatasetMissing, add_data_arguments, load_benches, scorer
from bench.federated import PRODUCT, Arm, Attack, RoundResult, round_settings, run_arm
from bench.households import Bench
from fedbell.faces.embedding import TrainParams

ATTACK: tuple[Attack, ...] = ("scale", "sign_flip")
BAR_POINTS = 3.0


def arms(clip_norm: float) -> list[Arm]:
    """The references first (all honest; attackers absent), then the attacked arms."""
    return [
        Arm("fedavg, all honest"),
        Arm("fedavg, attackers absent", left_out=len(ATTACK)),
        Arm(
            "fedavg + FedAvgM 0.8, attackers absent",
            left_out=len(ATTACK),
            server="fedavgm",
            server_momentum=0.8,
        ),
        Arm(f"fedavg (default: clipped at {PRODUCT.clip_norm:g})", attackers=ATTACK),
        Arm(
            f"clipped fedavg (norm {clip_norm:g})",
            strategy="clipped",
            clip_norm=clip_norm,
            attackers=ATTACK,
        ),
        Arm("coordinate median", strategy="median", attackers=ATTACK),
        Arm("trimmed mean (20 %)", strategy="trimmed_mean", trim_fraction=0.2, attackers=ATTACK),
        Arm("multi-krum (f = 2)", strategy="multi_krum", attackers=ATTACK),
        # Server momentum makes up most of what losing two doorbells' data costs
        # (see the references).
        Arm(
            "multi-krum (f = 2) + FedAvgM 0.8",
            strategy="multi_krum",
            attackers=ATTACK,
            server="fedavgm",
            server_momentum=0.8,
        ),
    ]


ROBUST_FROM = 4
"""Index of the first robust strategy in `arms()`."""


def runnable(arm: Arm, houses: int) -> Arm:
    """The arm as the aggregator's configuration accepts it: a codec the configuration
    refuses with the arm's strategy (issue 13 item 9) is replaced by float32, and the
    arm's name says so."""
    try:
        round_settings(arm, houses)
    except ValidationError:
        return dataclasses.replace(
            arm, name=f"{arm.name} (float32: config refuses {arm.codec})", codec="float32"
        )
    return arm


@dataclass(frozen=True)
class Task:
    bench: Bench
    """The seed's houses (features loaded once in the parent: workers need no TensorFlow)."""
    seed: int
    houses: int
    epochs: int
    rounds: int
    arm: Arm


def run_task(task: Task) -> list[float]:
    """One arm on one seed, in a worker process: its open-set accuracy after each round."""
    bench, seed = task.bench, task.seed

    def progress(arm: Arm, r: RoundResult) -> None:
        if r.round % 5 == 0 or r.round == task.rounds:
            print(
                f"  seed {seed}  {arm.name:<40} round {r.round:>3}  "
                f"open-set {r.open_set_accuracy:.3f}",
                flush=True,
            )

    result = run_arm(
        bench.train[: task.houses],
        bench.start,
        task.arm,
        task.rounds,
        scorer(bench),
        params=TrainParams(epochs=task.epochs),
        progress=progress,
    )
    return [r.open_set_accuracy for r in result.rounds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    add_data_arguments(parser)
    parser.add_argument("--houses", type=int, default=10, help="training houses, all every round")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=TrainParams.epochs)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tail", type=int, default=5, help="rounds averaged into the score")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--report", type=Path, default=Path("reports/robust.json"))
    args = parser.parse_args(argv)
    if not 1 <= args.tail <= args.rounds:
        parser.error(f"--tail {args.tail} must be between 1 and --rounds {args.rounds}")
    console = Console(width=150)
    try:
        loaded = load_benches(args, args.seeds)
    except DatasetMissing as err:
        console.print(f"[bold]bench-robust skipped[/]: {err}")
        return 0
    name = "; ".join(loaded[seed].description for seed in args.seeds)
    console.print(
        f"{name}: {args.houses} training houses every round, {args.rounds} rounds, "
        f"seeds {args.seeds}, attackers: house0 x-10, house1 sign-flip; "
        f"{args.jobs} arms at a time"
    )
    all_arms = [runnable(arm, args.houses) for arm in arms(args.clip_norm)]
    tasks = [
        Task(loaded[seed].bench, seed, args.houses, args.epochs, args.rounds, arm)
        for arm in all_arms
        for seed in args.seeds
    ]
    if args.jobs <= 1:
        curves = [run_task(task) for task in tasks]
    else:
        with ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            curves = list(pool.map(run_task, tasks))
    per_arm: dict[str, list[list[float]]] = {}
    for task, curve in zip(tasks, curves, strict=True):
        per_arm.setdefault(task.arm.name, []).append(curve)
    scores = {
        arm: [float(np.mean(curve[-args.tail :])) for curve in runs]
        for arm, runs in per_arm.items()
    }
    means = {arm: float(np.mean(s)) for arm, s in scores.items()}
    honest = means[all_arms[0].name]

    table = Table(
        title=f"Open-set accuracy of never-seen people (mean of the last {args.tail} rounds) "
        f"with 2 of {args.houses} doorbells poisoned"
    )
    for column in (
        "strategy",
        *(f"seed {s}" for s in args.seeds),
        "mean",
        "vs all-honest (points)",
    ):
        table.add_column(column)
    for arm in all_arms:
        table.add_row(
            arm.name,
            *(f"{s:.3f}" for s in scores[arm.name]),
            f"{means[arm.name]:.3f}",
            f"{100 * (means[arm.name] - honest):+.1f}",
        )
    console.print(table)
    for absent in (arm for arm in all_arms if arm.left_out):
        console.print(
            f"{absent.name}: {means[absent.name]:.3f}, "
            f"{100 * (honest - means[absent.name]):.1f} points below all-honest"
        )
    best = max(all_arms[ROBUST_FROM:], key=lambda a: means[a.name])
    gap = 100 * (honest - means[best.name])
    console.print(
        f"best robust strategy: {best.name}, {gap:.1f} points below all-honest "
        f"({'within' if gap <= BAR_POINTS else 'NOT within'} {BAR_POINTS:g} points)"
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        json.dumps(
            {
                "dataset": name,
                "houses": args.houses,
                "rounds": args.rounds,
                "seeds": args.seeds,
                "tail": args.tail,
                "arms": [
                    {
                        "name": arm.name,
                        "scores": scores[arm.name],
                        "mean": means[arm.name],
                        "codec": arm.codec,
                        "open_set_accuracy": per_arm[arm.name],
                    }
                    for arm in all_arms
                ],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
