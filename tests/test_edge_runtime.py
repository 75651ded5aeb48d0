"""A doorbell started from a shell runs with the unit's process settings (edge/runtime.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MALLOC = ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]

PROBE = """
import json, os
import edge.__main__ as main  # what `python -m edge` loads, numpy and OpenCV included
threads = next(line for line in open("/proc/self/status") if line.startswith("Threads:"))
print(json.dumps({
    "openblas": os.environ.get("OPENBLAS_NUM_THREADS"),
    "threads": int(threads.split()[1]),
    "malloc": main.runtime.tune_malloc(),
}))
"""


def probe(**environment: str) -> dict[str, object]:
    """What `python -m edge` sets up, in a process whose environment has only `environment`
    of the unit's settings."""
    unit = ("OPENBLAS_NUM_THREADS", *MALLOC)
    env = {k: v for k, v in os.environ.items() if k not in unit}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=REPO,
        env={**env, **environment},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_a_doorbell_from_a_shell_gets_the_units_settings() -> None:
    found = probe()
    # Set before numpy loaded OpenBLAS: it started no threads of its own.
    assert found["openblas"] == "1"
    assert found["threads"] == 1
    assert found["malloc"] == MALLOC


def test_the_environment_wins() -> None:
    found = probe(OPENBLAS_NUM_THREADS="2", MALLOC_ARENA_MAX="4")
    assert found["openblas"] == "2"
    assert found["malloc"] == MALLOC[1:]
