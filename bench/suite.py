"""`make bench`: the update codecs side by side, the baselines, aggregation at scale.

    python -m bench.suite [--dataset DIR] [--strangers DIR] [--people N] [--rounds 30]
                          [--houses-per-round 20] [--scale 10 100 1000] [--skip-scale]

1. learning: households of real photos under doorbell conditions
   (`bench.data`: LFW people split into training houses and test houses of
   people no model has seen), the federated head trained by THE round loop
   (`bench.federated.run_arm`: the doorbell's `train_delta`, signed updates
   in each codec, the aggregator's checks, accumulator and server step), one
   arm per codec, all from the same start head on the same split; beside
   them the baselines `start` (no training), `central` (the same trainer on
   the union of the training houses) and `local_only` (each test house
   alone), from `bench.openset`. Per codec: open-set accuracy and TAR at 1 %
   FAR at the calibrated threshold, `bytes_per_update` (what a doorbell
   sends) and `bytes_down_per_node` (everything a doorbell receives per
   round: the round announcements and the retained global head message);
2. aggregation at scale: real MQTT doorbells sending signed updates through
   one Mosquitto (loopback, and the TLS production configuration) to the
   real aggregator, at 10/100/1000 doorbells, with its memory while it
   collects the updates (`bench.scale`).

Writes reports/bench.json and reports/bench-codecs.png, and prints the tables.
Without ../shared/datasets the learning part says so and is skipped.
"""

from __future__ import annotations

import os

# One BLAS thread: the head's matrices are small, and OpenBLAS threads fighting for two
# shared cores made a round 15x slower (measured: 10 doorbells' train_delta 20.9 s vs 1.4 s).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from rich.console import Console
from rich.table import Table

from bench import openset
from bench.data import CACHE, DEFAULT_DATASET, DEFAULT_STRANGERS, DatasetMissing, load_bench, scorer
from bench.federated import PRODUCT, Arm, ArmResult, RoundResult, run_arm
from fedbell.embedding import TrainParams

CODEC_ARMS = (
    Arm("float32", codec="float32"),
    Arm("float16", codec="float16"),
    Arm("int8", codec="int8"),
    Arm("topk 10% + int8", codec="topk", density=0.10),
    Arm(f"topk {PRODUCT.density:.0%} + int8 (default)", codec="topk", density=PRODUCT.density),
)
BASELINES = ("start", "central", "local_only")


def _kb(n: float) -> str:
    return f"{n / 1000:,.1f} kB"


def _progress(arm: Arm, r: RoundResult) -> None:
    if r.round % 5 == 0 or r.round == 1:
        print(
            f"  {arm.name:<26} round {r.round:>3}  open-set {r.open_set_accuracy:.3f}  "
            f"up {r.bytes_up} B  {r.seconds:.1f}s",
            flush=True,
        )


def _run_codec(task: tuple[openset.Bench, Arm, int, int, TrainParams]) -> ArmResult:
    bench, arm, rounds, per_round, params = task
    return run_arm(
        bench.train,
        bench.start,
        arm,
        rounds,
        scorer(bench),
        params=params,
        houses_per_round=per_round,
        progress=_progress,
    )


def _run_baseline(task: tuple[openset.Bench, str, openset.ArmSettings, int]) -> openset.ArmOutcome:
    bench, name, settings, seed = task
    if name == "start":
        return openset.run_start(bench, settings)
    if name == "central":
        return openset.run_central(bench, settings, seed)
    return openset.run_local_only(bench, settings, seed)


def learning(
    bench: openset.Bench,
    *,
    rounds: int,
    per_round: int,
    params: TrainParams,
    seed: int,
    jobs: int,
) -> dict[str, Any]:
    settings = openset.ArmSettings(rounds=rounds, houses_per_round=per_round, params=params)
    codec_tasks = [(bench, arm, rounds, per_round, params) for arm in CODEC_ARMS]
    base_tasks = [(bench, name, settings, seed) for name in BASELINES]
    if jobs <= 1:
        results = [_run_codec(t) for t in codec_tasks]
        baselines = [_run_baseline(t) for t in base_tasks]
    else:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            pending = pool.map(_run_codec, codec_tasks)
            pending_base = pool.map(_run_baseline, base_tasks)
            results, baselines = list(pending), list(pending_base)
    return {"codecs": results, "baselines": dict(zip(BASELINES, baselines, strict=True))}


def print_learning(
    results: list[ArmResult],
    baselines: dict[str, openset.ArmOutcome],
    rounds: int,
    per_round: int,
    console: Console,
) -> None:
    table = Table(
        title=f"Open-set recognition of never-seen people after {rounds} rounds "
        f"({per_round} houses a round), signed updates"
    )
    for column in (
        "set-up",
        "open-set acc.",
        "TAR @ 1 % FAR",
        "threshold",
        "bytes_per_update",
        "bytes_down_per_node",
        "smaller than float32",
    ):
        table.add_column(column, justify="right")
    for name, outcome in baselines.items():
        table.add_row(
            name,
            f"{outcome.result.open_set_accuracy:.3f}",
            f"{outcome.result.tar_at_far_1pct:.3f}",
            f"{outcome.threshold:.3f}",
            "",
            "",
            "",
        )
    reference = results[0].bytes_per_update
    for result in results:
        final = result.final
        table.add_row(
            result.arm.name,
            f"{final.open_set_accuracy:.3f}",
            f"{final.tar_at_far_1pct:.3f}",
            f"{final.threshold:.3f}",
            _kb(result.bytes_per_update),
            _kb(result.bytes_down_per_node),
            f"{reference / result.bytes_per_update:.1f}x",
        )
    console.print(table)


def learning_report(
    results: list[ArmResult], baselines: dict[str, openset.ArmOutcome]
) -> dict[str, Any]:
    return {
        "baselines": {
            name: {
                "open_set_accuracy": o.result.open_set_accuracy,
                "tar_at_far_1pct": o.result.tar_at_far_1pct,
                "rank1": o.result.rank1,
                "unknown_rejected": o.result.unknown_rejected,
                "threshold": o.threshold,
            }
            for name, o in baselines.items()
        },
        "codecs": [
            {
                "name": r.arm.name,
                "codec": r.arm.codec,
                "density": r.arm.density,
                "open_set_accuracy": r.final.open_set_accuracy,
                "tar_at_far_1pct": r.final.tar_at_far_1pct,
                "threshold": r.final.threshold,
                "start_open_set_accuracy": r.start.open_set_accuracy,
                "bytes_per_update": r.bytes_per_update,
                "bytes_down_per_node": r.bytes_down_per_node,
                "rejected_updates": r.rejected,
                "open_set_accuracy_per_round": [x.open_set_accuracy for x in r.rounds],
            }
            for r in results
        ],
    }


def plot(results: list[ArmResult], baselines: dict[str, openset.ArmOutcome], path: Path) -> None:
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for result in results:
        left.plot(
            [0, *(r.round for r in result.rounds)],
            [result.start.open_set_accuracy, *(r.open_set_accuracy for r in result.rounds)],
            label=result.arm.name,
        )
    for name, style in (("central", "--"), ("local_only", ":")):
        if name in baselines:
            left.axhline(
                baselines[name].result.open_set_accuracy, color="black", linestyle=style, label=name
            )
    left.set(xlabel="round", ylabel="open-set accuracy (never-seen people)")
    left.legend(fontsize=8)
    right.bar([r.arm.name for r in results], [r.bytes_per_update / 1000 for r in results])
    right.set(ylabel="kB per update (up)", yscale="log")
    right.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET)
    parser.add_argument("--strangers", type=Path, default=DEFAULT_STRANGERS)
    parser.add_argument(
        "--people", type=int, default=None, help="a seeded sample of the dataset's people"
    )
    parser.add_argument("--calibration", type=int, default=1000, help="calibration strangers")
    parser.add_argument("--negatives", type=int, default=1500, help="strangers seen at doors")
    parser.add_argument("--conditions", choices=("doorbell", "clean"), default="doorbell")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--houses-per-round", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=TrainParams.epochs)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--scale", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--brokers", nargs="+", choices=("loopback", "tls"), default=None)
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-learning", action="store_true")
    parser.add_argument("--report", type=Path, default=Path("reports/bench.json"))
    args = parser.parse_args(argv)
    console = Console(width=150)
    started = time.perf_counter()
    report: dict[str, Any] = {"rounds": args.rounds, "houses_per_round": args.houses_per_round}
    if not args.skip_learning:
        try:
            loaded = load_bench(
                dataset=args.dataset,
                strangers=args.strangers,
                conditions=args.conditions,
                seed=args.seed,
                people=args.people,
                calibration=args.calibration,
                negatives=args.negatives,
                jobs=args.jobs,
                cache=args.cache,
            )
        except DatasetMissing as err:
            console.print(f"[bold]learning skipped[/]: {err}")
        else:
            console.print(f"[bold]data[/] {loaded.description}")
            params = TrainParams(epochs=args.epochs)
            outcome = learning(
                loaded.bench,
                rounds=args.rounds,
                per_round=args.houses_per_round,
                params=params,
                seed=args.seed,
                jobs=args.jobs,
            )
            print_learning(
                outcome["codecs"],
                outcome["baselines"],
                args.rounds,
                args.houses_per_round,
                console,
            )
            plot(outcome["codecs"], outcome["baselines"], Path("reports/bench-codecs.png"))
            report["dataset"] = loaded.description
            report["backbone_sha256"] = loaded.backbone_sha256
            report.update(learning_report(outcome["codecs"], outcome["baselines"]))
    if not args.skip_scale:
        from bench.scale import BROKERS, run_scale

        report["scale"] = run_scale(args.scale, brokers=args.brokers or list(BROKERS))
    report["seconds"] = time.perf_counter() - started
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=2))
    console.print(f"report: {args.report}, plot: reports/bench-codecs.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
