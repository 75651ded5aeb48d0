"""Face detection benchmark: BlazeFace short range, BlazeFace full range and Haar, one thread.

    python -m bench.detection [--datasets ../shared/datasets] [--lfw-sample 500]

On real photos (a seeded sample of lfw_dev, faces94_female, att_faces), two
conditions:

- photo: the photo as it is; a hit is a face whose box centre is within a
  quarter of the image size of the image centre (the datasets are centred).
- 40px: the photo in grey, downscaled so its face is about 40 px wide, pasted
  at a seeded random place into a 640×480 mid-grey frame, as a visitor about
  3 m from a doorbell camera; a hit is a face centred within 40 px of it.
- 80px: the same with 80 px faces, a visitor about 1.5 m away.

Prints the detection rate, stray detections per frame (faces that are not the
one expected) and milliseconds per frame; writes reports/detection.json.
Skips, saying so, when the datasets are absent.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from fedbell.faces.detection import BlazeFaceDetector, Detector, Face, HaarDetector

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATASETS = ROOT.parent / "shared/datasets"
DATASETS = ("lfw_dev", "faces94_female", "att_faces")
# Typical face width in each dataset's photos (pixels), from BlazeFace boxes on a
# few photos of each: what the pasted conditions scale down to FACE_SIZES_PX.
NOMINAL_FACE_PX = {"lfw_dev": 112, "faces94_female": 115, "att_faces": 66}
FACE_SIZES_PX = (40, 80)
FRAME_W, FRAME_H = 640, 480
Frame = npt.NDArray[np.uint8]
Case = tuple[Frame, tuple[float, float], float]  # frame, expected centre, tolerance


def detectors() -> dict[str, Callable[[], Detector]]:
    return {
        "blazeface short": lambda: BlazeFaceDetector("short_range", num_threads=1),
        "blazeface full": lambda: BlazeFaceDetector("full_range", num_threads=1),
        # The doorbell's Haar settings (half size, faces >= 60 px) and one tuned
        # for small faces (full size, faces >= 20 px), to be fair to Haar.
        "haar": HaarDetector,
        "haar small": lambda: HaarDetector(downscale=1.0, min_face_px=20),
    }


def photos(folder: Path, sample: int | None, seed: int) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in {".jpg", ".pgm", ".png"})
    if sample is not None and len(files) > sample:
        files = sorted(random.Random(seed).sample(files, sample))
    return files


def photo_cases(files: list[Path]) -> Iterator[Case]:
    for path in files:
        image = np.asarray(cv2.imread(str(path), cv2.IMREAD_COLOR), np.uint8)
        height, width = image.shape[:2]
        yield image, (width / 2, height / 2), min(width, height) / 4


def pasted_cases(files: list[Path], face_px: float, target_px: int, seed: int) -> Iterator[Case]:
    rng = np.random.default_rng(seed)
    scale = target_px / face_px
    for path in files:
        grey = np.asarray(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), np.uint8)
        small = cv2.resize(grey, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        frame = np.full((FRAME_H, FRAME_W), 128, np.uint8)
        h, w = small.shape
        x, y = int(rng.integers(0, FRAME_W - w)), int(rng.integers(0, FRAME_H - h))
        frame[y : y + h, x : x + w] = small
        yield frame, (x + w / 2, y + h / 2), target_px


def run(detector: Detector, cases: list[Case]) -> dict[str, Any]:
    hits = strays = 0
    times = []
    for frame, (cx, cy), tolerance in cases:
        start = time.perf_counter()
        faces = detector.detect(frame)
        times.append((time.perf_counter() - start) * 1000)
        near = [f for f in faces if _distance(f, cx, cy) < tolerance]
        hits += bool(near)
        strays += len(faces) - min(1, len(near))
    return {
        "frames": len(cases),
        "detected": hits,
        "rate": hits / len(cases),
        "stray_per_frame": strays / len(cases),
        "ms_mean": statistics.fmean(times),
        "ms_median": statistics.median(times),
    }


def _distance(face: Face, cx: float, cy: float) -> float:
    x, y, w, h = face.box
    return max(abs(x + w / 2 - cx), abs(y + h / 2 - cy))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", type=Path, default=DEFAULT_DATASETS)
    parser.add_argument("--lfw-sample", type=int, default=500, help="photos drawn from lfw_dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "reports/detection.json")
    args = parser.parse_args(argv)

    present = [name for name in DATASETS if (args.datasets / name).is_dir()]
    if not present:
        print(
            f"detection bench: no datasets under {args.datasets} ({', '.join(DATASETS)}); skipped"
        )
        return
    for name in sorted(set(DATASETS) - set(present)):
        print(f"detection bench: {args.datasets / name} absent, skipped")
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})  # one core, as on a Pi that is also training
    cv2.setNumThreads(1)
    built = {name: make() for name, make in detectors().items()}

    results: list[dict[str, Any]] = []
    header = f"{'dataset':<15} {'condition':<9} {'detector':<16} {'found':>11} {'rate':>7}"
    print(header + f" {'stray/frame':>11} {'ms/frame':>9}")
    for dataset in present:
        sample = args.lfw_sample if dataset == "lfw_dev" else None
        files = photos(args.datasets / dataset, sample, args.seed)
        conditions = {"photo": list(photo_cases(files))}
        for target in FACE_SIZES_PX:
            pasted = pasted_cases(files, NOMINAL_FACE_PX[dataset], target, args.seed)
            conditions[f"{target}px"] = list(pasted)
        for condition, cases in conditions.items():
            for name, detector in built.items():
                row = {"dataset": dataset, "condition": condition, "detector": name}
                row |= run(detector, cases)
                results.append(row)
                print(
                    f"{dataset:<15} {condition:<9} {name:<16} "
                    f"{row['detected']:>5}/{row['frames']:<5} {row['rate']:>7.1%} "
                    f"{row['stray_per_frame']:>11.3f} {row['ms_mean']:>9.2f}"
                )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": platform.processor() or platform.machine(),
        "threads": 1,
        "lfw_sample": args.lfw_sample,
        "seed": args.seed,
        "pasted_face_px": list(FACE_SIZES_PX),
        "frame": [FRAME_W, FRAME_H],
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
