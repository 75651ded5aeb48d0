"""The camera side of a doorbell node: frames → faces → recognizer → events.

It shares the node's MQTT client (events go out on the same connection whose
last will marks the doorbell offline), the node's recognizer (hot-swapped on
every new backbone, head or gallery change) and its gallery (a label adds the
visit's chip to it at once), and runs the pipeline in its own thread so a
slow camera never delays training or model updates.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from edge.camera import ReconnectingSource, open_source
from edge.config import EdgeConfig
from edge.events import EventPublisher
from edge.feedback import RecentCrops
from edge.gallery import Gallery, StrangerStore
from edge.gpio import watch_button
from edge.homeassistant import DoorbellTopics
from edge.pipeline import Pipeline
from edge.recognition_config import DetectionConfig
from edge.recognizer import Recognizer
from fedbell.faces.detection import BlazeFaceDetector, Detector, DetectorError, HaarDetector
from fedbell.redact import redact

log = logging.getLogger(__name__)


def make_detector(config: DetectionConfig) -> Detector:
    """The configured detector; BlazeFace falls back to Haar (with a warning) if it cannot load.

    A doorbell would rather see faces without eyes (chips cut from the box) than none.
    """

    def haar() -> Detector:
        return HaarDetector(
            downscale=config.downscale,
            min_face_px=config.min_face_px,
            scale_factor=config.scale_factor,
            min_neighbors=config.min_neighbors,
            max_faces=config.max_faces,
            cascade=config.cascade,
        )

    if config.kind == "haar":
        return haar()
    try:
        return BlazeFaceDetector(
            config.model, max_faces=config.max_faces, min_score=config.min_score
        )
    except DetectorError as err:
        log.warning("BlazeFace unavailable (%s); falling back to Haar, without eyes", err)
        return haar()


def make_publisher(
    config: EdgeConfig, client: mqtt.Client, status_topic: str, gallery: Gallery
) -> EventPublisher:
    """The doorbell's events, commands and Home Assistant discovery, as configured."""
    ha = config.home_assistant
    recognition = config.recognition
    return EventPublisher(
        client,
        DoorbellTopics(config.device_id, ha.topic_root, ha.discovery_prefix),
        status_topic,
        RecentCrops(recognition.event_crops_max, recognition.event_crops_max_age_s),
        gallery,
        device_name=ha.device_name,
        discovery=ha.enabled,
        snapshots=recognition.snapshot,
        snapshot_quality=recognition.snapshot_quality,
    )


class LiveDoorbell:
    def __init__(
        self,
        config: EdgeConfig,
        client: mqtt.Client,
        recognizer: Recognizer,
        status_topic: str,
        *,
        gallery: Gallery,
        strangers: StrangerStore | None = None,
        on_gallery_changed: Callable[[], object] | None = None,
    ) -> None:
        self.config = config
        recognition = config.recognition
        self.publisher = make_publisher(config, client, status_topic, gallery)
        self.publisher.on_labelled = on_gallery_changed
        if strangers is not None:
            self.publisher.on_named = strangers.forget
        # A replay runs on its own time, with the replay's visit timeout and debounce.
        replays = config.camera.replays
        self.pipeline = Pipeline(
            make_detector(config.detection),
            recognizer,
            self.publisher,
            recognition.for_replay(config.camera.fps) if replays else recognition,
            frame_period_s=1.0 / config.camera.fps if replays else None,
            on_stranger=None if strangers is None else strangers.add,
        )
        self.publisher.on_ring_command = lambda: self.pipeline.ring("command")
        self.publisher.attach()
        self._source: ReconnectingSource | None = None
        self._button: Any = None
        self._thread: threading.Thread | None = None

    def subscriptions(self) -> list[tuple[str, int]]:
        return self.publisher.subscriptions()

    def connected(self) -> None:
        """After each (re)connect: discovery again (the broker may have lost it), and
        presence OFF unless someone is at the door now (a crash or an earlier run may
        have left ON retained)."""
        self.publisher.announce()
        running = self._thread is not None and self._thread.is_alive()
        if not (running and self.pipeline._seen.present):
            self.publisher.present(False)

    def start(self, stop: threading.Event) -> None:
        self._source = open_source(self.config.camera)
        pin = self.config.recognition.ring_button_pin
        if pin is not None:
            self._button = watch_button(pin, lambda: self.pipeline.ring("button"))
        self._thread = threading.Thread(
            target=self._run, args=(self._source, stop), name="live-recognition", daemon=True
        )
        self._thread.start()

    def _run(self, source: ReconnectingSource, stop: threading.Event) -> None:
        try:
            self.pipeline.run(source, stop)
        except Exception:  # the node keeps training and updating; the status says so
            log.exception("live recognition stopped")
        else:
            camera = self.config.camera
            if not stop.is_set() and source.status.state == "ended":
                replayed = camera.folder if camera.kind == "folder" else "the video"
                log.info(
                    "camera: the replay of %s ended after %d frames (camera.loop is off): "
                    "live recognition stopped",
                    redact(str(replayed)),
                    self.pipeline.counters.frames,
                )
        finally:
            source.close()
            # Nobody is "present" at a door nobody watches (Home Assistant keeps the
            # retained state): whether the replay ended, the camera loop failed or the
            # node is stopping (it joins this thread before it disconnects).
            self.publisher.present(False)

    def detail(self) -> str:
        """Camera state for the retained status (the frame rate goes to systemd's
        status line instead: it changes every second)."""
        if self._source is None:
            return "camera not started"
        status = self._source.status
        alive = self._thread is not None and self._thread.is_alive()
        text = f"camera {status.state}" if alive else "live recognition stopped"
        if status.last_error:
            text += f" ({status.last_error})"
        return text

    def close(self) -> None:
        if self._button is not None:
            self._button.close()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            if self._thread.is_alive():  # stuck in a camera read: clear presence anyway
                self.publisher.present(False)
