"""From photos to cached backbone features for `bench.openset`, as a doorbell computes them.

Each photo is read, degraded by `fedbell.faces.conditions.doorbell_conditions`
(seeded by its key and the run's seed; not with `clean`), its largest face
found by the detector (BlazeFace: box and eyes), aligned by
`fedbell.faces.features.face_chip` and run through the frozen backbone on LiteRT.
The backbone never changes within a lineage, so the features are cached in
`reports/cache/openset-<conditions>-s<seed>-<backbone sha256>.npz`, keyed by
photo, and computed by `jobs` worker processes of one thread each.
"""

from __future__ import annotations

import multiprocessing
import statistics
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import numpy as np
import numpy.typing as npt

from fedbell.faces.dataset import list_samples
from fedbell.faces.detection import largest
from fedbell.faces.embedding import Features, embed
from fedbell.faces.openset import prototype
from fedbell.wire.codecs import Weights

Conditions = Literal["doorbell", "clean"]
Trainable = Literal["head", "last_level"]
"""What the doorbells train: the head on pooled features, or dlib's last level and the head
on the level's inputs (`fedbell.faces.embedding.LAST_LEVEL_NAMES`)."""
ENROL_PER_PERSON = 5


# --- photos --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Photo:
    """One photo to embed: where it is, and the key the cache and the conditions use."""

    path: Path
    key: str
    """`<dataset>/<person>/<file>`: stable across machines."""


def photos_of(root: Path) -> dict[str, list[Photo]]:
    """Photos per person key (`<dataset>/<person>`), in file order."""
    people: dict[str, list[Photo]] = {}
    for sample in list_samples(root):
        person = f"{root.name}/{sample.person}"
        people.setdefault(person, []).append(Photo(sample.path, f"{person}/{sample.path.name}"))
    return people


def condition_rng(key: str, seed: int) -> np.random.Generator:
    """The conditions of one photo under one seed: the same on every run and machine."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


WORKER: dict[str, Any] = {}
"""A feature worker process's backbone and detector (set by `init_worker`)."""


def init_worker(backbone: bytes, detector: str) -> None:
    from fedbell.faces.detection import make_detector
    from fedbell.faces.features import Backbone

    WORKER["backbone"] = Backbone(backbone, num_threads=1)
    WORKER["detector"] = make_detector(detector, max_faces=1)  # type: ignore[arg-type]


def _chip_of(path: Path, key: str, conditions: Conditions, seed: int) -> tuple[Any, bool]:
    import cv2

    from fedbell.faces.conditions import doorbell_conditions
    from fedbell.faces.features import face_chip

    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError(f"{path}: not an image OpenCV can read")
    if conditions == "doorbell":
        image = doorbell_conditions(image, condition_rng(key, seed))
    faces = WORKER["detector"].detect(image)
    if not faces:  # a photo is never taken for a stored chip here, unlike find_chip
        return None, False
    face = largest(faces)
    return face_chip(image, face), face.right_eye is not None


Extracted = tuple[npt.NDArray[np.float32], list[int]]


def _extract(job: tuple[list[tuple[str, str]], Conditions, int]) -> Extracted:
    """Features of (path, key) pairs; a NaN row where no face was found. Flags: 0 none,
    1 face without eyes (box crop), 2 face aligned by the eyes."""
    items, conditions, seed = job
    out = np.full((len(items), WORKER["backbone"].size), np.nan, np.float32)
    flags = []
    for i, (path, key) in enumerate(items):
        chip, eyes = _chip_of(Path(path), key, conditions, seed)
        if chip is not None:
            out[i] = WORKER["backbone"].features([chip])[0]
        flags.append(0 if chip is None else 2 if eyes else 1)
    return out, flags


@dataclass
class CachedFeatures:
    """Features and detector flags per key, kept in an npz file between runs (the backbone
    never changes within a lineage, so a feature is computed once)."""

    path: Path
    features: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    flags: dict[str, int] = field(default_factory=dict)

    def load(self) -> Self:
        """What earlier runs computed (nothing on the first run)."""
        if self.path.exists():
            with np.load(self.path) as data:
                keys = [str(key) for key in data["keys"]]
                self.features.update(zip(keys, data["features"], strict=True))
                self.flags.update(zip(keys, (int(flag) for flag in data["flags"]), strict=True))
                self._load_more(keys, data)
        return self

    def _load_more(self, keys: list[str], data: Any) -> None:
        """Columns a kind of cache keeps beside the features and flags."""

    def _more(self, keys: list[str]) -> dict[str, npt.NDArray[Any]]:
        return {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.features)
        tmp = self.path.with_suffix(".tmp.npz")
        columns: dict[str, Any] = {
            "keys": np.asarray(keys),
            "features": np.asarray([self.features[k] for k in keys], np.float32),
            "flags": np.asarray([self.flags[k] for k in keys], np.int64),
            **self._more(keys),
        }
        np.savez(tmp, **columns)
        tmp.replace(self.path)


@dataclass
class FeatureCache(CachedFeatures):
    """Features per photo key for one (conditions, seed, backbone): an npz under reports/cache."""

    @classmethod
    def open(
        cls, folder: Path, conditions: Conditions, seed: int, backbone_sha: str
    ) -> FeatureCache:
        tag = "clean" if conditions == "clean" else f"{conditions}-s{seed}"
        return cls(folder / f"openset-{tag}-{backbone_sha[:16]}.npz").load()


def extract_features(
    photos: Sequence[Photo],
    cache: FeatureCache,
    backbone: bytes,
    *,
    conditions: Conditions,
    seed: int,
    detector: str,
    jobs: int,
    chunk: int = 100,
) -> None:
    """Fill `cache` with the photos it lacks, `jobs` processes at a time, saving as it goes."""
    missing = [p for p in photos if p.key not in cache.features]
    if not missing:
        return
    print(f"  computing features of {len(missing)} photos ({conditions}, seed {seed})", flush=True)
    batches = [
        ([(str(p.path), p.key) for p in missing[i : i + chunk]], conditions, seed)
        for i in range(0, len(missing), chunk)
    ]

    def store(batch: tuple[list[tuple[str, str]], Conditions, int], result: Extracted) -> int:
        rows, flags = result
        for (_, key), row, flag in zip(batch[0], rows, flags, strict=True):
            cache.features[key] = row
            cache.flags[key] = flag
        return len(batch[0])

    pool = (backbone, detector, jobs)
    compute_in_workers(batches, _extract, store, cache, pool, unit="photos", save_every=1000)


Batch = TypeVar("Batch", bound=tuple[Any, ...])
Result = TypeVar("Result")


def compute_in_workers(
    batches: Sequence[Batch],
    work: Callable[[Batch], Result],
    store: Callable[[Batch, Result], int],
    cache: CachedFeatures,
    pool: tuple[bytes, str, int],
    *,
    unit: str,
    save_every: int,
) -> None:
    """`work` on every batch (its first element: the items) in `jobs` spawned processes,
    each with its own backbone and detector (`WORKER`); `store` puts a batch's result in
    `cache` and says how many items it held; saved as it goes. `pool`: (backbone,
    detector, jobs)."""
    backbone, detector, jobs = pool
    total = sum(len(batch[0]) for batch in batches)
    started = time.perf_counter()
    done = 0
    with ProcessPoolExecutor(
        jobs,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(backbone, detector),
    ) as workers:
        for batch, result in zip(batches, workers.map(work, batches), strict=True):
            stored = store(batch, result)
            done += stored
            if done % save_every < stored or done == total:
                cache.save()
                rate = done / (time.perf_counter() - started)
                print(f"    {done}/{total}  {rate:.1f} {unit}/s", flush=True)
    cache.save()


# --- doorbell timings ------------------------------------------------------------------------


def time_doorbell(
    photos: Sequence[Photo],
    backbone: bytes,
    head: Weights,
    *,
    conditions: Conditions,
    seed: int,
    detector: str,
    repeats: int = 5,
) -> tuple[float, float, float, float]:
    """ms to enrol a person from 5 photos and ms per face on one thread of this machine:
    medians, then bests (the best is what an unshared core would take).

    Both count what the doorbell does per photo (detect, align, backbone, head)
    and, for enrolment, the prototype; not reading the file or the degradation
    (that stands for the camera).
    """
    import cv2

    from fedbell.faces.conditions import doorbell_conditions
    from fedbell.faces.features import face_chip

    init_worker(backbone, detector)
    images = []
    for photo in photos:
        image = cv2.imread(str(photo.path), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{photo.path}: not an image OpenCV can read")
        if conditions == "doorbell":
            image = doorbell_conditions(image, condition_rng(photo.key, seed))
        images.append(image)

    def features_of(image: Any) -> Features | None:
        faces = WORKER["detector"].detect(image)
        if not faces:
            return None
        chip = face_chip(image, largest(faces))
        return embed(WORKER["backbone"].features([chip]), head)

    per_face = []
    for image in images:
        for _ in range(repeats):
            started = time.perf_counter()
            features_of(image)
            per_face.append(1000 * (time.perf_counter() - started))
    enrol = []
    for _ in range(repeats):
        started = time.perf_counter()
        found = [f for f in (features_of(i) for i in images[:ENROL_PER_PERSON]) if f is not None]
        if found:
            prototype(np.concatenate(found))
        enrol.append(1000 * (time.perf_counter() - started))
    return statistics.median(enrol), statistics.median(per_face), min(enrol), min(per_face)


def start_model(trainable: Trainable = "head") -> Weights:
    """Version 0 of every lineage: dlib's own final projection, after dlib's own last
    level when the doorbells train that level too (`fedbell.faces.last_level`)."""
    from fedbell.faces import dlib_resnet, last_level

    return last_level.start_model(dlib_resnet.load(), with_level=trainable == "last_level")


def backbone_model(cache: Path, trainable: Trainable = "head") -> bytes:
    """The float backbone the aggregator ships (converted once, cached): the whole network,
    or the network cut before the last level when the doorbells train that level."""
    from aggregator.backbone import backbone_models

    return backbone_models(cache, until_last_level=trainable == "last_level").float_model
