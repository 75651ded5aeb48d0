"""The process settings the doorbell unit sets, for a doorbell started any other way.

systemd/fedbell-edge@.service sets them in its environment, and `make bench-edge`
measures the doorbell with them (~137 MB recognising against ~215 MB without):

- OPENBLAS_NUM_THREADS=1: numpy's and OpenCV's OpenBLAS read it once, when they
  load, so importing this module sets it (unless the environment already does,
  or numpy is loaded already) and `edge/__main__.py` imports it before anything
  that loads numpy;
- glibc's malloc settings (`tune_malloc`): set with mallopt() where the
  environment does not set them, since glibc read its environment at start.

What the environment says always wins: a user can still choose other values.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

if "numpy" not in sys.modules:  # only while it can still take effect (not in a test run)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# mallopt() parameters, from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MALLOC_SETTINGS = {
    "MALLOC_ARENA_MAX": (M_ARENA_MAX, 2),
    "MALLOC_MMAP_THRESHOLD_": (M_MMAP_THRESHOLD, 4 << 20),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, 4 << 20),
}
"""The unit's values (see its comment for why): two arenas; buffers of 4 MB and more
(the backbone message, a flatbuffer) mmapped, so returned to the system when freed,
smaller ones (frames) reused from the heap; a frame's worth of free heap kept."""


def tune_malloc() -> list[str]:
    """Apply the unit's malloc settings the environment does not set; the names applied.

    Call it early, before threads start (an arena limit applies to arenas made after it).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on
    except (OSError, AttributeError):
        return []  # no mallopt (not glibc): its defaults stay
    applied = []
    for name, (parameter, value) in MALLOC_SETTINGS.items():
        if name in os.environ:
            continue
        if mallopt(ctypes.c_int(parameter), ctypes.c_int(value)) == 1:
            applied.append(name)
        else:
            log.debug("mallopt(%d, %d) refused", parameter, value)
    return applied
