"""`make bench-edge`'s figures, its bars and its printout (reports/edge.json)."""

from __future__ import annotations

import os
import statistics
from typing import Any

from bench.edge_probes import fps, mb
from bench.edge_rounds import Bench
from bench.edge_secure import print_secure, secure_summary
from bench.edge_setup import full_size
from fedbell.faces import last_level

BARS = {"training_rss_mb": 250.0, "recognizing_rss_mb": 150.0, "fps_ratio": 0.7}
TWO_STREAMS_RECOGNIZING_RSS_MB = 180.0
"""Issue 20's bar with the full-resolution stream beside the small one (issue 12's 150 MB was
set for one 640x480 stream)."""
FLOAT32_HEAD_BYTES = 256 * 128 * 4
"""The federated head (fedbell.faces.embedding) as raw float32: plain FedAvg's message each way."""


def summary(bench: Bench, enrolled: int, seconds: float) -> dict[str, Any]:
    rounds, notes, sampler = bench.rounds, bench.notes, bench.sampler
    up = statistics.median(r["update_bytes"] for r in rounds)
    down = statistics.median(r["bytes_down"] for r in rounds)
    # The federated model as raw float32 (plain FedAvg's message each way): the head, and
    # with rounds.trainable last_level dlib's last level too.
    model = FLOAT32_HEAD_BYTES + (
        4 * last_level.VALUES if bench.args.trainable == "last_level" else 0
    )
    return {
        "rss_mb": {
            "idle": mb(sampler.between(*bench.idle)),
            "recognizing": mb([kb for w in bench.recognizing for kb in sampler.between(*w)]),
            "training": mb([kb for w in bench.training for kb in sampler.between(*w)]),
        },
        "tensorflow_imported": bool(notes["tensorflow_libraries"]),
        "train_step_ms": round(1000 * max(r["train_seconds"] for r in rounds), 1),
        "round_seconds": round(statistics.median(r["seconds"] for r in rounds), 2),
        "fps_idle": round(fps(bench.counter, bench.recognizing), 2),
        "fps_while_training": round(fps(bench.counter, bench.training), 2),
        "fps_empty_porch": round(fps(bench.counter, [bench.idle]), 2),
        "bytes_up_per_round": int(up),
        "bytes_down_per_round": int(down),
        "bytes_down_once_backbone": notes["backbone_down"],
        "float32_fedavg_bytes_per_round": 2 * model,
        "traffic_vs_float32_fedavg": round((up + down) / (2 * model), 3),
        "rss_peak_mb": mb([kb for _, kb in sampler.samples]),
        "rss_by_mapping_mb": {
            "idle": notes["rss_by_mapping_idle"],
            "end": notes["rss_by_mapping_end"],
        },
        "rss_kinds_mb_at_end": notes["rss_kinds_mb"],
        "rss_mb_by_part": notes["import_breakdown"],
        "visitor_events": bench.observer.visitors,
        "rounds": rounds,
        "secure": secure_summary(bench),
        "gallery_images": enrolled,
        "frames_read": len(bench.counter.times),
        "ready_seconds": notes["ready_seconds"],
        "tensorflow_libraries": notes["tensorflow_libraries"],
        "aggregator_tensorflow_mapped": notes["aggregator_tensorflow"],
        "settings": {
            "codec": bench.args.codec,
            "downlink_codec": bench.args.downlink_codec,
            "trainable": bench.args.trainable,
            "camera_fps": bench.args.fps,
            "camera_full_size": full_size(bench.args),
            "flavour": "int8",
            "doorbell_env": bench.layout.env,
            "chroot": None if bench.layout.chroot is None else str(bench.layout.chroot),
            "machine": os.uname().machine,
            "load_average": os.getloadavg(),
        },
        "seconds": round(seconds, 1),
    }


def verdict(result: dict[str, Any]) -> list[tuple[str, bool]]:
    rss = result["rss_mb"]
    two_streams = result["settings"]["camera_full_size"] is not None
    recognizing = TWO_STREAMS_RECOGNIZING_RSS_MB if two_streams else BARS["recognizing_rss_mb"]
    return [
        ("tensorflow_imported: false", not result["tensorflow_imported"]),
        (
            f"training RSS <= {BARS['training_rss_mb']:.0f} MB",
            rss["training"] <= BARS["training_rss_mb"],
        ),
        (f"recognizing RSS <= {recognizing:.0f} MB", rss["recognizing"] <= recognizing),
        (
            f"fps_while_training >= {BARS['fps_ratio']} x fps_idle",
            result["fps_while_training"] >= BARS["fps_ratio"] * result["fps_idle"],
        ),
    ]


def print_result(result: dict[str, Any]) -> None:
    rss = result["rss_mb"]
    mapping = result["rss_by_mapping_mb"]["end"]
    print(
        f"\nRSS (MB): idle {rss['idle']}, recognizing {rss['recognizing']}, "
        f"training {rss['training']} (peak over the run {result['rss_peak_mb']})\n"
        f"  at the end (MB): "
        + ", ".join(f"{name} {size}" for name, size in result["rss_kinds_mb_at_end"].items())
        + "; largest mappings: "
        + ", ".join(f"{name} {size}" for name, size in mapping.items())
        + "\n  what each part adds, loaded in turn (MB): "
        + ", ".join(f"{name} {size}" for name, size in result["rss_mb_by_part"].items())
        + f"\nframes/s: empty porch {result['fps_empty_porch']}, recognizing "
        f"{result['fps_idle']}, during rounds {result['fps_while_training']}\n"
        f"train_delta {result['train_step_ms']} ms; round (announced -> new head on the "
        f"doorbell) {result['round_seconds']} s\n"
        f"per round: up {result['bytes_up_per_round']} B, down {result['bytes_down_per_round']} B "
        f"({result['traffic_vs_float32_fedavg']:.3f} x float32 FedAvg's "
        f"{result['float32_fedavg_bytes_per_round']} B); backbone once: "
        f"{result['bytes_down_once_backbone']} B\n"
        f"visitor events (residents' unseen photos, then a stranger, in a loop): "
        f"{', '.join(result['visitor_events']) or 'none'}\n"
        f"TensorFlow mapped in the doorbell: {result['tensorflow_imported']} "
        f"(aggregator, which imports it to convert: {result['aggregator_tensorflow_mapped']})"
    )
    print_secure(result["secure"])
    for what, ok in verdict(result):
        print(f"  {'PASS' if ok else 'FAIL'}  {what}")
