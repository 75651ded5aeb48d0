"""`make bench`: every comparison of issue 6, side by side in one run.

    python -m bench.suite [--dataset DIR] [--rounds 30] [--nodes 10] [--alpha 0.5]
                          [--scale 10 100 1000] [--skip-scale]

1. learning quality: centralised, each node alone, FedAvg with every codec,
   all on the same split, seed and initial model;
2. aggregation at scale: real MQTT doorbells through one Mosquitto and the
   real aggregator (bench.scale);
3. inference: ms per face and held-out accuracy of the float and int8 TFLite
   models of the final float32 FedAvg model.

Writes reports/bench.json and reports/bench-*.png, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.data import load_federation
from bench.federated import (
    Arm,
    ArmResult,
    Federation,
    RoundResult,
    run_arm,
    train_central,
    train_local_only,
)
from fedbell import model as face_model
from fedbell.model import TrainParams

CODEC_ARMS = (
    Arm("float32"),
    Arm("float16", codec="float16"),
    Arm("int8", codec="int8"),
    Arm("topk 10% + int8", codec="topk", density=0.10),
    Arm("topk 5% + int8", codec="topk", density=0.05),
)
TARGET = 0.9


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB"


def learning(fed: Federation, rounds: int, console: Console) -> dict[str, Any]:
    def progress(arm: Arm, r: RoundResult) -> None:
        console.print(
            f"  {arm.name:<18} round {r.round:>3}  accuracy {r.accuracy:.3f}  {r.seconds:.1f}s",
            highlight=False,
        )

    results = [run_arm(fed, arm, rounds, progress) for arm in CODEC_ARMS]
    epochs = rounds * fed.plan.epochs
    central = train_central(fed, epochs)
    local = train_local_only(fed, epochs)
    reference = results[0]
    table = Table(title=f"Learning quality after {rounds} rounds ({len(fed.nodes)} nodes)")
    for column in (
        "set-up",
        "final accuracy",
        f"rounds to {TARGET:.0%}",
        "bytes/update up",
        "bytes/model down",
        "total bytes",
        "smaller than float32",
    ):
        table.add_column(column, justify="right")
    table.add_row("centralised", f"{central:.3f}", "", "", "", "", "")
    table.add_row("each node alone (mean)", f"{np.mean(local):.3f}", "", "", "", "", "")
    for result in results:
        total = sum(r.bytes_up + r.bytes_down for r in result.rounds)
        table.add_row(
            result.arm.name,
            f"{result.final_accuracy:.3f}",
            str(result.rounds_to(TARGET) or "—"),
            _kb(result.bytes_per_update),
            _kb(result.bytes_per_download),
            _kb(total),
            f"{reference.bytes_per_update / result.bytes_per_update:.1f}x",
        )
    console.print(table)
    _plot(results, central, Path("reports/bench-codecs.png"))
    return {
        "central_accuracy": central,
        "local_only_accuracy": float(np.mean(local)),
        "local_only_per_node": local,
        "codecs": [
            {
                "name": r.arm.name,
                "codec": r.arm.codec,
                "density": r.arm.density,
                "accuracy": r.final_accuracy,
                "rounds_to_90": r.rounds_to(TARGET),
                "bytes_per_update": r.bytes_per_update,
                "bytes_per_download": r.bytes_per_download,
                "accuracy_per_round": [x.accuracy for x in r.rounds],
            }
            for r in results
        ],
        "_float32_result": reference,
    }


def _plot(results: list[ArmResult], central: float, path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        left.plot(
            [r.round for r in result.rounds],
            [r.accuracy for r in result.rounds],
            label=result.arm.name,
        )
    left.axhline(central, color="black", linestyle="--", label="centralised")
    left.set(xlabel="round", ylabel="held-out accuracy", ylim=(0, 1.03))
    left.legend(fontsize=8)
    right.bar([r.arm.name for r in results], [r.bytes_per_update / 1000 for r in results])
    right.set(ylabel="kB per update (up)", yscale="log")
    right.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def inference(fed: Federation, reference: ArmResult, console: Console) -> dict[str, float]:
    """ms per face and accuracy of the final model's float and int8 TFLite versions."""
    from bench.recognition import ms_per_face
    from edge.recognizer import ModelArtifact, Recognizer

    model = face_model.build_model(fed.classes, seed=fed.seed)
    face_model.set_weights(model, reference.weights)
    train_images = np.concatenate([n.images for n in fed.nodes])
    float_model, int8_model = face_model.to_tflite(model, train_images)
    labels = tuple(str(i) for i in range(fed.classes))
    figures: dict[str, float] = {}
    faces = list(fed.held_out.images)
    for name, flatbuffer in (("float", float_model), ("int8", int8_model)):
        recognizer = Recognizer(threshold_override=0.0, num_threads=1)
        recognizer.swap(ModelArtifact(flatbuffer, labels))
        predicted = np.argmax(recognizer.probabilities_batch(faces), axis=1)
        figures[f"{name}_accuracy"] = float(np.mean(predicted == fed.held_out.labels))
        figures[f"{name}_ms"] = ms_per_face(recognizer, fed.held_out.images)
        figures[f"{name}_bytes"] = float(len(flatbuffer))
    table = Table(title="Inference (LiteRT, one thread)")
    for column in ("model", "ms per face", "held-out accuracy", "size"):
        table.add_column(column, justify="right")
    for name in ("float", "int8"):
        table.add_row(
            name,
            f"{figures[f'{name}_ms']:.3f}",
            f"{figures[f'{name}_accuracy']:.3f}",
            _kb(figures[f"{name}_bytes"]),
        )
    console.print(table)
    gap = 100 * (figures["float_accuracy"] - figures["int8_accuracy"])
    console.print(f"int8 is {gap:+.1f} points from float on the held-out split")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=None)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--report", type=Path, default=Path("reports/bench.json"))
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    face_model.limit_threads(2)
    console = Console(width=150)
    fed, name = load_federation(
        args.dataset, args.nodes, args.alpha, args.seed, TrainParams(epochs=args.epochs)
    )
    console.print(
        f"[bold]dataset[/] {name}: {args.nodes} nodes, Dirichlet alpha {args.alpha}, "
        f"{args.rounds} rounds of {args.epochs} local epochs, seed {args.seed}"
    )
    report: dict[str, Any] = {
        "dataset": name,
        "nodes": args.nodes,
        "alpha": args.alpha,
        "rounds": args.rounds,
        "seed": args.seed,
    }
    quality = learning(fed, args.rounds, console)
    reference = quality.pop("_float32_result")
    report.update(quality)
    report["inference"] = inference(fed, reference, console)
    if not args.skip_scale:
        from bench.scale import run_scale

        report["scale"] = run_scale(args.scale)
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    console.print(f"report: {args.report}, plots: reports/bench-*.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
