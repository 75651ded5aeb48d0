"""The backbone doorbells run: dlib's network converted once to TFLite, and cached.

Conversion needs TensorFlow and takes a while (the int8 flavour runs a
representative set of chips through the network), so its result is kept in
a cache folder keyed by everything it depends on: the dlib network file, the
TensorFlow version and the representative chips. The backbone never changes
within a lineage; rounds only move the head.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from aggregator.quiet import native_noise_dropped
from fedbell.faces import dlib_resnet
from fedbell.faces.align import CHIP_SIZE
from fedbell.faces.features import Chip

log = logging.getLogger(__name__)

REPRESENTATIVE_CHIPS = 100
"""Chips the int8 converter calibrates activation ranges on."""


@dataclass(frozen=True)
class BackboneModels:
    float_model: bytes
    int8_model: bytes

    @property
    def sha256(self) -> str:
        """The backbone's identity, as global models name it (the float flavour's hash)."""
        return hashlib.sha256(self.float_model).hexdigest()


def synthetic_chips(count: int, seed: int = 0) -> list[Chip]:
    """Generated faces as chips: the representative set when no real photos are given."""
    import cv2

    from fedbell.faces.synthetic import make_identities, render_face

    rng = np.random.default_rng(seed)
    chips = []
    for identity in make_identities(max(1, count // 4), seed):
        for _ in range(4):
            face = render_face(identity, rng, CHIP_SIZE)
            chips.append(np.asarray(cv2.cvtColor(face, cv2.COLOR_GRAY2RGB), dtype=np.uint8))
    return chips[:count]


def _convert(representative: Sequence[Chip], until_last_level: bool) -> BackboneModels:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    model = dlib_resnet.build_backbone(dlib_resnet.load(), until_last_level=until_last_level)
    # Keras prints the exported signature ("Saved artifact at ...", a TensorSpec per
    # input and output) to stdout: it is not an event of the service, keep it at debug.
    printed = io.StringIO()
    with (
        contextlib.redirect_stdout(printed),
        native_noise_dropped(),
        warnings.catch_warnings(),
    ):
        # int8 with float input and output, as intended: not a problem to report.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        models = BackboneModels(
            dlib_resnet.to_tflite(model), dlib_resnet.to_tflite(model, representative)
        )
    if printed.getvalue().strip():
        log.debug("TensorFlow's conversion output: %s", " | ".join(printed.getvalue().split("\n")))
    return models


def _tensorflow_version() -> str:
    for name in ("tensorflow", "tensorflow-cpu"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError("converting the backbone needs TensorFlow: pip install 'fedbell[train]'")


def backbone_models(
    cache_dir: Path, representative: Sequence[Chip] = (), *, until_last_level: bool = False
) -> BackboneModels:
    """The float and int8 backbone, converted now or read from `cache_dir`.

    `until_last_level`: the network cut before its last residual level, for a
    federation that trains that level on the doorbells (`fedbell.faces.last_level`).
    """
    # The installed version, read without importing TensorFlow: a cached backbone
    # then costs the aggregator no TensorFlow at all (hundreds of MB resident).
    tensorflow = _tensorflow_version()
    chips = list(representative)[:REPRESENTATIVE_CHIPS] or synthetic_chips(REPRESENTATIVE_CHIPS)
    key = hashlib.sha256()
    key.update(hashlib.sha256(dlib_resnet.model_file().read_bytes()).digest())
    key.update(tensorflow.encode())
    for chip in chips:
        key.update(np.ascontiguousarray(chip).tobytes())
    if until_last_level:  # (the whole network's key is unchanged: its caches stay valid)
        key.update(b"until_last_level")
    digest = key.hexdigest()[:16]
    folder = cache_dir / f"backbone-{digest}"
    float_path, int8_path = folder / "float.tflite", folder / "int8.tflite"
    if float_path.is_file() and int8_path.is_file():
        return BackboneModels(float_path.read_bytes(), int8_path.read_bytes())
    log.info("converting dlib's face network to TFLite (float and int8); cached in %s", folder)
    models = _convert(chips, until_last_level)
    folder.mkdir(parents=True, exist_ok=True)
    for path, data in ((float_path, models.float_model), (int8_path, models.int8_model)):
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(data)
        temporary.replace(path)  # a crash mid-write never leaves a truncated model
    (folder / "about.json").write_text(
        json.dumps({"tensorflow": tensorflow, "representative_chips": len(chips)})
    )
    return models
