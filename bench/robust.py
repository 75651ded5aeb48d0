"""Poisoned updates: plain FedAvg against the robust strategies, side by side.

    python -m bench.robust [--dataset DIR] [--rounds 30] [--nodes 10] [--alpha 0.5]

Two of the nodes are hostile: one sends its delta scaled by -10, the other
sign-flipped. Every arm starts from the same model on the same split; the
all-honest FedAvg run is the reference the robust strategies must approach.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.data import load_federation
from bench.federated import Arm, Attack, RoundResult, run_arm
from fedbell.model import TrainParams, limit_threads

ATTACK: tuple[Attack, ...] = ("scale", "sign_flip")


def arms(clip_norm: float) -> list[Arm]:
    return [
        Arm("fedavg, all honest"),
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
        Arm(
            "multi-krum (f = 2) + FedAvgM 0.8",
            strategy="multi_krum",
            attackers=ATTACK,
            server="fedavgm",
            server_momentum=0.8,
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    # About the L2 norm of an honest update in the first rounds (5 local epochs).
    parser.add_argument("--clip-norm", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, default=Path("reports/robust.json"))
    args = parser.parse_args()
    limit_threads(2)
    console = Console(width=150)
    fed, name = load_federation(
        args.dataset, args.nodes, args.alpha, args.seed, TrainParams(epochs=args.epochs)
    )
    console.print(
        f"dataset {name}: {args.nodes} nodes, alpha {args.alpha}, "
        f"{args.rounds} rounds, attackers: node0 x-10, node1 sign-flip"
    )

    def progress(arm: Arm, r: RoundResult) -> None:
        console.print(
            f"  {arm.name:<32} round {r.round:>3}  accuracy {r.accuracy:.3f}", highlight=False
        )

    results = [run_arm(fed, arm, args.rounds, progress) for arm in arms(args.clip_norm)]
    honest = results[0].final_accuracy
    table = Table(title="Final held-out accuracy with 2 of the nodes poisoned")
    for column in ("strategy", "final accuracy", "vs all-honest (points)"):
        table.add_column(column)
    for result in results:
        table.add_row(
            result.arm.name,
            f"{result.final_accuracy:.3f}",
            f"{100 * (result.final_accuracy - honest):+.1f}",
        )
    console.print(table)
    best = max(results[2:], key=lambda r: r.final_accuracy)
    gap = 100 * (honest - best.final_accuracy)
    console.print(
        f"best robust strategy: {best.arm.name}, {gap:.1f} points below all-honest "
        f"({'within' if gap <= 3 else 'NOT within'} 3 points)"
    )
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(
        json.dumps(
            {
                "dataset": name,
                "nodes": args.nodes,
                "alpha": args.alpha,
                "rounds": args.rounds,
                "arms": [
                    {
                        "name": r.arm.name,
                        "final_accuracy": r.final_accuracy,
                        "accuracy": [x.accuracy for x in r.rounds],
                    }
                    for r in results
                ],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
