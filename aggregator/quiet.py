"""Native libraries' chatter kept out of the aggregator's log (issue 13 item 17).

TensorFlow's and LiteRT's C++ code writes some lines straight to file descriptor 2,
whatever Python's logging says; TF_CPP_MIN_LOG_LEVEL (set in `aggregator.__main__`
before TensorFlow is imported) silences most, not these.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

NATIVE_NOISE = re.compile(
    r"INFO: Created TensorFlow Lite XNNPACK delegate for CPU\."
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] .*"
    r"|fully_quantize: \d+, inference_type: \d+, input_inference_type: \w+, "
    r"output_inference_type: \w+"
)
"""Lines LiteRT, absl and the TFLite converter print straight to file descriptor 2 (no
logger to set a level on): the first interpreter's XNNPACK banner, absl's info and
warning lines, the int8 converter's settings."""


@contextlib.contextmanager
def native_noise_dropped() -> Iterator[None]:
    """Run a block with fd 2 captured, then pass on everything but `NATIVE_NOISE`.

    What Python logs meanwhile is kept, only delayed to the end of the block (keep
    blocks short: creating an interpreter).
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not NATIVE_NOISE.fullmatch(line.rstrip("\n")):
                    sys.stderr.write(line)
            sys.stderr.flush()
