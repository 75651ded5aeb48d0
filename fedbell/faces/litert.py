"""The TFLite interpreter class, shared by the doorbell, the aggregator and the benchmarks.

LiteRT (`ai-edge-litert`) first, else `tflite-runtime`, else TensorFlow's
`tf.lite` — TensorFlow only as a last resort, because importing it costs
seconds and hundreds of MB on a Pi. It lives in `fedbell/` because the
aggregator must not import `edge/`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class InterpreterUnavailable(RuntimeError):
    """No TFLite interpreter is installed."""


def interpreter_factory() -> Callable[..., Any]:
    """The first TFLite Interpreter class available: LiteRT, tflite-runtime, TensorFlow."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        pass
    else:
        return Interpreter  # type: ignore[no-any-return]
    try:
        from tflite_runtime.interpreter import Interpreter as RuntimeInterpreter
    except ImportError:
        pass
    else:
        return RuntimeInterpreter  # type: ignore[no-any-return]
    try:
        import tensorflow as tf
    except ImportError as err:
        raise InterpreterUnavailable(
            "no TFLite interpreter: install ai-edge-litert (pip install ai-edge-litert)"
        ) from err
    log.warning("using TensorFlow's tf.lite interpreter; install ai-edge-litert for speed")
    return tf.lite.Interpreter  # type: ignore[no-any-return]
