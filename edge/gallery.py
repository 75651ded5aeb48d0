"""The doorbell's gallery: `<gallery>/<person>/<image>`, and its backbone features.

Enrollment, the enroll CLI and the label feedback write aligned 150×150 chips
here (as BGR PNGs, OpenCV's convention); any other photo dropped in by hand is
detected and aligned when it is first read. Recognition and training only need
each image's backbone features, computed once and cached in the state folder,
keyed by file name, size, modification time and the backbone's sha256: a new
image or a new backbone costs one pass over what changed, nothing else.

Changes made by another process (`python -m edge enroll` beside a running
doorbell) are noticed through `signature()`: the modification times of the
gallery folder and each person's folder, a handful of `stat` calls.

The gallery and the stranger store never leave the house: only head deltas
learnt from them do.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from edge.state import write_atomically
from fedbell.faces.align import CHIP_SIZE, chip_from_box
from fedbell.faces.dataset import IMAGE_SUFFIXES
from fedbell.faces.detection import Detector
from fedbell.faces.embedding import Features, LabelIds
from fedbell.faces.features import Backbone, Chip, find_chip, is_chip, read_photo
from fedbell.faces.histograms import calibrates
from fedbell.faces.openset import UNKNOWN

log = logging.getLogger(__name__)

FEATURE_CACHE = "gallery-features.npz"
INCOMING = "incoming-features"
"""Features the enroll CLI computed for a running doorbell (state folder)."""
STRANGER_STORE = "strangers.npz"
StrangerPart = Literal["all", "train", "calibrate"]
IGNORE = "ignore"
"""A label that discards an event's chip instead of storing it (never a person's name)."""

_PERSON = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


MIN_LEGACY_SIDE = 24
"""The closed-set version never stored a crop smaller than this (its smallest face was 8 px
at half scale, widened)."""
LEGACY_MARGIN = 0.1
"""The closed-set version's crop: the Haar box widened by this much per side (crop_face)."""


def legacy_box(side: int) -> tuple[float, float, float, float]:
    """The Haar box inside a closed-set enrollment crop of `side` pixels."""
    width = side / (1.0 + 2.0 * LEGACY_MARGIN)
    offset = (side - width) / 2.0
    return offset, offset, width, width


class GalleryError(ValueError):
    """A gallery request that cannot be carried out; the message says what and where."""


def check_person_name(name: object) -> str:
    """A gallery folder name: 1-64 letters, digits, '_' or '-', so no path tricks."""
    if (
        not isinstance(name, str)
        or not _PERSON.fullmatch(name)
        or name.lower() in {UNKNOWN, IGNORE}
    ):
        raise GalleryError(
            f"person name {name!r} must be 1-64 letters, digits, '_' or '-' "
            f"(and not '{UNKNOWN}' or '{IGNORE}')"
        )
    return name


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


@dataclass(frozen=True)
class GalleryFeatures:
    """The gallery as the recogniser and the trainer see it: one row per usable image."""

    persons: tuple[str, ...]
    """Enrolled persons with at least one usable image, sorted."""
    labels: LabelIds
    """Row → index into `persons` (the house's own ids, never sent)."""
    features: Features
    files: tuple[str, ...]
    """Row → `<person>/<image>`."""
    backbone: str
    """sha256 of the backbone that computed them."""
    skipped: tuple[str, ...] = ()
    """Images without a usable face (kept on disk, left out here)."""

    def __len__(self) -> int:
        return len(self.files)


def _cache_key(path: Path, relative: str) -> str:
    stat = path.stat()
    return f"{relative}|{stat.st_size}|{stat.st_mtime_ns}"


class Gallery:
    """A gallery folder (which may not exist yet) and its feature cache."""

    def __init__(
        self,
        root: Path,
        state_dir: Path | None = None,
        detector: Callable[[], Detector] | None = None,
    ) -> None:
        self.root = root
        self.cache_path = None if state_dir is None else state_dir / FEATURE_CACHE
        self._make_detector = detector
        self._detector: Detector | None = None
        self._lock = threading.Lock()  # one feature pass at a time; the cache file is ours
        self._memory: dict[str, np.ndarray] = {}  # cache key -> features (one backbone)
        self._memory_backbone = ""
        self._no_face: set[str] = set()  # cache keys already reported as faceless

    # --- listing -----------------------------------------------------------------

    def persons(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _visible(p))

    def images(self, person: str) -> list[Path]:
        """A person's images, newest first (by modification time, then name)."""
        folder = self.root / person
        if not folder.is_dir():
            return []
        found = [
            p
            for p in folder.iterdir()
            if p.is_file() and _visible(p) and p.suffix.lower() in IMAGE_SUFFIXES
        ]
        return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)

    def count(self) -> int:
        """Images in the gallery, all persons; 0 for a missing folder."""
        return sum(len(self.images(person)) for person in self.persons())

    def signature(self) -> tuple[tuple[str, int], ...]:
        """Cheap change check: the modification times of the gallery and person folders.

        Adding, removing or renaming a file changes its folder's mtime, so an
        enrollment by another process shows here without reading any image.
        """
        try:
            if not self.root.is_dir():
                return ()
            marks = [("", self.root.stat().st_mtime_ns)]
            for entry in sorted(self.root.iterdir()):
                if entry.is_dir() and _visible(entry):
                    marks.append((entry.name, entry.stat().st_mtime_ns))
        except OSError:  # a folder removed while we looked: report a change, look again
            return (("?", time.monotonic_ns()),)
        return tuple(marks)

    # --- writing -----------------------------------------------------------------

    def add(
        self,
        person: str,
        chips: Sequence[Chip],
        prefix: str = "",
        backbone: Backbone | None = None,
    ) -> list[Path]:
        """Store aligned chips of `person`; returns their paths (GalleryError on bad input).

        With `backbone` (the enroll CLI, another process than the doorbell), the
        chips' features are computed *before* the chips appear, and left in the
        state folder for the running doorbell (`incoming-features/`): on a Pi a
        backbone pass costs a fraction of a second per chip, and the doorbell
        should name the person as soon as the chips are there.
        """
        check_person_name(person)
        for i, chip in enumerate(chips):
            if chip.shape != (CHIP_SIZE, CHIP_SIZE, 3) or chip.dtype != np.uint8:
                raise GalleryError(
                    f"chip {i} for {person!r} is {chip.shape} {chip.dtype}, expected an aligned "
                    f"{CHIP_SIZE}x{CHIP_SIZE} RGB uint8 chip"
                )
        folder = self.root / person
        folder.mkdir(parents=True, exist_ok=True)
        stamp = prefix or time.strftime("%Y%m%d-%H%M%S")
        # Written under hidden names first (the gallery ignores them), renamed last:
        # a running doorbell never reads half a PNG, and a rename keeps the mtime,
        # so the cache keys of the features computed meanwhile stay valid.
        hidden: list[tuple[Path, Path]] = []
        try:
            for i, chip in enumerate(chips):
                path = folder / f"{stamp}-{time.monotonic_ns() % 10**9:09d}-{i:03d}.png"
                ok, png = cv2.imencode(".png", cv2.cvtColor(chip, cv2.COLOR_RGB2BGR))
                if not ok:
                    raise GalleryError(f"could not encode chip {i} for {path}")
                temporary = path.with_name(f".{path.name}.tmp")
                write_atomically(temporary, png.tobytes())
                hidden.append((temporary, path))
            if backbone is not None and chips:
                keys = [_cache_key(t, f"{person}/{final.name}") for t, final in hidden]
                self._leave_features(backbone, keys, backbone.features(list(chips)))
            for temporary, path in hidden:
                temporary.replace(path)
        finally:
            for temporary, _ in hidden:
                temporary.unlink(missing_ok=True)
        saved = [path for _, path in hidden]
        log.info("gallery: %d chip(s) of %s added", len(saved), person)
        return saved

    def _leave_features(self, backbone: Backbone, keys: list[str], features: Features) -> None:
        """Features for the running doorbell to pick up instead of computing them."""
        if self.cache_path is None:
            return
        folder = self.cache_path.parent / INCOMING
        data = _npz(backbone=np.array(backbone.sha256), keys=np.array(keys), features=features)
        try:
            write_atomically(folder / f"{time.time_ns()}-{os.getpid()}.npz", data)
        except OSError as err:  # the doorbell computes them itself, a little later
            log.warning("gallery: could not leave features in %s: %s", folder, err)

    def _take_incoming(self, backbone: str) -> set[str]:
        """Merge features another process left for this backbone; the keys taken."""
        taken: set[str] = set()
        if self.cache_path is None:
            return taken
        folder = self.cache_path.parent / INCOMING
        if not folder.is_dir():
            return taken
        for path in sorted(folder.glob("*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    if str(data["backbone"]) == backbone:
                        for key, row in zip(data["keys"], data["features"], strict=True):
                            self._memory[str(key)] = np.asarray(row, np.float32)
                            taken.add(str(key))
            except (OSError, ValueError, KeyError) as err:
                log.warning("gallery: ignoring %s: %s", path, err)
            path.unlink(missing_ok=True)  # taken, for another backbone, or unreadable
        return taken

    def remove(self, person: str) -> int:
        """Delete a person's folder; returns how many images it held (GalleryError if absent)."""
        check_person_name(person)
        folder = self.root / person
        if not folder.is_dir():
            raise GalleryError(f"{person!r} is not enrolled in {self.root}")
        count = len(self.images(person))
        shutil.rmtree(folder)
        log.info("gallery: %s removed (%d images)", person, count)
        return count

    # --- features ------------------------------------------------------------------

    def read_chip(self, path: Path) -> Chip | None:
        """The aligned RGB chip of a gallery image: as stored, or detected and aligned.

        A square image in which no face is found is taken for what the closed-set
        version's enrollment wrote: the grey Haar box widened by 10 % per side.
        BlazeFace misses about half of those tight crops, and an upgraded
        doorbell should not lose its gallery.
        """
        image = read_photo(path)
        if is_chip(image) and image.ndim == 3 and image.shape[2] == 3:
            return np.ascontiguousarray(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
        if self._detector is None:
            if self._make_detector is None:
                raise GalleryError(f"{path}: not a {CHIP_SIZE}x{CHIP_SIZE} chip and no detector")
            self._detector = self._make_detector()
        chip = find_chip(image, self._detector)
        if chip is None and image.shape[0] == image.shape[1] >= MIN_LEGACY_SIDE:
            log.info("gallery: %s has no face a detector finds; read as a legacy crop", path)
            return chip_from_box(image, legacy_box(image.shape[0]))
        return chip

    def features(self, backbone: Backbone, max_per_person: int | None = None) -> GalleryFeatures:
        """Backbone features of the newest `max_per_person` images of every person.

        Only images not seen before with this backbone are read and run; an
        image without a face or that cannot be read is logged once and left
        out (it stays on disk: nothing is lost).
        """
        with self._lock:
            if self._memory_backbone != backbone.sha256:
                self._memory = self._load_cache(backbone.sha256)
                self._memory_backbone = backbone.sha256
            incoming = self._take_incoming(backbone.sha256)
            rows: list[tuple[str, str, str]] = []  # (person, relative path, cache key)
            skipped: list[str] = []
            todo: list[tuple[str, Chip]] = []
            for person in self.persons():
                for path in self.images(person)[:max_per_person]:
                    relative = f"{person}/{path.name}"
                    try:
                        key = _cache_key(path, relative)
                        if key not in self._memory and key not in self._no_face:
                            chip = self.read_chip(path)
                            if chip is None:
                                log.warning("gallery: no face in %s; left out", path)
                                self._no_face.add(key)
                            else:
                                todo.append((key, chip))
                    except (OSError, ValueError) as err:  # removed meanwhile, unreadable
                        log.warning("gallery: skipping %s: %s", path, err)
                        skipped.append(relative)
                        continue
                    if key in self._no_face:
                        skipped.append(relative)
                    else:
                        rows.append((person, relative, key))
            if todo:
                computed = backbone.features([chip for _, chip in todo])
                for (key, _), row in zip(todo, computed, strict=True):
                    self._memory[key] = row
            if todo or incoming:
                # Incoming keys stay even if their chips are not visible yet (renamed last).
                self._save_cache(backbone.sha256, {k for _, _, k in rows} | incoming)
            persons = tuple(sorted({person for person, _, _ in rows}))
            index = {name: i for i, name in enumerate(persons)}
            features = (
                np.stack([self._memory[key] for _, _, key in rows]).astype(np.float32)
                if rows
                else np.zeros((0, backbone.size), np.float32)
            )
            return GalleryFeatures(
                persons=persons,
                labels=np.array([index[p] for p, _, _ in rows], dtype=np.int64),
                features=features,
                files=tuple(relative for _, relative, _ in rows),
                backbone=backbone.sha256,
                skipped=tuple(skipped),
            )

    def _load_cache(self, backbone: str) -> dict[str, np.ndarray]:
        if self.cache_path is None or not self.cache_path.is_file():
            return {}
        try:
            with np.load(self.cache_path, allow_pickle=False) as data:
                if str(data["backbone"]) != backbone:
                    log.info("gallery: new backbone; features are computed again")
                    return {}
                keys, features = data["keys"], data["features"]
                pairs = zip(keys, features, strict=True)
                return {str(k): np.asarray(f, np.float32) for k, f in pairs}
        except (OSError, ValueError, KeyError) as err:
            log.warning("gallery: cache %s unreadable (%s); recomputing", self.cache_path, err)
            return {}

    def _save_cache(self, backbone: str, keep: set[str]) -> None:
        """Keep only the rows of images that still exist, so the cache does not grow."""
        self._memory = {k: v for k, v in self._memory.items() if k in keep}
        if self.cache_path is None or not self._memory:
            return
        keys = sorted(self._memory)
        buffer = _npz(
            backbone=np.array(backbone),
            keys=np.array(keys),
            features=np.stack([self._memory[k] for k in keys]).astype(np.float32),
        )
        try:
            write_atomically(self.cache_path, buffer)
        except OSError as err:  # recognition goes on; the next pass recomputes
            log.error("gallery: could not write the feature cache %s: %s", self.cache_path, err)


def _npz(**arrays: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    return buffer.getvalue()


class StrangerStore:
    """Backbone features of recent visitors nobody enrolled: the training negatives.

    Bounded (the oldest go first) and tied to one backbone: features from
    another backbone mean nothing to a head, so a new backbone empties it.
    Each row keeps its visitor event's id, so a label that names the visitor
    takes them out again (a resident must not train as their own stranger).
    Kept in the state folder, never sent anywhere.
    """

    def __init__(self, path: Path | None, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self._lock = threading.Lock()
        self._backbone = ""
        self._rows = np.zeros((0, 0), np.float32)
        self._events = np.zeros(0, dtype="<U64")
        self._load()

    def _load(self) -> None:
        if self.path is None or not self.path.is_file():
            return
        try:
            with np.load(self.path, allow_pickle=False) as data:
                backbone = str(data["backbone"])
                rows = np.asarray(data["features"], np.float32)
                events = np.asarray(data["events"], dtype="<U64")
        except (OSError, ValueError, KeyError) as err:
            log.warning("strangers: %s unreadable (%s); starting empty", self.path, err)
            return
        if len(rows) != len(events):
            log.warning("strangers: %s is inconsistent; starting empty", self.path)
            return
        self._backbone = backbone
        self._rows, self._events = rows[-self.capacity :], events[-self.capacity :]
        if self.capacity == 0:
            self._rows, self._events = rows[:0], events[:0]

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, backbone: str, features: Features, event_id: str = "") -> None:
        if self.capacity == 0 or len(features) == 0:
            return
        rows = np.asarray(features, np.float32).reshape(len(features), -1)
        with self._lock:
            if backbone != self._backbone or self._rows.shape[1:] != rows.shape[1:]:
                self._backbone = backbone
                self._rows = np.zeros((0, rows.shape[1]), np.float32)
                self._events = np.zeros(0, dtype="<U64")
            self._rows = np.concatenate([self._rows, rows])[-self.capacity :]
            ids = np.full(len(rows), event_id[:64], dtype="<U64")
            self._events = np.concatenate([self._events, ids])[-self.capacity :]
            self._save()

    def forget(self, event_id: str) -> int:
        """Drop the features of this visitor event (now named); how many rows went."""
        with self._lock:
            keep = self._events != event_id[:64]
            dropped = int(len(keep) - keep.sum())
            if event_id and dropped:
                self._rows, self._events = self._rows[keep], self._events[keep]
                self._save()
        return dropped if event_id else 0

    def _save(self) -> None:
        """Called with the lock held: small (a few hundred rows), so rewritten whole."""
        if self.path is None:
            return
        snapshot = _npz(backbone=np.array(self._backbone), features=self._rows, events=self._events)
        try:
            write_atomically(self.path, snapshot)
        except OSError as err:
            log.error("strangers: could not write %s: %s", self.path, err)

    def features(self, backbone: str, size: int, part: StrangerPart = "all") -> Features:
        """The stored features for this backbone ((0, size) for another or none); `part`:
        all of them, or the half that trains or the half that calibrates
        (fedbell/faces/histograms.py `calibrates`)."""
        with self._lock:
            if backbone != self._backbone or self._rows.shape[1:] != (size,):
                return np.zeros((0, size), np.float32)
            rows, events = self._rows.copy(), self._events.copy()
        if part == "all":
            return rows
        calibrating = calibrates(rows, [str(e) for e in events])
        return rows[calibrating if part == "calibrate" else ~calibrating]
