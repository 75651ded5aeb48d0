"""dlib's face-recognition ResNet read from its file, rebuilt in Keras, run on LiteRT;
and the face chips that feed it.

Needs the project's `face-recognition-models` (the network file), not dlib:
agreement with dlib itself is `python -m bench.check_dlib`.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fedbell.faces import align, dlib_resnet, last_level
from fedbell.faces.detection import Face
from fedbell.faces.features import face_chip
from fedbell.faces.litert import interpreter_factory


@pytest.fixture(scope="module")
def data() -> bytes:
    return dlib_resnet.model_file().read_bytes()


@pytest.fixture(scope="module")
def weights(data: bytes) -> dlib_resnet.DlibWeights:
    return dlib_resnet.parse(data)


@pytest.fixture(scope="module")
def model(weights: dlib_resnet.DlibWeights) -> Any:
    return dlib_resnet.build_backbone(weights)


def chips(count: int, seed: int) -> np.ndarray:
    """Face-like test input: smooth blobs over noise, RGB 0..255."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:150, 0:150] / 150.0
    out = []
    for _ in range(count):
        cx, cy = rng.uniform(0.35, 0.65, 2)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / 0.05)[..., None]
        img = 40 + 160 * blob * rng.uniform(0.6, 1.0, 3) + rng.normal(0, 12, (150, 150, 3))
        out.append(np.clip(img, 0, 255))
    return np.asarray(out, np.float32)


def test_parser_reads_the_whole_network(weights: dlib_resnet.DlibWeights) -> None:
    kinds = Counter(layer.op.kind for layer in weights.layers)
    assert len(weights.layers) == 130
    assert kinds == {
        "con": 29,
        "affine": 29,
        "relu": 29,
        "tag": 18,
        "add_prev": 14,
        "avg_pool": 5,
        "skip": 4,
        "max_pool": 1,
        "fc": 1,
    }
    first = weights.layers[0]
    assert first.op.kind == "con"
    assert first.tensors["kernel"].shape == (32, 3, 7, 7)
    assert first.tensors["bias"].shape == (32,)
    last_con = [layer for layer in weights.layers if layer.op.kind == "con"][-1]
    assert last_con.tensors["kernel"].shape == (256, 256, 3, 3)
    assert dlib_resnet.dlib_projection(weights).shape == (256, 128)
    params = sum(t.size for layer in weights.layers for t in layer.tensors.values())
    assert params == 5_614_592
    for layer in weights.layers:
        for tensor in layer.tensors.values():
            assert tensor.dtype == np.float32
            assert np.all(np.isfinite(tensor))
    np.testing.assert_allclose(weights.input_mean, (122.782, 117.001, 104.298), atol=1e-4)
    assert weights.distance_threshold == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("cut", "what"),
    [
        (0, "empty"),
        (100, "in the version numbers"),
        (1000, "in a tensor"),
        (-1, "missing last byte"),
    ],
)
def test_truncated_file_is_a_clear_error(data: bytes, cut: int, what: str) -> None:
    with pytest.raises(ValueError, match="truncated"):
        dlib_resnet.parse(data[:cut] if cut >= 0 else data[:-1])


def test_corrupt_file_is_a_clear_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="unexpected bytes"):
        dlib_resnet.parse(data + b"\x00")
    at = data.index(b"con_4")
    with pytest.raises(ValueError, match="con_9"):
        dlib_resnet.parse(data[:at] + b"con_9" + data[at + 5 :])
    at = data.index(b"loss_metric_2")
    with pytest.raises(ValueError, match="loss"):
        dlib_resnet.parse(data[:at] + b"loss_metric_3" + data[at + 13 :])
    with pytest.raises(ValueError, match="control byte"):
        dlib_resnet.parse(b"\x7f" + data[1:])
    with pytest.raises(ValueError, match="dlib"):
        dlib_resnet.parse(b"PK\x03\x04 not a dlib file at all")


def test_a_nan_weight_is_refused(data: bytes) -> None:
    # The first con_'s parameter tensor starts right after its dimensions: find
    # the first float of the 7x7 filters and make it a NaN.
    at = data.index(b"con_4") + 5
    # version 2, then 4736 x 1 x 1 x 1: 32 filters of 3x7x7 and 32 biases, flat
    dims = bytes([1, 2, 2, 0x80, 0x12, 1, 1, 1, 1, 1, 1])
    assert data[at : at + len(dims)] == dims
    start = at + len(dims)
    broken = data[:start] + np.float32(np.nan).tobytes() + data[start + 4 :]
    with pytest.raises(ValueError, match="non-finite"):
        dlib_resnet.parse(broken)


def test_backbone_shape_and_determinism(model: Any) -> None:
    assert model.input_shape == (None, 150, 150, 3)
    assert model.output_shape == (None, 256)
    x = chips(2, seed=1)
    a = np.asarray(model(x, training=False))
    b = np.asarray(model(x, training=False))
    np.testing.assert_array_equal(a, b)
    assert np.all(np.isfinite(a))
    assert np.all(a >= 0)  # average of a ReLU output
    assert not np.allclose(a[0], a[1])


def test_the_last_level_in_numpy_is_the_networks(
    weights: dlib_resnet.DlibWeights, model: Any
) -> None:
    """The backbone cut before its last level, then that level in numpy from the values a
    doorbell caches (`last_level.compact`), gives the whole network's pooled features."""
    split = dlib_resnet.build_backbone(weights, until_last_level=True)
    assert split.output_shape == (None, *last_level.INPUT_SHAPE)
    x = chips(4, seed=3)
    cached = last_level.compact(np.asarray(split(x, training=False)))
    assert cached.shape == (4, last_level.LEVEL_INPUTS)
    pooled, _ = last_level.forward(cached, last_level.initial(weights))
    want = np.asarray(model(x, training=False))
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(pooled, want, atol=1e-4 * np.abs(want).max())
    # the trainable part does reach the output: a changed level changes the features
    changed = last_level.initial(weights)
    changed[3] = changed[3] + 1.0
    assert np.abs(last_level.forward(cached, changed)[0] - want).max() > 0.1


def test_a_wrong_last_level_is_a_clear_error(weights: dlib_resnet.DlibWeights) -> None:
    level = last_level.initial(weights)
    with pytest.raises(ValueError, match=r"level/conv2 must have shape \(256, 256\)"):
        last_level.check([level[0], level[1], level[2][:8], level[3]])
    level[1] = level[1].copy()
    level[1][7] = np.nan
    with pytest.raises(ValueError, match="level/bias1 has NaN"):
        last_level.check(level)
    with pytest.raises(ValueError, match="4 tensors, got 3"):
        last_level.check(level[:3])
    with pytest.raises(ValueError, match=r"level inputs must be \(n, 4, 4, 256\)"):
        last_level.compact(np.zeros((2, 5, 5, 256), np.float32))


def test_tflite_is_builtin_ops_and_matches_keras(model: Any) -> None:
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    flat = dlib_resnet.to_tflite(model)
    # Without XNNPACK, which would list the ops it takes over as one DELEGATE.
    plain = Interpreter(
        model_content=flat,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    ops = {op["op_name"] for op in plain._get_ops_details()}
    assert not any("Flex" in op or "Custom" in op for op in ops), ops
    assert ops <= {
        "CONV_2D",
        "ADD",
        "MAX_POOL_2D",
        "AVERAGE_POOL_2D",
        "PAD",
        "MEAN",
        "SUB",
        "MUL",
        "RELU",
    }, ops
    interpreter = interpreter_factory()(model_content=flat, num_threads=1)
    interpreter.allocate_tensors()
    x = chips(2, seed=2)
    expected = np.asarray(model(x, training=False))
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    for chip, want in zip(x, expected, strict=True):
        interpreter.set_tensor(inp["index"], chip[None])
        interpreter.invoke()
        got = interpreter.get_tensor(out["index"])[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


# --- alignment ---------------------------------------------------------------------------


def dots(shape: tuple[int, int], points: list[tuple[float, float]], radius: int) -> np.ndarray:
    img = np.zeros(shape, np.uint8)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    for x, y in points:
        img[(xx - x) ** 2 + (yy - y) ** 2 <= radius**2] = 255
    return img


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    weights = mask[ys, xs].astype(float)
    return float((xs * weights).sum() / weights.sum()), float((ys * weights).sum() / weights.sum())


def test_eyes_transform_puts_eyes_on_the_template() -> None:
    right, left = (130.0, 210.0), (240.0, 170.0)  # tilted, image left = subject's right
    m = align.eyes_transform(right, left)
    for point, target in ((right, align.RIGHT_EYE), (left, align.LEFT_EYE)):
        np.testing.assert_allclose(m @ np.array([*point, 1.0]), target, atol=1e-9)
    linear = m[:, :2]
    np.testing.assert_allclose(linear @ linear.T, np.eye(2) * np.linalg.det(linear), atol=1e-9)


@pytest.mark.parametrize("eye_distance", [60.0, 600.0])  # small face; big face (pre-shrunk)
def test_align_by_eyes_moves_pixels_to_the_template(eye_distance: float) -> None:
    angle = np.deg2rad(20)
    right = np.array([700.0, 800.0])
    left = right + eye_distance * np.array([np.cos(angle), np.sin(angle)])
    radius = max(2, round(eye_distance / 12))
    image = dots((1600, 1600), [tuple(right), tuple(left)], radius)
    chip = align.align_by_eyes(image, tuple(right), tuple(left))
    assert chip.shape == (150, 150, 3)
    assert chip.dtype == np.uint8
    grey = chip[:, :, 0]
    half = grey.copy()
    half[:, 75:] = 0
    np.testing.assert_allclose(centroid(half), align.RIGHT_EYE, atol=0.5)
    half = grey.copy()
    half[:, :75] = 0
    np.testing.assert_allclose(centroid(half), align.LEFT_EYE, atol=0.5)


def test_colour_conventions() -> None:
    bgr = np.zeros((200, 200, 3), np.uint8)
    bgr[..., 0] = 200  # blue in OpenCV's order
    eyes = ((80.0, 90.0), (120.0, 90.0))
    chip = align.align_by_eyes(bgr, *eyes)
    assert chip[75, 75].tolist() == [0, 0, 200]  # RGB out
    bgra = np.dstack([bgr, np.full((200, 200), 255, np.uint8)])
    np.testing.assert_array_equal(align.align_by_eyes(bgra, *eyes), chip)
    grey = np.full((200, 200), 77, np.uint8)
    assert align.align_by_eyes(grey, *eyes)[75, 75].tolist() == [77, 77, 77]
    with pytest.raises(ValueError, match="image"):
        align.align_by_eyes(np.zeros((10, 10, 2), np.uint8), *eyes)
    with pytest.raises(ValueError, match="apart"):
        align.align_by_eyes(grey, (50.0, 50.0), (50.2, 50.0))


def test_chip_from_box_places_the_box_like_dlib() -> None:
    x, y, w, h = 100.0, 60.0, 120.0, 120.0
    m = align.box_transform((x, y, w, h))
    centre = np.array([x + w / 2 + align.BOX_SHIFT[0] * w, y + h / 2 + align.BOX_SHIFT[1] * h, 1])
    np.testing.assert_allclose(m @ centre, (74.5, 74.5), atol=1e-9)
    assert m[0, 0] == pytest.approx(150 / (align.BOX_SIDE * w))
    image = dots((400, 400), [(x + w / 2, y + h / 2)], 6)
    chip = align.chip_from_box(image, (x, y, w, h))
    expected = m @ np.array([x + w / 2, y + h / 2, 1])
    np.testing.assert_allclose(centroid(chip[:, :, 0]), expected, atol=0.5)
    with pytest.raises(ValueError, match="box"):
        align.chip_from_box(image, (0, 0, 0, 10))


def test_a_face_whose_eyes_almost_coincide_is_cut_by_its_box() -> None:
    # BlazeFace gives such eyes on a few degraded far frames; aligning by them would
    # raise (a pixel blown up to the chip) and lose the frame's other faces with it.
    rng = np.random.default_rng(3)
    image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    box = (100, 60, 40, 48)
    degenerate = Face(box, 0.9, right_eye=(120.0, 80.0), left_eye=(120.6, 80.6))
    np.testing.assert_array_equal(face_chip(image, degenerate), align.chip_from_box(image, box))
    # Eyes 2 px apart on a 40 px face are still not eyes; 16 px apart are.
    close = Face(box, 0.9, right_eye=(119.0, 80.0), left_eye=(121.0, 80.0))
    np.testing.assert_array_equal(face_chip(image, close), align.chip_from_box(image, box))
    eyes = Face(box, 0.9, right_eye=(112.0, 80.0), left_eye=(128.0, 80.0))
    np.testing.assert_array_equal(
        face_chip(image, eyes), align.align_by_eyes(image, (112.0, 80.0), (128.0, 80.0))
    )
    with pytest.raises(ValueError, match="not a face"):  # the aligner itself still refuses
        align.align_by_eyes(image, (120.0, 80.0), (120.6, 80.6))
