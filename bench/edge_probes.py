"""What the doorbell process does, seen from outside: memory, mapped libraries, frames read.

Nothing here asks the doorbell: /proc of its pid, and inotify on its camera folder.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.edge_setup import Layout
from simulation.replay import run_python


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KeyError("VmRSS")


def tensorflow_mapped(pid: int) -> list[str]:
    """TensorFlow's own libraries mapped into a process (LiteRT's interpreter is not one)."""
    found: set[str] = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6:
            continue
        path = parts[5]
        name = path.rsplit("/", 1)[-1]
        if "ai_edge_litert" in path:
            continue
        if "/site-packages/tensorflow/" in path or name.startswith(
            ("libtensorflow", "_pywrap_tensorflow")
        ):
            found.add(path)
    return sorted(found)


def rss_by_mapping(pid: int, top: int = 8) -> dict[str, float]:
    """MB resident per mapping (a library's file name, [heap], or [anon]), largest first."""
    sizes: dict[str, int] = {}
    name = "[anon]"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split(maxsplit=5)
        if "-" in first[0] and len(first) >= 5 and not first[0].endswith(":"):
            path = first[5] if len(first) == 6 else "[anon]"
            name = path if path.startswith("[") else path.rsplit("/", 1)[-1]
        elif line.startswith("Rss:"):
            sizes[name] = sizes.get(name, 0) + int(line.split()[1])
    ranked = sorted(sizes.items(), key=lambda item: -item[1])
    return {k: round(v / 1024, 1) for k, v in ranked[:top]}


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="rss")
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            try:
                self.samples.append((time.monotonic(), rss_kb(self.pid)))
            except (OSError, KeyError):
                return

    def between(self, start: float, end: float) -> list[int]:
        return [kb for t, kb in list(self.samples) if start <= t <= end]


IN_OPEN = 0x20
IN_ISDIR = 0x40000000
_EVENT = struct.Struct("iIII")


class FrameCounter(threading.Thread):
    """Times of every open() of a file in `folder` (inotify): the frames the camera read."""

    def __init__(self, folder: Path) -> None:
        super().__init__(daemon=True, name="frames")
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init()
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(folder).encode(), IN_OPEN) < 0:
            raise OSError(ctypes.get_errno(), "inotify on the frames folder")
        self.times: list[float] = []

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            now = time.monotonic()
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                # A file inside: not the folder itself (no name), nor a folder in it.
                if mask & IN_OPEN and length and not mask & IN_ISDIR:
                    self.times.append(now)

    def frames(self, start: float, end: float) -> int:
        return sum(1 for t in list(self.times) if start <= t <= end)

    def close(self) -> None:
        os.close(self.fd)


def fps(counter: FrameCounter, windows: Sequence[tuple[float, float]]) -> float:
    seconds = sum(end - start for start, end in windows)
    frames = sum(counter.frames(start, end) for start, end in windows)
    return frames / seconds if seconds > 0 else 0.0


def mb(kb: Sequence[int]) -> float:
    return round(max(kb) / 1024, 1) if kb else float("nan")


BREAKDOWN = """
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
steps, last = {}, rss()
def step(name):
    global last
    now = rss(); steps[name] = round(now - last, 1); last = now
steps["python"] = round(last, 1)
import numpy as np; step("numpy")
import cv2; step("opencv")
from ai_edge_litert.interpreter import Interpreter; step("ai_edge_litert")
import paho.mqtt.client, cryptography.hazmat.primitives.asymmetric.ed25519, pydantic, zstandard
step("paho, cryptography, pydantic, zstandard")
import edge.node; step("edge and fedbell modules")
from fedbell.faces.detection import BlazeFaceDetector
BlazeFaceDetector("full_range").detect(np.zeros((480, 640, 3), np.uint8))
step("BlazeFace loaded, run")
from fedbell.faces.features import Backbone
model = open(sys.argv[1], "rb").read(); step("int8 backbone file read")
Backbone(model, 1).features([np.zeros((150, 150, 3), np.uint8)])
step("int8 backbone interpreter, run")
steps["total"] = round(last, 1)
print(json.dumps(steps))
"""


def import_breakdown(layout: Layout) -> dict[str, float]:
    """MB each part of the doorbell's stack adds, loaded one after another in a fresh
    process of the doorbell's Python (the stored int8 backbone is the doorbell's own)."""
    model = layout.work / "doorbell-state" / "model.tflite"
    done = run_python(
        layout.python_command,
        *("-c", BREAKDOWN, layout.inside(model)),
        cwd=layout.cwd,
        env=layout.env,
        timeout=1800,
    )
    done.check_returncode()
    parts: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return parts
