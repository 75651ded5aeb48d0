"""What a run produced: the table per round, the JSON report and the plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from fedbell.wire.protocol import RoundMetrics


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


def round_table(
    rows: Sequence[RoundRow], centralized: float | None = None, title: str = "Federated rounds"
) -> Table:
    table = Table(title=title)
    for header in (
        "round",
        "open-set acc.",
        "bytes up",
        "bytes down",
        "seconds",
        "nodes",
        "examples",
    ):
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(
            str(row.round),
            percent(row.accuracy),
            human_bytes(row.bytes_up),
            human_bytes(row.bytes_down),
            f"{row.seconds:.1f}",
            str(row.participants),
            str(row.examples),
        )
    if centralized is not None:
        table.add_section()
        table.add_row("central", percent(centralized), "", "", "", "", "")
    return table


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
        "live": live,
    }


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def write_plot(rows: Sequence[RoundRow], centralized: float | None, path: Path, title: str) -> None:
    """Accuracy per round (with the centralised baseline) over bytes per round."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    rounds = [row.round for row in rows]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(
        rounds,
        [row.accuracy if row.accuracy is not None else float("nan") for row in rows],
        marker="o",
        label="federated (global model)",
    )
    if centralized is not None:
        top.axhline(centralized, linestyle="--", color="grey", label="centralised baseline")
    top.set_ylim(0, 1.03)  # room above 100 % so a perfect baseline line stays visible
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
