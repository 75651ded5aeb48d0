"""The benchmark's phases on a running doorbell: an empty porch, visitors, real rounds.

Each phase notes its time windows in `Bench`; bench/edge_report.py turns the
samples inside them into the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.edge_probes import FrameCounter, RssSampler, fps, rss_by_mapping, tensorflow_mapped
from bench.edge_setup import Layout, show
from bench.edge_traffic import Observer, wait_status
from fedbell.wire.envelope import decode
from fedbell.wire.protocol import DeviceStatus
from simulation.processes import Child


@dataclass
class Bench:
    """The running set-up: broker, aggregator, doorbell, and what watches them."""

    args: argparse.Namespace
    layout: Layout
    observer: Observer
    counter: FrameCounter
    sampler: RssSampler
    doorbell: Child
    aggregator: Child
    idle: tuple[float, float] = (0.0, 0.0)
    recognizing: list[tuple[float, float]] = field(default_factory=list)
    training: list[tuple[float, float]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    secure: list[tuple[float, float]] = field(default_factory=list)
    """Secure rounds' windows (bench/edge_secure.py), apart from the plain rounds' `training`."""
    secure_rounds: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


def drain(waiting: queue.Queue[Any]) -> None:
    """Drop what a queue holds."""
    with contextlib.suppress(queue.Empty):
        while True:
            waiting.get_nowait()


def serving(status: DeviceStatus) -> bool:
    """The doorbell recognises with a head and its scored gallery: edge/artifacts.py's
    detail then reads "model v<version>: <people, photos, how many look like others>"."""
    return status.detail.startswith("model v")


def wait_ready(bench: Bench, started: float) -> int:
    """Until the doorbell has a backbone, a head and its scored gallery; its model version."""
    ready_at, status = wait_status(
        bench.observer,
        "a backbone, a head and its scored gallery",
        serving,
        bench.args.ready_timeout,
    )
    print(f"doorbell ready {ready_at - started:.1f} s after start: {status.detail}")
    # On a site the aggregator is another machine: from here on it must not take
    # the doorbell's CPU while it folds an update or publishes the next head.
    os.setpriority(os.PRIO_PROCESS, bench.aggregator.pid, 19)
    bench.notes["ready_seconds"] = round(ready_at - started, 1)
    observer = bench.observer
    bench.notes["backbone_down"] = observer.bytes_down(
        0, time.monotonic(), (observer.topics.tflite_model, observer.topics.backbone_chunks)
    )
    return status.model_version or 0


def phases(bench: Bench, empty: Path, visiting: Path, frames: Path) -> None:
    """An empty porch (idle), then the visits (recognizing), each `--phase-seconds`."""
    seconds = bench.args.phase_seconds
    show(empty, frames)
    time.sleep(2)
    bench.idle = (time.monotonic(), time.monotonic() + seconds)
    time.sleep(seconds)
    bench.notes["rss_by_mapping_idle"] = rss_by_mapping(bench.doorbell.pid)
    show(visiting, frames)
    time.sleep(2)  # the camera's loop comes round to the faces
    bench.recognizing.append((time.monotonic(), time.monotonic() + seconds))
    time.sleep(seconds)


def one_round(bench: Bench, version: int) -> int:
    """A real round, recognition running; returns the doorbell's new model version."""
    observer, timeout = bench.observer, bench.args.round_timeout
    begun = time.monotonic()
    seen, announcement = observer.start_round("train")
    sent_at, update = observer.updates.get(timeout=timeout)
    header, _ = decode(update, 1 << 26)
    while (metrics := observer.metrics.get(timeout=timeout)).round != announcement.round:
        pass
    installed, status = wait_status(
        observer,
        f"the head of round {announcement.round}",
        lambda s: (s.model_version or 0) > version,
        timeout,
    )
    bench.training.append((seen, installed))
    time.sleep(bench.args.pause)
    # Everything the doorbell received between this round's command and now.
    down = observer.bytes_down(
        begun, time.monotonic(), (observer.topics.round, observer.topics.global_model)
    )
    bench.recognizing.append((installed + 0.5, time.monotonic()))
    bench.rounds.append(
        {
            "round": announcement.round,
            "outcome": metrics.outcome,
            "seconds": round(installed - seen, 2),
            "train_seconds": float(header.meta.get("train_seconds", float("nan"))),
            "update_bytes": len(update),
            "update_codec": header.codec,
            "bytes_down": down,
            "announced_to_update_s": round(sent_at - seen, 3),
            "fps": round(fps(bench.counter, [(seen, installed)]), 2),
        }
    )
    print(
        f"round {announcement.round}: {metrics.outcome}; announced -> new head on the doorbell "
        f"{installed - seen:.2f} s, train_delta {header.meta.get('train_seconds')} s; "
        f"up {len(update)} B ({header.codec}), down {down} B"
    )
    return status.model_version or 0


def inspect(bench: Bench) -> None:
    """What is mapped into the doorbell (and, to check the probe, the aggregator)."""
    bench.notes["tensorflow_libraries"] = tensorflow_mapped(bench.doorbell.pid)
    bench.notes["aggregator_tensorflow"] = bool(tensorflow_mapped(bench.aggregator.pid))
    bench.notes["rss_by_mapping_end"] = rss_by_mapping(bench.doorbell.pid)
    status = Path(f"/proc/{bench.doorbell.pid}/status").read_text().splitlines()
    bench.notes["rss_kinds_mb"] = {
        line.split(":")[0]: round(int(line.split()[1]) / 1024, 1)
        for line in status
        if line.startswith(("RssAnon:", "RssFile:", "RssShmem:"))
    }
