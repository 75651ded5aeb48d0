"""Poisoned updates: plain FedAvg against the robust strategies, side by side.

    python -m bench.robust [--dataset DIR] [--rounds 40] [--seeds 0 1] [--jobs 2]

Two of the nodes are hostile: one sends its delta scaled by -10, the other
sign-flipped. Every arm starts from the same model on the same split; the
all-honest FedAvg run is the reference the robust strategies must approach.
Two more references leave the two hostile nodes out altogether (with plain
FedAvg and with server momentum): their data is lost to any rule that drops
their updates, so these show what a perfect detector could reach.

One run on 120 held-out faces moves by a few points from round to round and
from seed to seed (one face is 0.83 points), so each arm's score is the mean
accuracy of its last `--tail` rounds, averaged over the seeds; the per-seed
scores are printed too. The arms run in parallel processes, one TensorFlow
thread each.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.data import load_federation
from bench.federated import Arm, Attack, RoundResult, run_arm
from fedbell.model import TrainParams, limit_threads

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
        Arm("fedavg", attackers=ATTACK),
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


@dataclass(frozen=True)
class Task:
    dataset: Path | None
    nodes: int
    alpha: float
    epochs: int
    rounds: int
    seed: int
    arm: Arm
    threads: int


def run_task(task: Task) -> list[float]:
    """One arm on one seed, in a worker process: its accuracy after each round."""
    limit_threads(task.threads)
    fed, _ = load_federation(
        task.dataset, task.nodes, task.alpha, task.seed, TrainParams(epochs=task.epochs)
    )

    def progress(arm: Arm, r: RoundResult) -> None:
        if r.round % 5 == 0 or r.round == task.rounds:
            print(
                f"  seed {task.seed}  {arm.name:<34} round {r.round:>3}  accuracy {r.accuracy:.3f}",
                flush=True,
            )

    return [r.accuracy for r in run_arm(fed, task.arm, task.rounds, progress).rounds]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tail", type=int, default=5, help="rounds averaged into the score")
    # About the L2 norm of an honest update in the first rounds (5 local epochs).
    parser.add_argument("--clip-norm", type=float, default=2.0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--report", type=Path, default=Path("reports/robust.json"))
    args = parser.parse_args()
    if not 1 <= args.tail <= args.rounds:
        parser.error(f"--tail {args.tail} must be between 1 and --rounds {args.rounds}")
    console = Console(width=150)
    _, name = load_federation(args.dataset, args.nodes, args.alpha, 0, TrainParams())
    console.print(
        f"dataset {name}: {args.nodes} nodes, alpha {args.alpha}, {args.rounds} rounds, "
        f"seeds {args.seeds}, attackers: node0 x-10, node1 sign-flip; "
        f"{args.jobs} arms at a time"
    )
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    all_arms = arms(args.clip_norm)
    tasks = [
        Task(
            args.dataset,
            args.nodes,
            args.alpha,
            args.epochs,
            args.rounds,
            seed,
            arm,
            threads,
        )
        for arm in all_arms
        for seed in args.seeds
    ]
    # spawn, not fork: TensorFlow in the parent must not be inherited half-started.
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
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
        title=f"Held-out accuracy (mean of the last {args.tail} rounds) with 2 of "
        f"{args.nodes} nodes poisoned"
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
                "nodes": args.nodes,
                "alpha": args.alpha,
                "rounds": args.rounds,
                "seeds": args.seeds,
                "tail": args.tail,
                "arms": [
                    {
                        "name": arm.name,
                        "scores": scores[arm.name],
                        "mean": means[arm.name],
                        "accuracy": per_arm[arm.name],
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
