"""Face recognition with the global model's TFLite artifact.

The interpreter comes from LiteRT (`ai-edge-litert`), else `tflite-runtime`,
else TensorFlow's `tf.lite` — TensorFlow only as a last resort, because
importing it costs seconds and hundreds of MB on a Pi.

A new artifact is swapped in without a restart and without dropping frames:
its interpreter is built and tested aside, then a reference is replaced
under a lock; a frame being recognised finishes on the old one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# Moved to fedbell/ so the aggregator can use it; re-exported for edge code and tests.
from fedbell.litert import interpreter_factory

log = logging.getLogger(__name__)

UNKNOWN = "unknown"
"""The person name of a face below the threshold."""

FloatImage = npt.NDArray[np.float32]


class RecognizerError(RuntimeError):
    """A model artifact is unusable, or no model is loaded yet."""


@dataclass(frozen=True)
class ModelArtifact:
    """What the aggregator ships for inference: flatbuffer, labels, threshold."""

    tflite: bytes
    labels: tuple[str, ...]
    threshold: float | None = None
    version: int | str = 0

    def __post_init__(self) -> None:
        if not self.tflite:
            raise RecognizerError("model artifact: empty TFLite flatbuffer")
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels):
            raise RecognizerError(
                f"model artifact: labels must be distinct and non-empty, got {self.labels}"
            )
        if UNKNOWN in self.labels:
            raise RecognizerError(f"model artifact: {UNKNOWN!r} cannot be a label")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise RecognizerError(f"model artifact: threshold {self.threshold} not in [0, 1]")


@dataclass
class LoadedModel:
    """One interpreter ready to run, with what it needs to read its tensors."""

    artifact: ModelArtifact
    interpreter: Any
    input_index: int
    output_index: int
    input_size: int
    input_dtype: type[np.generic]
    input_quant: tuple[float, int]
    output_quant: tuple[float, int]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def probabilities(self, face: FloatImage) -> npt.NDArray[np.float32]:
        """Class probabilities for one normalised face (size×size floats in [0, 1])."""
        if face.shape != (self.input_size, self.input_size):
            raise RecognizerError(
                f"face is {face.shape}, the model takes {self.input_size}x{self.input_size}"
            )
        batch = face.reshape(1, self.input_size, self.input_size, 1)
        scale, zero = self.input_quant
        if self.input_dtype is np.float32:
            tensor = batch.astype(np.float32)
        else:  # an int8/uint8-input model: quantise as its input params say
            info = np.iinfo(self.input_dtype)  # type: ignore[type-var]
            tensor = np.clip(np.round(batch / scale + zero), info.min, info.max).astype(
                self.input_dtype
            )
        with self.lock:  # an interpreter runs one invoke at a time
            self.interpreter.set_tensor(self.input_index, tensor)
            self.interpreter.invoke()
            raw = np.array(self.interpreter.get_tensor(self.output_index))
        out_scale, out_zero = self.output_quant
        output = raw.astype(np.float32)
        if raw.dtype != np.float32 and out_scale:
            output = (output - out_zero) * out_scale
        return np.asarray(output.reshape(-1), dtype=np.float32)


def load_model(artifact: ModelArtifact, num_threads: int = 1) -> LoadedModel:
    """Build, check and warm up an interpreter for `artifact` (RecognizerError if unusable)."""
    try:
        interpreter = interpreter_factory()(model_content=artifact.tflite, num_threads=num_threads)
        interpreter.allocate_tensors()
    except RecognizerError:
        raise
    except Exception as err:  # the interpreter raises ValueError/RuntimeError on bad bytes
        raise RecognizerError(
            f"model {artifact.version}: not a usable TFLite model: {err}"
        ) from err
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise RecognizerError(f"model {artifact.version}: expected one input and one output")
    shape = tuple(int(v) for v in inputs[0]["shape"])
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 1 or shape[1] != shape[2]:
        raise RecognizerError(
            f"model {artifact.version}: input shape {shape} is not [1, size, size, 1]"
        )
    classes = int(np.prod(outputs[0]["shape"]))
    if classes != len(artifact.labels):
        raise RecognizerError(
            f"model {artifact.version}: {classes} outputs but {len(artifact.labels)} labels"
        )
    model = LoadedModel(
        artifact=artifact,
        interpreter=interpreter,
        input_index=int(inputs[0]["index"]),
        output_index=int(outputs[0]["index"]),
        input_size=shape[1],
        input_dtype=np.dtype(inputs[0]["dtype"]).type,
        input_quant=_quant(inputs[0]),
        output_quant=_quant(outputs[0]),
    )
    if model.input_dtype not in (np.float32, np.int8, np.uint8):
        raise RecognizerError(
            f"model {artifact.version}: unsupported input type {model.input_dtype.__name__}"
        )
    if model.input_dtype is not np.float32 and not model.input_quant[0]:
        raise RecognizerError(f"model {artifact.version}: integer input without a scale")
    model.probabilities(np.zeros((model.input_size, model.input_size), np.float32))
    return model


def _quant(detail: dict[str, Any]) -> tuple[float, int]:
    scale, zero = detail.get("quantization", (0.0, 0))
    return float(scale), int(zero)


class Recognizer:
    """Names the person in a normalised face crop, or "unknown"."""

    def __init__(
        self,
        threshold_override: float | None = None,
        default_threshold: float = 0.6,
        num_threads: int = 1,
    ) -> None:
        self._override = threshold_override
        self._default = default_threshold
        self._threads = num_threads
        self._lock = threading.Lock()
        self._model: LoadedModel | None = None

    @property
    def ready(self) -> bool:
        return self._model is not None

    @property
    def version(self) -> int | str | None:
        model = self._model
        return None if model is None else model.artifact.version

    @property
    def input_size(self) -> int:
        return self._current().input_size

    @property
    def labels(self) -> tuple[str, ...]:
        return self._current().artifact.labels

    @property
    def threshold(self) -> float:
        model = self._model
        if self._override is not None:
            return self._override
        if model is not None and model.artifact.threshold is not None:
            return model.artifact.threshold
        return self._default

    def swap(self, artifact: ModelArtifact) -> None:
        """Start using `artifact`; on error the current model stays in use."""
        model = load_model(artifact, self._threads)  # slow part, outside the lock
        with self._lock:
            previous, self._model = self._model, model
        log.info(
            "recognition model %s -> %s (%d labels)",
            None if previous is None else previous.artifact.version,
            artifact.version,
            len(artifact.labels),
        )

    def _current(self) -> LoadedModel:
        with self._lock:
            model = self._model
        if model is None:
            raise RecognizerError("no recognition model loaded yet")
        return model

    def probabilities(self, face: FloatImage) -> npt.NDArray[np.float32]:
        return self._current().probabilities(face)

    def recognize(self, face: FloatImage) -> tuple[str, float]:
        """(person or "unknown", confidence) for one normalised face."""
        model = self._current()
        return self._name(model, model.probabilities(face))

    def recognize_batch(self, faces: Sequence[FloatImage]) -> list[tuple[str, float]]:
        """`recognize` over many faces, all on one model even if a swap happens meanwhile."""
        model = self._current()
        return [self._name(model, model.probabilities(face)) for face in faces]

    def _name(
        self, model: LoadedModel, probabilities: npt.NDArray[np.float32]
    ) -> tuple[str, float]:
        best = int(np.argmax(probabilities))
        confidence = float(probabilities[best])
        if confidence < self.threshold:
            return UNKNOWN, confidence
        return model.artifact.labels[best], confidence

    def probabilities_batch(self, faces: Sequence[FloatImage]) -> npt.NDArray[np.float32]:
        """[n, classes] probabilities, e.g. to calibrate a threshold on a gallery."""
        model = self._current()
        return np.stack([model.probabilities(face) for face in faces]).astype(np.float32)
