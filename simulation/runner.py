"""One simulation run, start to finish: data, broker, processes, rounds, report, live demo."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from broker.local import LocalBroker
from fedbell.messages import AGGREGATOR
from fedbell.model import TrainParams
from fedbell.signing import load_public_key
from simulation import baseline, report
from simulation.config import SimulationConfig
from simulation.data import Split, load_split, write_folder
from simulation.driver import Driver, FleetView
from simulation.enrolled import enroll_synthetic
from simulation.processes import Fleet, ProcessDied, tail
from simulation.stack import (
    SITE,
    Layout,
    device_ids,
    mqtt_settings,
    start_federation,
    topics,
)


def make_workdir(config: SimulationConfig) -> tuple[Path, bool]:
    """(folder, whether it is ours to delete)."""
    if config.workdir is None:
        return Path(tempfile.mkdtemp(prefix="fedbell-sim-")), True
    folder = config.workdir.resolve()
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"work folder {folder} is not empty: a run needs fresh state")
    folder.mkdir(parents=True, exist_ok=True)
    return folder, False


def prepare_dataset(config: SimulationConfig, layout: Layout) -> tuple[Path, str]:
    """(dataset folder, its name in the report): the given one or generated identities."""
    if config.dataset is not None:
        return config.dataset.resolve(), str(config.dataset)
    synthetic = config.synthetic
    root = layout.root / "dataset"
    enroll_synthetic(
        root, synthetic.persons, synthetic.images_per_person, config.seed, synthetic.image_size
    )
    return root, f"synthetic {synthetic.persons}x{synthetic.images_per_person}"


def describe(console: Console, name: str, split: Split, devices: list[str]) -> None:
    console.print(
        f"[bold]dataset[/] {name}: {len(split.labels)} persons, "
        f"{len(split.train)} training + {len(split.held_out)} held-out images"
    )
    for device, samples in zip(devices, split.per_node, strict=True):
        persons = len({s.person for s in samples})
        console.print(f"  {device}: {len(samples)} images of {persons} persons")


def drive_rounds(
    driver: Driver, config: SimulationConfig, check: Callable[[], None], console: Console
) -> list[report.RoundRow]:
    rows: list[report.RoundRow] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("rounds", total=config.rounds)

        def tick(view: FleetView) -> None:
            announcement = view.announcement
            if announcement is not None:
                progress.update(
                    task,
                    description=(
                        f"round {announcement.round} {announcement.phase}: "
                        f"{len(view.updates)}/{len(announcement.selected)} updates"
                    ),
                )

        for _ in range(config.rounds):
            row = report.RoundRow.from_metrics(
                driver.run_round(config.round_timeout_s, check, tick)
            )
            rows.append(row)
            progress.console.print(
                f"round {row.round:>3}  accuracy {report.percent(row.accuracy):>6}  "
                f"up {report.human_bytes(row.bytes_up):>9}  "
                f"down {report.human_bytes(row.bytes_down):>9}  {row.seconds:6.1f} s  "
                f"{row.participants} nodes"
            )
            progress.advance(task)
        progress.update(task, description="rounds")
    return rows


def explain_failure(console: Console, layout: Layout, error: BaseException) -> None:
    def plain(text: str) -> None:  # log lines: no markup, no re-wrapping
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    console.print("[bold red]simulation failed:[/]", end=" ")
    plain(str(error) or repr(error))
    if not layout.logs.exists():
        return  # failed before any process started
    plain(f"logs: {layout.logs} (broker: {layout.root / 'broker' / 'mosquitto.log'})")
    if not isinstance(error, ProcessDied):  # a dead process already showed its own log
        for log in sorted(layout.logs.glob("*.log")):
            plain(f"--- last lines of {log} ---\n{tail(log, 12)}")


def run(config: SimulationConfig, console: Console) -> dict[str, Any]:
    started = time.monotonic()
    root, temporary = make_workdir(config)
    layout = Layout(root)
    console.print(f"work folder: {root}")
    try:
        result = _run(config, layout, console, started)
    except BaseException as error:
        if not isinstance(error, KeyboardInterrupt | SystemExit):
            explain_failure(console, layout, error)
        if temporary and not layout.logs.exists():
            shutil.rmtree(root, ignore_errors=True)  # nothing ran: nothing to inspect
        else:
            console.print(f"work folder kept for inspection: {root}")
        raise
    if temporary and not config.keep:
        shutil.rmtree(root, ignore_errors=True)
    return result


def _run(
    config: SimulationConfig, layout: Layout, console: Console, started: float
) -> dict[str, Any]:
    dataset, name = prepare_dataset(config, layout)
    split = load_split(dataset, config.nodes, config.alpha, config.holdout_fraction, config.seed)
    write_folder(split.held_out, layout.held_out)
    devices = device_ids(config.nodes)
    for device, samples in zip(devices, split.per_node, strict=True):
        write_folder(samples, layout.gallery(device))
    describe(console, name, split, devices)
    with LocalBroker(layout.root / "broker") as broker, Fleet() as fleet:
        start_federation(
            fleet, config, layout, labels=split.labels, port=broker.port, devices=devices
        )
        driver = Driver(mqtt_settings(broker.port), topics())
        try:
            with console.status(f"starting the aggregator and {len(devices)} nodes"):
                driver.wait_ready(devices, config.startup_timeout_s, fleet.check)
            rows = drive_rounds(driver, config, fleet.check, console)
            with console.status("training the centralised baseline"):
                central = baseline.centralized(
                    split.train,
                    split.held_out,
                    split.labels,
                    TrainParams(
                        epochs=config.rounds * config.epochs,
                        batch_size=config.batch_size,
                        learning_rate=config.learning_rate,
                        seed=config.seed,
                    ),
                    config.seed,
                )
            result = report.build_report(
                dataset=name,
                persons=len(split.labels),
                images=len(split.train) + len(split.held_out),
                held_out=len(split.held_out),
                nodes=config.nodes,
                node_examples=[len(p) for p in split.per_node],
                alpha=config.alpha,
                codec=config.codec,
                epochs=config.epochs,
                rows=rows,
                centralized=central.accuracy,
                model_params=central.model_params,
                seconds=time.monotonic() - started,
            )
            publish_results(console, config, result, rows)
            if config.live.enabled:
                result["live"] = live_demo(
                    console,
                    config,
                    layout,
                    driver,
                    split=split,
                    device=devices[0],
                    port=broker.port,
                    fleet=fleet,
                )
                report.write_json(result, config.report)
        finally:
            driver.close()
    return result


def publish_results(
    console: Console, config: SimulationConfig, result: dict[str, Any], rows: list[report.RoundRow]
) -> None:
    central = result["centralized_accuracy"]
    console.print(
        report.round_table(
            rows,
            central,
            title=(
                f"{result['dataset']}, {config.nodes} nodes, alpha {config.alpha}, {config.codec} "
                f"updates, {config.epochs} local epochs"
            ),
        )
    )
    console.print(
        f"centralised baseline ({result['centralized_epochs']} epochs on the union "
        f"of the nodes' data): {report.percent(central)}; "
        f"model {result['model_params']:,} parameters"
    )
    plot = config.report.with_suffix(".png")
    report.write_json(result, config.report)
    report.write_plot(
        rows,
        central,
        plot,
        title=f"{result['dataset']}, {config.nodes} nodes, alpha {config.alpha}, {config.codec}",
    )
    console.print(f"report: {config.report}  plot: {plot}")


def live_demo(
    console: Console,
    config: SimulationConfig,
    layout: Layout,
    driver: Driver,
    *,
    split: Split,
    device: str,
    port: int,
    fleet: Fleet,
) -> dict[str, Any]:
    """Replay visitors through `device`'s pipeline; a failure here is reported, not fatal."""
    from simulation import live  # the recognition stack is only needed here

    settings = mqtt_settings(port)
    try:
        payload = driver.retained(topics().tflite_model, 60, fleet.check)
        keys = (
            {AGGREGATOR: load_public_key(layout.trusted_by(device) / f"{AGGREGATOR}.pub")}
            if config.signed
            else None
        )
        artifact = live.load_artifact(payload, SITE, keys, settings.max_message_bytes)
        frames = layout.root / "live" / "frames"
        visitors = live.write_frames(
            frames,
            split.held_out,
            split.labels,
            visitors=config.live.visitors,
            strangers=config.live.strangers,
            seed=config.seed,
        )
        with console.status(f"replaying {len(visitors)} visitors through {device}'s pipeline"):
            result = live.replay(
                driver,
                settings,
                artifact,
                device=device,
                gallery=layout.gallery(device),
                frames=frames,
                visitors=visitors,
            )
    except Exception as error:  # the federated results stand on their own
        console.print(f"[bold red]live recognition failed:[/] {error!r}")
        return {"error": repr(error)}
    console.print(
        f"[bold]live recognition[/] on {device} with model v{result.model_version} "
        f"(unknown below {result.threshold:.2f}): {result.frames} frames replayed, "
        f"{result.faces} faces found"
    )
    for truth, names in zip(result.visitors, result.named, strict=True):
        console.print(f"  at the door: {truth:<10} doorbell said: {', '.join(names) or '—'}")
    console.print(f"  visitor events received on doorbell/+/visitor: {len(result.events)}")
    for event in result.events:
        fields = {key: value for key, value in event.items() if key != "topic"}
        console.print(
            f"    {event['topic']} {json.dumps(fields)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    console.print(f"  visits named correctly: {result.correct}/{len(result.visitors)}")
    return result.as_dict()
