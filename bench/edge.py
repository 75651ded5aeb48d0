"""One real doorbell process: memory, frame rate and traffic, with and without a round.

    python -m bench.edge [--gallery 40] [--rounds 8] [--secure-rounds 5] [--phase-seconds 30]
                         [--fps 120] [--downlink-codec int8] [--trainable head]
                         [--out reports/edge.json]
                                                                        (make bench-edge)

Starts a private Mosquitto (`broker.local.LocalBroker`), the real aggregator
(`python -m aggregator`, signing on, the backbone converted once and cached in
reports/cache) and one real doorbell process (`python -m edge --config ...`,
int8 backbone on LiteRT, the head trained with numpy), and:

1. enrolls a gallery with the doorbell's own command (`python -m edge enroll
   --from-folder`): `--gallery` photos of real people (lfw_dev, the people with
   the most photos);
2. replays a porch video through the doorbell's folder camera the whole time
   (`--fps 120`, the most a config allows: as fast as the doorbell reads
   it, so a stall shows): first an empty porch (phase `idle`), then visits
   of the enrolled people (one photo each that the gallery does not hold)
   and a stranger (phase `recognizing`);
3. runs `--rounds` real rounds (`start_round` on the control topic; the
   doorbell trains `edge.trainer.train_delta` on its cached gallery features
   and sends a signed update; the aggregator publishes the next head), with
   recognition still running;
4. runs `--secure-rounds` real secure rounds (the product's default): the
   aggregator restarts with secure aggregation on, and min_cohort - 1 helper
   doorbells here make up the cohort; the doorbell's own time in each phase
   (key advert, training, shares, masked update, unmask answer) against its
   time in a plain round, its bytes and RSS (bench/edge_secure.py says how).

Measured from outside the doorbell, never assumed:

- RSS: VmRSS of the doorbell's pid from /proc, sampled every 50 ms; per phase
  the highest sample (`training`: from the round's announcement until the
  doorbell reports the new head);
- frames: every frame the folder camera reads is an open() of a file in the
  frames folder, counted with inotify (IN_OPEN), so frames per second are
  those the doorbell's pipeline actually consumed; `fps_idle` is the rate
  while recognizing outside rounds, `fps_while_training` inside round windows;
- `tensorflow_imported`: whether any TensorFlow library is mapped into the
  doorbell process (/proc/<pid>/maps: `libtensorflow*`, `_pywrap_tensorflow*`
  outside LiteRT, anything under `site-packages/tensorflow/`); the same probe
  on the aggregator must say yes, which shows the probe works;
- `train_step_ms`: the doorbell's own timing of train_delta, from its signed
  update's header (`meta.train_seconds`), the largest over the rounds;
- bytes: payloads of the messages a doorbell receives on its subscriptions
  (round announcements, global head; the backbone once per lineage, counted
  apart) and of the updates it sends, per round.

`--chroot ROOT --doorbell-python PY` runs the doorbell (and its enrollment)
inside another root, e.g. the arm64 Debian of `make pi-check` under qemu: the
work folder then lives in ROOT so both sides see the same files.

The pieces: bench/edge_setup.py (where the doorbell runs, its configs),
bench/edge_probes.py and bench/edge_traffic.py (what is measured from outside),
bench/edge_rounds.py (the phases and rounds), bench/edge_secure.py (the secure rounds),
bench/edge_report.py (figures, bars, printout); the visitors, the porch video and
enrolment are simulation/replay.py's, shared with `make demo`'s live recognition.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import RoundSettings
from bench.edge_probes import FrameCounter, RssSampler, import_breakdown
from bench.edge_report import print_result, summary, verdict
from bench.edge_rounds import Bench, inspect, one_round, phases, wait_ready
from bench.edge_secure import go_secure, secure_round
from bench.edge_setup import (
    REPO,
    UNIT,
    Layout,
    Settings,
    enroll,
    full_size,
    show,
    stranger_photos,
    unit_environment,
    write_configs,
)
from bench.edge_traffic import Observer
from broker.local import LocalBroker
from edge.camera import LORES_FOLDER
from edge.recognition_config import CameraConfig
from simulation.processes import Child, Fleet
from simulation.replay import People, pick_people, visitor_face, write_porch

DATASETS = REPO.parent / "shared" / "datasets"
QUIET = {"TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def run(args: argparse.Namespace, layout: Layout) -> dict[str, Any]:
    work = layout.work
    started_all = time.monotonic()
    people = pick_people(args.dataset, args.strangers, args.gallery, args.per_person)
    enrolled = sum(map(len, people.enroll.values()))
    print(
        f"gallery: {enrolled} photos of {len(people.enroll)} people from {args.dataset.name}; "
        f"porch video: {len(people.visits)} visits ({len(people.enroll)} residents, a stranger)"
    )
    empty, visiting = porch_video(args, people, work / "video")
    frames = work / "camera"
    frames.mkdir()
    show(empty, frames)
    with LocalBroker(work / "broker") as broker, Fleet(stop_timeout=30) as fleet:
        settings = Settings(
            broker.port,
            frames,
            args.fps,
            args.downlink_codec,
            args.codec,
            full_size(args),
            stranger_photos(args.strangers, people, work / "strangers"),
            args.trainable,
        )
        configs = write_configs(layout, settings)
        doorbell_yaml = configs.doorbell
        seconds, output = enroll(layout, doorbell_yaml, people)
        print(f"enrolled with `edge enroll --from-folder` in {seconds:.1f} s")
        print("\n".join(f"  | {line}" for line in output.splitlines()[-len(people.enroll) :]))
        observer = Observer(broker.port)
        sampler: RssSampler | None = None
        counter: FrameCounter | None = None
        try:
            t0 = time.monotonic()
            command = [sys.executable, "-m", "aggregator", "--config", str(configs.aggregator)]
            aggregator = fleet.launch(Child("aggregator", command, work / "aggregator.log", QUIET))
            # A frame read is an open of its small stream's file (the lores copy with two
            # streams: the full frame is opened only for a chip).
            counter = FrameCounter(frames if full_size(args) is None else frames / LORES_FOLDER)
            counter.start()
            command = layout.command("-m", "edge", "--config", layout.inside(doorbell_yaml))
            log = work / "doorbell.log"
            doorbell = fleet.launch(Child("doorbell", command, log, QUIET | layout.env, layout.cwd))
            sampler = RssSampler(doorbell.pid)
            sampler.start()
            bench = Bench(args, layout, observer, counter, sampler, doorbell, aggregator)
            version = wait_ready(bench, t0)
            phases(bench, empty, visiting, frames)
            for _ in range(args.rounds):
                version = one_round(bench, version)
            inspect(bench)  # before the aggregator restarts: its probe is the first one's
            if args.secure_rounds:
                go_secure(bench, fleet, configs, version)
            for _ in range(args.secure_rounds):
                version = secure_round(bench, version)
            bench.notes["import_breakdown"] = import_breakdown(layout)
        finally:
            if sampler is not None:
                sampler.done.set()  # the peak is the run's, not the shutdown's
            fleet.stop()
            if counter is not None:
                counter.close()
            observer.close()
    return summary(bench, enrolled, time.monotonic() - started_all)


def porch_video(args: argparse.Namespace, people: People, folder: Path) -> tuple[Path, Path]:
    """(empty porch, visits): the frames the doorbell's folder camera replays."""
    empty, visiting = folder / "empty", folder / "visits"
    faces = [visitor_face(visit.photo) for visit in people.visits]
    write_porch(visiting, faces, np.random.default_rng(0), full=full_size(args), empty=empty)
    return empty, visiting


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    if not (width.isdigit() and height.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected WIDTHxHEIGHT, e.g. 1536x864")
    return int(width), int(height)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.edge", description=__doc__.split("\n\n")[0]
    )
    shown = parser.add_argument_group("what the doorbell is given and shown")
    shown.add_argument("--gallery", type=int, default=40, help="photos to enroll")
    shown.add_argument(
        "--per-person", type=int, default=0, help="photos per person (0: gallery / 5, 2 to 8)"
    )
    shown.add_argument("--dataset", type=Path, default=DATASETS / "lfw_dev")
    shown.add_argument("--strangers", type=Path, default=DATASETS / "lfw_strangers")
    shown.add_argument(
        "--fps",
        type=float,
        default=120.0,
        help="camera rate (120, the most allowed: as fast as it is read)",
    )
    shown.add_argument(
        "--full-size",
        type=_size,
        default=CameraConfig().full_size(),
        help="WxH of the two-stream camera's full-resolution frames the porch video is "
        "written at (default: the default camera.full_width x full_height)",
    )
    shown.add_argument(
        "--one-stream",
        action="store_true",
        help="640x480 frames and no full-resolution stream (the doorbell before issue 20)",
    )
    timing = parser.add_argument_group("how long")
    timing.add_argument("--rounds", type=int, default=8, help="plain rounds (at least 1)")
    timing.add_argument(
        "--secure-rounds", type=int, default=5, help="secure rounds after them (0: none)"
    )
    timing.add_argument("--phase-seconds", type=float, default=30.0)
    timing.add_argument("--pause", type=float, default=5.0, help="seconds between rounds")
    timing.add_argument("--ready-timeout", type=float, default=900.0)
    timing.add_argument("--round-timeout", type=float, default=600.0)
    doorbell = parser.add_argument_group("the doorbell and the federation")
    product = RoundSettings()
    doorbell.add_argument("--codec", default=product.codec, help="update codec (the product's)")
    doorbell.add_argument(
        "--downlink-codec", default=product.downlink_codec, help="global head codec (the product's)"
    )
    doorbell.add_argument(
        "--trainable",
        choices=["head", "last_level"],
        default=product.trainable,
        help="what the federation trains (rounds.trainable; last_level: the doorbell runs the "
        "backbone cut before dlib's last level and trains that level too)",
    )
    doorbell.add_argument("--chroot", type=Path, default=None, help="run the doorbell in this root")
    doorbell.add_argument("--doorbell-python", default=sys.executable)
    doorbell.add_argument(
        "--no-unit-env",
        action="store_true",
        help="run the doorbell without the unit's Environment= settings, as from a shell "
        "(`python -m edge` then applies the unit's malloc and OpenBLAS settings itself: "
        "edge/runtime.py)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "reports" / "edge.json")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds: at least 1 (the figures, secure rounds' too, need a plain round)")
    if args.secure_rounds < 0:
        parser.error("--secure-rounds: 0 or more")
    for folder in (args.dataset, args.strangers):
        if not folder.is_dir():
            parser.error(f"{folder}: no such folder of <person>/<photo> (see --dataset)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = args.chroot / "var" / "tmp" if args.chroot is not None else None
    work = Path(tempfile.mkdtemp(prefix="fedbell-bench-edge-", dir=base))
    work.chmod(0o755)
    env = {} if args.no_unit_env else unit_environment(UNIT)
    layout = Layout(work, args.chroot, args.doorbell_python, env)
    try:
        result = run(args, layout)
    except Exception:
        print(f"failed; logs in {work}", file=sys.stderr)
        raise
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"work folder kept: {work}")
    print_result(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.out}")
    if args.chroot is not None:  # emulated (make pi-check): it ran; the bars are for hardware
        print("the bars above are for a real machine, not an emulated one: not enforced")
        return 0
    return 0 if all(ok for _, ok in verdict(result)) else 1


if __name__ == "__main__":
    sys.exit(main())
