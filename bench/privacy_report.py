"""reports/privacy.json in issue 22's schema, the printed table, the bars and the plot."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.privacy_rows import RowResult
from bench.privacy_utility import UtilityResult

AGGREGATOR_MARGIN = 0.02
FLOAT32_BAR = 0.90
DP_MARGIN = 0.05
BAR_HOUSES_PER_ROUND = 100


def _epsilon(value: float | None) -> float | None:
    return None if value is None or math.isinf(value) else float(value)


def report(
    *,
    test_dataset: str,
    candidates: int,
    house_size: int,
    rows: Sequence[RowResult],
    runs: Sequence[UtilityResult],
    traffic: Sequence[tuple[int, int]],
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The issue's schema; each row and utility entry carries extra keys beside it."""
    return {
        "test_dataset": test_dataset,
        "candidates": candidates,
        "house_size": house_size,
        "chance": house_size / candidates,
        "rows": [
            {
                "view": row.view,
                "epsilon": _epsilon(row.epsilon),
                "residents_in_top": row.best[1],
                "attack": row.best[0],
                "chance": row.chance,
                "by_attack": row.by_attack,
                "stderr": row.stderr[row.best[0]],
                "detail": row.detail,
                "trials": row.trials,
                "candidates": row.candidates,
                **row.extra,
            }
            for row in rows
        ],
        "utility": [
            {
                "setting": run.setting,
                "epsilon": _epsilon(run.privacy.epsilon) if run.setting != "plain" else None,
                "houses_per_round": run.privacy.houses_per_round,
                "open_set_accuracy": run.open_set_accuracy,
                "tar_at_far_1pct": run.tar_at_far_1pct,
                "start_open_set_accuracy": run.start_open_set_accuracy,
                "target_epsilon": _epsilon(run.privacy.target_epsilon),
                "noise_multiplier": run.noise_multiplier,
                "rounds": run.privacy.rounds,
                "houses": run.privacy.houses,
                "update_bytes": run.bytes_up,
                "seconds": run.seconds,
            }
            for run in runs
        ],
        "bytes_up": int(np.mean([t[0] for t in traffic])) if traffic else 0,
        "bytes_down": int(np.mean([t[1] for t in traffic])) if traffic else 0,
        **extra,
    }


def _near(value: float | None, target: float) -> bool:
    """value (None: no noise) is the target epsilon (inf: no noise)."""
    if math.isinf(target):
        return value is None
    return value is not None and math.isclose(value, target, rel_tol=0.05)


def bar_lines(data: dict[str, Any], default_epsilon: float, rounds: int) -> list[str]:
    """Issue 22's attack bars, PASS or FAIL, one line each."""
    lines = []

    def check(ok: bool, text: str) -> None:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {text}")

    for row in (r for r in data["rows"] if r["view"] == "aggregator_view"):
        worst = max(row["by_attack"].values())
        check(
            worst <= row["chance"] + AGGREGATOR_MARGIN,
            f"aggregator_view: every attack <= chance + 2 points ({worst:.3f} vs chance "
            f"{row['chance']:.3f}; {row['by_attack']})",
        )
    for row in (r for r in data["rows"] if r["view"] == "float32_update"):
        check(
            row["residents_in_top"] >= FLOAT32_BAR,
            f"float32_update: the best attack finds >= 90 % ({row['residents_in_top']:.3f}, "
            f"{row['attack']}; chance {row['chance']:.3f})",
        )
    for view in ("round_sum", "published_heads"):
        chosen = [
            r
            for r in data["rows"]
            if r["view"] == view
            and r.get("houses_per_round") == BAR_HOUSES_PER_ROUND
            and _near(r["epsilon"], default_epsilon)
        ]
        if not chosen:
            check(False, f"{view}: no row at the default epsilon {default_epsilon}")
        for row in chosen:
            gap = row["residents_in_top"] - row["chance"]
            check(
                abs(gap) <= DP_MARGIN,
                f"{view} at epsilon {row['epsilon']:.2f}, {BAR_HOUSES_PER_ROUND} houses per "
                f"round{f', {rounds} rounds' if view == 'published_heads' else ''}: within 5 "
                f"points of chance ({row['residents_in_top']:.3f} ± {row['stderr']:.3f} vs "
                f"{row['chance']:.3f}, best of {len(row['by_attack'])} attacks)",
            )
    return lines


def print_table(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=160)
    table = Table(
        title=f"Re-identification ({data['test_dataset']}): houses of {data['house_size']}, "
        f"{data['candidates']} candidates (chance {data['chance']:.3f} for one house)"
    )
    for column in ("view", "detail", "epsilon", "best", "±", "attack", "chance", *data["attacks"]):
        table.add_column(column)
    for row in data["rows"]:
        table.add_row(
            row["view"],
            row["detail"],
            "-" if row["epsilon"] is None else f"{row['epsilon']:.2f}",
            f"{row['residents_in_top']:.3f}",
            f"{row['stderr']:.3f}",
            row["attack"],
            f"{row['chance']:.3f}",
            *(
                f"{row['by_attack'][a]:.3f}" if a in row["by_attack"] else "-"
                for a in data["attacks"]
            ),
        )
    console.print(table)
    utility = Table(title="Utility of the federated head on never-seen test houses")
    for column in (
        "setting",
        "houses/round",
        "rounds",
        "epsilon",
        "noise mult.",
        "open-set acc.",
        "TAR @ 1 % FAR",
        "seconds",
    ):
        utility.add_column(column)
    for run in data["utility"]:
        utility.add_row(
            run["setting"],
            str(run["houses_per_round"]),
            str(run["rounds"]),
            "-" if run["epsilon"] is None else f"{run['epsilon']:.2f}",
            f"{run['noise_multiplier']:.2f}",
            f"{run['open_set_accuracy']:.3f}",
            f"{run['tar_at_far_1pct']:.3f}",
            f"{run['seconds']:.0f}",
        )
    console.print(utility)
    console.print(
        f"a secure round of {data['secure_round_doorbells']} doorbells: "
        f"{data['bytes_up']} B up, {data['bytes_down']} B down per doorbell (keys, shares, "
        "masked input, unmask)"
    )
    for line in data["bars"]:
        console.print(line)


def plot(data: dict[str, Any], path: Path) -> None:
    """Epsilon against open-set accuracy (per houses per round) and against the attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [u["epsilon"] for u in data["utility"] if u["epsilon"] is not None]
    at_inf = 2 * max(finite) if finite else 16.0

    def x_of(epsilon: float | None) -> float:
        return at_inf if epsilon is None else epsilon

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for per_round in sorted({u["houses_per_round"] for u in data["utility"]}):
        points = sorted(
            (x_of(u["epsilon"]), u["open_set_accuracy"])
            for u in data["utility"]
            if u["houses_per_round"] == per_round and u["setting"] != "plain"
        )
        (line,) = left.plot(
            *zip(*points, strict=True), marker="o", label=f"{per_round} houses/round"
        )
        for u in data["utility"]:
            if u["houses_per_round"] == per_round and u["setting"] == "plain":
                left.axhline(
                    u["open_set_accuracy"], color=line.get_color(), linestyle=":", linewidth=1
                )
    starts = [u["start_open_set_accuracy"] for u in data["utility"]]
    if starts:
        left.axhline(float(np.mean(starts)), color="grey", linestyle="--", linewidth=1)
    left.set_title("dotted: plain (no secure aggregation); dashed: start", fontsize=9)
    left.set_xscale("log")
    left.set_xlabel("epsilon (rightmost: no noise)")
    left.set_ylabel("open-set accuracy")
    left.legend()
    for view in ("round_sum", "published_heads"):
        for per_round in sorted(
            {
                r.get("houses_per_round")
                for r in data["rows"]
                if r["view"] == view and r.get("houses_per_round")
            }
        ):
            chosen = [
                r
                for r in data["rows"]
                if r["view"] == view
                and r.get("houses_per_round") == per_round
                and "dense" not in r["detail"]
                and "plain" not in r["detail"]
            ]
            if not chosen:
                continue
            points = sorted(
                (x_of(r["epsilon"]), r["residents_in_top"] - r["chance"]) for r in chosen
            )
            right.plot(
                *zip(*points, strict=True), marker="o", label=f"{view}, {per_round} houses/round"
            )
    right.axhline(0.0, color="grey", linewidth=0.8)
    right.set_xscale("log")
    right.set_xlabel("epsilon (rightmost: no noise)")
    right.set_ylabel("best attack: residents in top - chance")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
