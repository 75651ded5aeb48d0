"""What a run produced: the table per round, the JSON report and the plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedbell.wire.protocol import RoundMetrics
from simulation.seeds import SeedResult, verdict


@dataclass(frozen=True)
class RoundRow:
    round: int
    accuracy: float | None
    bytes_up: int
    bytes_down: int
    seconds: float
    participants: int
    examples: int

    @classmethod
    def from_metrics(cls, metrics: RoundMetrics) -> RoundRow:
        return cls(
            metrics.round,
            metrics.accuracy,
            metrics.bytes_up,
            metrics.bytes_down,
            round(metrics.seconds, 2),
            metrics.participants,
            metrics.examples,
        )


def human_bytes(count: float) -> str:
    for unit in ("B", "kB", "MB"):
        if count < 1000:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.2f} GB"


def percent(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"


def build_report(
    *,
    dataset: str,
    houses: Sequence[int],
    held_out_persons: int,
    codec: str,
    epochs: int,
    rows: Sequence[RoundRow],
    start: float | None,
    centralized: float | None,
    head_params: int,
    seconds: float,
    seeds: Sequence[SeedResult] = (),
    live: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's JSON: accuracies are open-set (held-out people named right at the
    published threshold, strangers rejected, weighted equally)."""
    return {
        "dataset": dataset,
        "houses": list(houses),
        "nodes": len(houses),
        "held_out_persons": held_out_persons,
        "codec": codec,
        "local_epochs": epochs,
        "head_params": head_params,
        "rounds": [asdict(row) for row in rows],
        "start_accuracy": start,
        "final_accuracy": rows[-1].accuracy if rows else None,
        "centralized_accuracy": centralized,
        "centralized_epochs": epochs * len(rows),
        "total_bytes_up": sum(row.bytes_up for row in rows),
        "total_bytes_down": sum(row.bytes_down for row in rows),
        "seconds": round(seconds, 1),
        "seeds": [asdict(s) for s in seeds],
        "verdict": verdict(seeds) if seeds else None,
        "live": live,
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(
    rows: Sequence[RoundRow],
    centralized: float | None,
    path: Path,
    title: str,
    *,
    compared: Sequence[SeedResult] = (),
    start: float | None = None,
) -> None:
    """Accuracy per round (with the centralised baseline) over bytes per round, and the
    start, federated and central accuracy of each seed compared."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    rounds = [row.round for row in rows]
    figure = plt.figure(figsize=(10, 6))
    grid = figure.add_gridspec(2, 2, width_ratios=(3, 1))
    top = figure.add_subplot(grid[0, 0])
    bottom = figure.add_subplot(grid[1, 0], sharex=top)
    if compared:
        _plot_seeds(figure.add_subplot(grid[:, 1]), compared)
    top.plot(
        rounds,
        [row.accuracy if row.accuracy is not None else float("nan") for row in rows],
        marker="o",
        label="federated (global model)",
    )
    if start is not None:
        top.axhline(start, linestyle=":", color="black", label="start (no training)")
    if centralized is not None:
        top.axhline(centralized, linestyle="--", color="grey", label="centralised baseline")
    if rows and rows[0].accuracy is not None:
        scored = [r.accuracy for r in rows if r.accuracy is not None]
        top.set_ylim(*_zoom([*scored, *(v for v in (start, centralized) if v is not None)]))
    top.set_ylabel("held-out accuracy")
    top.legend(loc="upper left")
    top.set_title(title)
    width = 0.4
    bottom.bar(
        [r - width / 2 for r in rounds],
        [row.bytes_up / 1e3 for row in rows],
        width,
        label="up (updates)",
    )
    bottom.bar(
        [r + width / 2 for r in rounds],
        [row.bytes_down / 1e3 for row in rows],
        width,
        label="down (models)",
    )
    bottom.set_yscale("log")  # updates are an order of magnitude smaller than models
    bottom.set_ylabel("kB per round (log)")
    bottom.set_xlabel("round")
    bottom.set_xticks(rounds)
    bottom.legend(loc="lower right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _zoom(values: Sequence[float]) -> tuple[float, float]:
    """The accuracy axis around the values: a flat line of 0-100 % hides a point's change."""
    low, high = min(values), max(values)
    pad = max(0.02, (high - low) * 0.3)
    return max(0.0, low - pad), min(1.03, high + pad)


def _plot_seeds(axis: Any, compared: Sequence[SeedResult]) -> None:
    """Each seed's start, federated and central accuracy, joined: the gain is the slope."""
    arms = ("start", "federated", "central")
    for result in compared:
        axis.plot(
            arms, [getattr(result, arm) for arm in arms], marker="o", label=f"seed {result.seed}"
        )
    gains = [100 * r.gain for r in compared]
    axis.set_title(
        f"gain over start: {sum(gains) / len(gains):+.1f} points\n"
        f"({min(gains):+.1f} to {max(gains):+.1f} over {len(gains)} seeds)",
        fontsize=9,
    )
    axis.set_ylabel("open-set accuracy")
    axis.legend(loc="lower right", fontsize=8)
