"""`bench.cluster`'s secure rounds: the doorbells' child processes, phases, the sum checked.

The houses' doorbells run in `bench.cluster_bells` processes (the real doorbell's
secure-round code, see there); this side starts a round, optionally SIGKILLs
node 1 once half the selected doorbells' masked updates are in, and times each
phase from its announcement (first seen at any hub) to the next one's, the last
(unmask) to the new model at every hub. Per phase: the aggregator thread's CPU
(it runs in this process), the doorbells' CPU and their worker threads' busy
time (from the children), what they sent. At the end the aggregator's unmasked
mean is compared with the mean of what the round's survivors masked (each
doorbell's encoded values, summed in the children): equal, each accepted masked
input was counted exactly once.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from aggregator.service import AggregatorService
from fedbell.wire import masking
from fedbell.wire.protocol import RoundAnnouncement

PHASES = ("keys", "shares", "send", "unmask")


class SecureHouseView(Protocol):
    """What bench.cluster.House records of a secure round at its hub."""

    name: str
    doorbells: list[str]
    port: int
    seen_at: dict[str, float]
    announcements: dict[str, RoundAnnouncement]


def thread_cpu_s(native_id: int) -> float:
    """CPU seconds (user + system) of one thread of this process, from /proc."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Bells:
    """The child processes running the houses' doorbells (houses dealt round-robin)."""

    def __init__(
        self,
        folder: Path,
        site: str,
        houses: list[SecureHouseView],
        *,
        keys_dir: Path,
        aggregator_key: Path,
        processes: int,
    ) -> None:
        self.children: list[subprocess.Popen[str]] = []
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(processes):
            spec = {
                "site": site,
                "keys_dir": str(keys_dir),
                "aggregator_key": str(aggregator_key),
                "seed": 1000 * index,
                "houses": [
                    {"name": house.name, "port": house.port, "devices": house.doorbells}
                    for house in houses[index::processes]
                ],
            }
            path = folder / f"bells{index}.json"
            path.write_text(json.dumps(spec))
            with (folder / f"bells{index}.log").open("w") as log:
                child = subprocess.Popen(
                    [sys.executable, "-m", "bench.cluster_bells", str(path)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                )
            self.children.append(child)
        for child in self.children:
            line = _stdout(child).readline()
            if not line or "ready" not in json.loads(line):
                raise RuntimeError(f"a doorbells process did not start; see {folder}/bells*.log")

    def report(self) -> dict[str, Any]:
        """Every house's report (bench.cluster_bells), merged."""
        for child in self.children:
            _stdin(child).write("report\n")
            _stdin(child).flush()
        merged: dict[str, Any] = {}
        for child in self.children:
            merged |= json.loads(_stdout(child).readline())
        return merged

    def rss_mb(self) -> list[float]:
        return [_rss_mb(child.pid) for child in self.children]

    def close(self) -> None:
        for child in self.children:
            _stdin(child).close()
        for child in self.children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()


def _stdin(child: subprocess.Popen[str]) -> IO[str]:
    assert child.stdin is not None
    return child.stdin


def _stdout(child: subprocess.Popen[str]) -> IO[str]:
    assert child.stdout is not None
    return child.stdout


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


class AggregatorCpu:
    """The aggregator thread's CPU seconds when each phase of a round was first announced."""

    def __init__(self, thread: threading.Thread) -> None:
        assert thread.native_id is not None
        self.native_id = thread.native_id
        self.at: dict[str, float] = {}
        self.lock = threading.Lock()

    def mark(self, key: str) -> None:
        with self.lock:
            if key not in self.at:
                self.at[key] = thread_cpu_s(self.native_id)


class PhaseWatch:
    """When the aggregator had every answer of each phase of its open secure round (Unix
    time, "<phase>": polled every 20 ms from its state, read without its lock: a bench)."""

    def __init__(self, service: AggregatorService) -> None:
        self.service = service
        self.all_in: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="phase-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            current = self.service.coordinator.federation.round
            if current is None or current.secure is None:
                continue
            if current.secure.complete():
                self.all_in.setdefault(f"round{current.id}:{current.secure.phase}", time.time())

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def masked_count(service: AggregatorService) -> int:
    """Masked updates the aggregator has accepted in its open secure round (0: none open)."""
    current = service.coordinator.federation.round
    if current is None or current.secure is None:
        return 0
    return len(current.secure.done("masked"))


def phase_times(
    number: int, members: list[SecureHouseView], cpu: AggregatorCpu
) -> dict[str, dict[str, float]]:
    """Each phase's seconds (its announcement to the next, first seen at any hub; the last
    phase to the new model at every hub) and the aggregator thread's CPU in it."""
    marks = [f"round{number}:{phase}" for phase in PHASES] + [f"model{number}"]
    first = {
        key: min(h.seen_at[key] for h in members if key in h.seen_at)
        for key in marks[:-1]
        if any(key in h.seen_at for h in members)
    }
    if all(marks[-1] in h.seen_at for h in members):
        first[marks[-1]] = max(h.seen_at[marks[-1]] for h in members)
    times: dict[str, dict[str, float]] = {}
    for phase, start, end in zip(PHASES, marks, marks[1:], strict=False):
        if start in first and end in first:
            times[phase] = {
                "seconds": round(first[end] - first[start], 2),
                "aggregator_cpu_s": round(cpu.at.get(end, 0.0) - cpu.at.get(start, 0.0), 2),
            }
    return times


def doorbell_costs(report: dict[str, Any], number: int) -> dict[str, Any]:
    """The children's per-phase figures of round `number`, summed over the houses; `first`
    and `last`: when the first house took the phase up, when the last had answered."""
    phases: dict[str, dict[str, float]] = {}
    refused: dict[str, int] = {}
    for house in report.values():
        mine = house.get(str(number), {})
        for phase, cost in mine.get("phases", {}).items():
            into = phases.setdefault(
                phase,
                {"cpu_s": 0.0, "busy_max_s": 0.0, "sent": 0, "kb": 0.0, "first": 1e12, "last": 0},
            )
            into["cpu_s"] += cost["cpu_s"]
            into["busy_max_s"] = max(into["busy_max_s"], cost["busy_s"])
            into["sent"] += cost["sent"]
            into["kb"] += cost["bytes"] / 1000
            into["first"] = min(into["first"], cost["started"])
            into["last"] = max(into["last"], cost["done"])
        for reason, count in mine.get("refused", {}).items():
            refused[reason] = refused.get(reason, 0) + count
    rounded = {
        phase: {name: round(value, 2) for name, value in cost.items()}
        for phase, cost in phases.items()
        if phase in PHASES
    }
    return {"phases": rounded, "refused": refused}


def where_time_went(
    number: int,
    on_tier: dict[str, float],
    all_in: dict[str, float],
    doorbells: dict[str, Any],
    model_at: float,
) -> dict[str, dict[str, float]]:
    """Each phase split in four (seconds, Unix times on this one machine): `down`, from
    the aggregator's announcement on the tier (an observer on node 3 saw it) to the first
    house taking it up; `doorbells`, from then until the last house's doorbells had all
    answered; `to_aggregator`, until the aggregator held every answer; `next`, from then
    until the next announcement on the tier (the aggregator's own step and publishing: for
    `shares` the 1,000 inboxes it routes first). The last phase ends with the new model at
    every hub. `up` instead of the last two when the watch missed the moment."""
    phases = doorbells["phases"]
    marks = [on_tier.get(f"round{number}:{phase}") for phase in PHASES] + [model_at]
    split: dict[str, dict[str, float]] = {}
    for phase, start, end in zip(PHASES, marks, marks[1:], strict=False):
        cost, held = phases.get(phase), all_in.get(f"round{number}:{phase}")
        if start is None or end is None or cost is None:
            continue
        split[phase] = {
            "down": round(cost["first"] - start, 2),
            "doorbells": round(cost["last"] - cost["first"], 2),
        }
        if held is None:  # the phase moved on within one poll: no time to split
            split[phase]["up"] = round(end - cost["last"], 2)
        else:
            split[phase] |= {
                "to_aggregator": round(held - cost["last"], 2),
                "next": round(end - held, 2),
            }
    return split


def survivors_sum(report: dict[str, Any], number: int) -> np.ndarray | None:
    """The uint32 sum of every survivor's encoded values, from the children's reports."""
    total: np.ndarray | None = None
    for house in report.values():
        encoded = house.get(str(number), {}).get("survivors_sum")
        if encoded is None:
            continue
        values = np.frombuffer(base64.b64decode(encoded), dtype="<u4").astype(np.uint32)
        total = values if total is None else total + values
    return total


def sum_check(
    before: list[np.ndarray],
    after: list[np.ndarray],
    unmask: RoundAnnouncement,
    total: np.ndarray | None,
) -> dict[str, Any]:
    """Does the aggregator's new model move, on the round's subset, by exactly the mean of
    what the survivors masked (scaled by dimension / size, aggregator.secure.mean_delta)?"""
    plan = unmask.secagg
    assert plan is not None
    survivors = len(plan.survivors)
    if total is None or survivors == 0:
        return {"survivors": survivors, "counted_once": False}
    subset = masking.shared_subset(plan.dimension, plan.density, unmask.round, unmask.lineage)
    expected = masking.decode_sum(total, plan.scale) / survivors * (plan.dimension / plan.size)
    moved = np.concatenate([(a - b).ravel() for a, b in zip(after, before, strict=True)])
    error = float(np.max(np.abs(moved[subset] - expected)))
    outside = float(np.max(np.abs(np.delete(moved, subset)), initial=0.0))
    # float32 weights: a few ulp of the weights' size; one doorbell counted twice or lost
    # moves the mean by ~1/survivors of an update, orders of magnitude more.
    one_update = float(np.max(np.abs(expected))) / survivors
    return {
        "survivors": survivors,
        "max_error": error,
        "max_move_outside_subset": outside,
        "counted_once": error < one_update / 100 and outside == 0.0,
    }


def kill_when(condition: Callable[[], bool], action: Callable[[], None], timeout: float) -> None:
    """Run `action` once `condition()` holds (checked every 20 ms); TimeoutError if it never
    does within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the moment to kill a node did not come in {timeout}s")
        time.sleep(0.02)
    action()
