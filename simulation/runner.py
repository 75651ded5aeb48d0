"""One simulation run, start to finish: data, broker, processes, rounds, report, live demo."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from aggregator.config import EvaluationSettings
from aggregator.export import evaluation_samples
from broker.local import LocalBroker
from fedbell.config import MqttSettings
from fedbell.faces.detection import make_detector
from fedbell.faces.dlib_resnet import load as load_dlib
from fedbell.faces.embedding import TrainParams
from fedbell.faces.features import Backbone
from fedbell.faces.last_level import start_model
from fedbell.wire.backbone import assemble, parse_manifest
from fedbell.wire.messages import TfliteArtifact
from simulation import baseline, report, seeds
from simulation.config import SimulationConfig
from simulation.data import (
    Households,
    load_households,
    write_folder,
    write_strangers,
    write_synthetic,
)
from simulation.driver import Driver, FleetView
from simulation.processes import Fleet, ProcessDied, tail
from simulation.stack import (
    CACHE_DIR,
    SITE,
    Layout,
    aggregator_keys,
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


GENERATED_STRANGERS = 80
"""Generated strangers the aggregator calibrates on when no real ones are given."""


SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
"""Real photographs beside the checkout (absent in a fresh clone): read, never copied."""


def real_photos(config: SimulationConfig, name: str) -> Path | None:
    """A dataset of ../shared/datasets, unless generated faces are asked for or it is absent."""
    folder = SHARED_DATASETS / name
    return None if config.generated or not folder.is_dir() else folder


def prepare_dataset(config: SimulationConfig, layout: Layout) -> tuple[Path, str]:
    """(dataset folder, its name in the report): the given one, LFW beside the checkout,
    or generated identities (which dlib's network barely tells apart: the run shows the
    mechanics, not recognition)."""
    if config.dataset is not None:
        return config.dataset.resolve(), str(config.dataset)
    lfw = real_photos(config, "lfw_dev")
    if lfw is not None:
        return lfw, "lfw_dev (beside the checkout)"
    synthetic = config.synthetic
    root = layout.root / "dataset"
    write_synthetic(
        root, synthetic.persons, synthetic.images_per_person, config.seed, synthetic.image_size
    )
    return root, f"synthetic {synthetic.persons}x{synthetic.images_per_person}"


def prepare_strangers(config: SimulationConfig, layout: Layout) -> Path:
    """Real stranger photos if given or beside the checkout, else generated ones (a threshold
    for cartoons only)."""
    if config.strangers is not None:
        return config.strangers.resolve()
    lfw = real_photos(config, "lfw_strangers")
    if lfw is not None:
        return lfw
    write_strangers(layout.strangers, GENERATED_STRANGERS, config.seed)
    return layout.strangers


def describe(console: Console, name: str, homes: Households, devices: list[str]) -> None:
    held = len({s.person for s in homes.held_out})
    console.print(
        f"[bold]dataset[/] {name}: {sum(len(h) for h in homes.houses)} persons in "
        f"{len(homes.houses)} houses, {held} persons in no house (the aggregator's held-out "
        f"people), 1 newcomer"
    )
    for device, house, gallery in zip(devices, homes.houses, homes.galleries, strict=True):
        console.print(f"  {device}: {len(house)} residents, {len(gallery)} gallery photos")


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
    if temporary and not keeps(config):
        shutil.rmtree(root, ignore_errors=True)
    elif temporary:
        console.print(f"work folder kept: {root} (delete it when done; --no-keep does)")
    return result


def keeps(config: SimulationConfig) -> bool:
    """Whether a temporary work folder outlives the run: asked for, or after --stay."""
    return config.keep if config.keep is not None else config.stay


def _run(
    config: SimulationConfig, layout: Layout, console: Console, started: float
) -> dict[str, Any]:
    dataset, name = prepare_dataset(config, layout)
    homes = load_households(dataset, config.nodes, config.seed)
    write_folder(homes.held_out, layout.held_out)
    devices = device_ids(config.nodes)
    for device, gallery in zip(devices, homes.galleries, strict=True):
        write_folder(gallery, layout.gallery(device))
    strangers = prepare_strangers(config, layout)
    describe(console, name, homes, devices)
    with LocalBroker(layout.root / "broker") as broker, Fleet() as fleet:
        start_federation(
            fleet, config, layout, strangers=strangers, port=broker.port, devices=devices
        )
        driver = Driver(mqtt_settings(broker.port), topics())
        try:
            with console.status(
                f"starting the aggregator (first start: converting the face network) "
                f"and {len(devices)} doorbells"
            ):
                driver.wait_ready(devices, config.startup_timeout_s, fleet.check)
            rows = drive_rounds(driver, config, fleet.check, console)
            artifact = load_backbone(driver, layout, config, fleet)
            backbone = Backbone(artifact.float_model)
            detector = make_detector("blazeface", fallback=True)
            start_head = start_model(load_dlib())
            with console.status("scoring the starting model and the centralised baseline"):
                result_baselines = baseline.baselines(
                    start_head,
                    homes.galleries,
                    homes.held_out,
                    evaluation_samples(strangers, EvaluationSettings().max_strangers),
                    backbone=backbone,
                    detector=detector,
                    params=TrainParams(
                        epochs=config.rounds * config.epochs,
                        batch_size=config.batch_size,
                        learning_rate=config.learning_rate,
                        seed=config.seed,
                    ),
                    cache=CACHE_DIR,  # the aggregator's: its strangers' features are there
                )
            compared = seeds.compare(
                console,
                config,
                dataset,
                strangers,
                start_head,
                backbone=backbone,
                detector=detector,
            )
            result = report.build_report(
                dataset=name,
                houses=[len(h) for h in homes.houses],
                held_out_persons=len({s.person for s in homes.held_out}),
                codec=config.codec,
                epochs=config.epochs,
                rows=rows,
                start=result_baselines.start,
                centralized=result_baselines.central,
                head_params=result_baselines.head_params,
                seconds=time.monotonic() - started,
                seeds=compared,
            )
            publish_results(console, config, result, rows)
            if config.live.enabled:
                from simulation import live  # the recognition stack is only needed here

                result["live"] = live.demo(
                    console,
                    config,
                    layout,
                    driver,
                    homes=homes,
                    device=devices[0],
                    port=broker.port,
                    fleet=fleet,
                    backbone=artifact,
                    detector=detector,
                )
                report.write_json(result, config.report)
        finally:
            driver.close()
    return result


def load_backbone(
    driver: Driver, layout: Layout, config: SimulationConfig, fleet: Fleet
) -> TfliteArtifact:
    """The backbone the aggregator published, checked as a doorbell checks it."""
    manifest = parse_manifest(
        driver.retained(topics().tflite_model, 60, fleet.check),
        site=SITE,
        max_bytes=MqttSettings().max_message_bytes,  # the limit every process here has
        keys=aggregator_keys(layout, config),
    )
    chunks = {
        index: driver.retained(topics().backbone_chunk(index), 60, fleet.check)
        for index in range(len(manifest.chunks))
    }
    return assemble(manifest, chunks)


def publish_results(
    console: Console, config: SimulationConfig, result: dict[str, Any], rows: list[report.RoundRow]
) -> None:
    """The summary under the per-round lines (the rounds are not printed again)."""
    central = result["centralized_accuracy"]
    console.print(
        f"this run (seed {config.seed}): start (dlib's, no training) "
        f"{report.percent(result['start_accuracy'])}, federated after round {len(rows)} "
        f"{report.percent(result['final_accuracy'])}, centralised "
        f"({result['centralized_epochs']} epochs on the union of the galleries) "
        f"{report.percent(central)}; federated head {result['head_params']:,} parameters"
    )
    compared = [seeds.SeedResult(**s) for s in result["seeds"]]
    if compared:
        console.print(seeds.seed_table(compared))
        console.print(result["verdict"])
    plot = config.report.with_suffix(".png")
    report.write_json(result, config.report)
    report.write_plot(
        rows,
        central,
        plot,
        title=f"{result['dataset']}, {config.nodes} households, {config.codec}",
        compared=compared,
        start=result["start_accuracy"],
    )
    console.print(f"report: {config.report}  plot: {plot}")
