"""The doorbell node's federation side: models in, training on request, updates out.

Threads, and why:
- paho's network thread runs the MQTT callbacks. They only parse, check and
  record; anything slow (training, loading an interpreter, scoring the
  gallery) is queued for the worker, so keep-alives and acknowledgements
  never wait behind TensorFlow.
- one worker thread runs the queued jobs in order: at most one training at a
  time, and a TFLite artifact is installed after the model it belongs to.
- the caller's (main) thread runs `run()`: a loop that waits on the stop
  event, notices gallery changes and pings the systemd watchdog, but only
  while the network, worker and camera threads are alive and none is stuck
  (`edge.health`): systemd then restarts a node that could no longer serve.

Every callback runs guarded: whatever it raises is logged and counted in
`counters`, so a bad message is dropped (and acknowledged, so the broker does
not redeliver it to the next process), never fatal, and never touches the
current model.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge import health
from edge.artifacts import Artifacts, leave_one_out
from edge.backbone_download import BackboneDownload, refuse_older_lineage
from edge.config import EdgeConfig
from edge.events import EventPublisher
from edge.gallery import STRANGER_STORE, Gallery, GalleryFeatures, StrangerStore
from edge.live import LiveDoorbell, make_detector, make_publisher
from edge.plan import check_announcement
from edge.recognizer import Head, Recognizer, RecognizerError
from edge.secure import SecureParticipant
from edge.state import NodeState
from edge.trainer import TrainedDelta, round_seed, train_delta
from fedbell import systemd
from fedbell.errors import ConfigError, RejectedMessage
from fedbell.faces.embedding import Features, TrainParams
from fedbell.redact import redact
from fedbell.wire import signing
from fedbell.wire.codecs import TENSOR_CODECS, Weights, model_decode_limit
from fedbell.wire.messages import (
    AGGREGATOR,
    GlobalModel,
    Signer,
    build_update,
    parse_global,
)
from fedbell.wire.mqtt import connect, make_client
from fedbell.wire.protocol import (
    MAX_ROUND_BYTES,
    DeviceStatus,
    RoundAnnouncement,
    parse_json,
    to_json,
)
from fedbell.wire.sparsify import with_error_feedback
from fedbell.wire.topics import Topics

log = logging.getLogger(__name__)

TICK_S = 1.0
"""Main-loop period: the watchdog ping and the stop check happen this often."""
GALLERY_POLL_S = 0.2
"""How often the gallery watcher looks for an enrollment, removal or label: a
few `stat` calls, so a person enrolled by `python -m edge enroll` is known well
within a second."""
CONNECT_WAIT_S = 10.0
"""How long start-up waits for the broker before declaring itself ready anyway:
the doorbell must recognise visitors even while the broker is down."""
OFFLINE_PUBLISH_WAIT_S = 5.0
BACKGROUND_NICE = 10
"""Niceness added to the worker and gallery threads (Linux schedules threads, so
it is theirs alone): training, backbone installs and gallery scoring yield the
CPU to the camera thread; measured by `make bench-edge` (issue 12)."""


def lower_thread_priority(increment: int = BACKGROUND_NICE) -> None:
    """Make the calling thread nicer; a failure only costs frames, so it is logged."""
    try:
        tid = threading.get_native_id()
        niceness = min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        os.setpriority(os.PRIO_PROCESS, tid, niceness)
    except OSError as err:
        log.warning("%s keeps its priority: %s", threading.current_thread().name, err)


Job = Callable[[], None]


@dataclass(frozen=True)
class HeldUpdate:
    """An encoded update, until it is sent (perhaps held for its round's send phase)."""

    round: int
    payload: bytes
    residual: Weights | None = None
    """Top-k only: what this update leaves out, kept once the update is sent."""


def load_signer(config: EdgeConfig) -> Signer:
    path = config.signing.private_key_file
    if path is None:
        return Signer(config.device_id)
    return Signer(config.device_id, signing.load_private_key(path))


def load_trusted_keys(config: EdgeConfig) -> dict[str, Ed25519PublicKey] | None:
    """The aggregator's public key, if models must be signed (None: accept unsigned)."""
    folder = config.signing.trusted_keys_dir
    if folder is None:
        return None
    keys = signing.load_public_keys(folder)
    if AGGREGATOR not in keys:
        raise ConfigError(f"{folder}: no {AGGREGATOR}.pub, so no global model could verify")
    return dict(keys)


class EdgeNode:
    """One doorbell's MQTT client, model state and training worker."""

    def __init__(self, config: EdgeConfig, recognizer: Recognizer | None = None) -> None:
        self.config = config
        self.device = config.device_id
        self.topics = Topics(config.site, config.mqtt.topic_root)
        self.state = NodeState(config.state_dir)
        self.gallery = Gallery(
            config.gallery_dir, config.state_dir, detector=lambda: make_detector(config.detection)
        )
        self.strangers = StrangerStore(
            config.state_dir / STRANGER_STORE, config.training.max_strangers
        )
        self.signer = load_signer(config)
        self.trusted_keys = load_trusted_keys(config)
        self.recognizer = recognizer or Recognizer(
            threshold_override=config.recognition.threshold,
            default_threshold=config.recognition.default_threshold,
            num_threads=config.inference.threads,
        )
        self.counters: Counter[str] = Counter()
        """Dropped messages and failed jobs, by reason."""
        self.limits = health.Limits()
        """How long a callback, a worker job or a camera read may run (watchdog)."""
        self._callback_activity = health.Activity()
        self._job_activity = health.Activity()
        self.trainings = 0
        self.artifacts = Artifacts(
            config,
            self.recognizer,
            state=self.state,
            gallery=self.gallery,
            counters=self.counters,
            on_scored=self._publish_status_if_connected,
        )
        self.backbone = BackboneDownload(
            self.topics,
            self.artifacts,
            self.counters,
            keys=self.trusted_keys,
            max_bytes=config.mqtt.max_message_bytes,
            install=lambda artifact: self._jobs.put(lambda: self.artifacts.install(artifact)),
            current=lambda: self._model,
        )
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        """Set once the broker acknowledged the subscriptions of the current connection."""

        # Guards the fields below; notified when a new global model arrives.
        self._changed = threading.Condition()
        self._model: GlobalModel | None = self.state.load_global()
        if self._model is not None:
            self._give_head(self._model)
        self._last_round = self.state.load_last_round()
        self._rounds_taken: set[int] = set()  # queued, training or held
        self._held: HeldUpdate | None = None
        # The last update sent. Mosquitto acknowledges a QoS 1 publish before it
        # saves it, and a broker restart can lose the aggregator's subscription,
        # so an acknowledged update can still be lost. The round message comes
        # again exactly then (the node resubscribes, the aggregator republishes
        # on reconnect): if its round is still open, the node sends the update
        # once more, and the aggregator counts a duplicate if it already had it.
        self._sent: HeldUpdate | None = None
        self._send_permitted = 0  # highest round whose send phase has been seen
        self._residual = self.state.load_residual()  # top-k error feedback
        self._last_status: bytes | None = None

        self._stopping = threading.Event()
        self._closed = False
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(
            target=self._work, name=f"{self.device}-worker", daemon=True
        )
        self._watcher = threading.Thread(
            target=self._watch_gallery, name=f"{self.device}-gallery", daemon=True
        )
        self._status_topic = self.topics.status(self.device)
        self.live: LiveDoorbell | None = None  # the camera side, set up once the client exists
        self._client = make_client(
            config.mqtt,
            client_id=self.device,
            will=(self._status_topic, self._status_payload("offline")),
        )
        if config.camera.enabled:
            self.live = LiveDoorbell(
                config,
                self._client,
                self.recognizer,
                self._status_topic,
                gallery=self.gallery,
                strangers=self.strangers,
                on_gallery_changed=self.artifacts.refresh,
            )
        self.secure = SecureParticipant(
            self.device,
            self.topics,
            self.signer.key,
            publish=lambda topic, payload: self._publish_update(topic, payload, "secagg"),
            on_sent=self._record_sent,
        )
        # Without a camera (the demo's doorbells) it is still a doorbell to Home Assistant.
        self.announcer: EventPublisher | None = None
        if self.live is None and config.home_assistant.enabled:
            self.announcer = make_publisher(config, self._client, self._status_topic, self.gallery)
            self.announcer.attach()
        self._said_unreachable = threading.Event()  # once per outage, not per retry
        self._attach_callbacks()

    def _attach_callbacks(self) -> None:
        client = self._client
        client.on_connect = self._guarded(self._on_connect)
        client.on_disconnect = self._guarded(self._on_disconnect)
        client.on_connect_fail = self._guarded(self._on_connect_fail)
        client.on_message = self._guarded(self._on_message)
        client.on_subscribe = self._guarded(self._on_subscribe)

    # --- what tests and the status look at --------------------------------------

    @property
    def model_version(self) -> int | None:
        model = self._model
        return None if model is None else model.version

    @property
    def last_round(self) -> int:
        return self._last_round

    @property
    def held_round(self) -> int | None:
        held = self._held
        return None if held is None else held.round

    @property
    def gallery_accuracy(self) -> float | None:
        return self.artifacts.gallery_accuracy

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Load the stored artifact, start the worker, connect in the background."""
        # Loaded before connecting, so a retained artifact of the same version is
        # rightly skipped as known; if the stored one is unusable, it is not known.
        self.artifacts.load_stored()  # also embeds the gallery with it
        self._worker.start()
        self._watcher.start()
        connect(self._client, self.config.mqtt)

    def _watch_gallery(self) -> None:
        """Enrollment, removal and labels take effect without a round or a restart."""
        lower_thread_priority()
        while not self._stopping.wait(GALLERY_POLL_S):
            try:
                self.artifacts.refresh()
            except Exception:  # never let the watcher die: log, count, look again
                self.counters["gallery_error"] += 1
                log.exception("gallery watcher")

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; the caller's thread is the watchdog's main loop."""
        self.start()
        if self.live is not None:
            self.live.start(stop)
        try:
            deadline = time.monotonic() + CONNECT_WAIT_S
            while not self.connected.is_set() and time.monotonic() < deadline:
                if stop.wait(0.1):
                    return
            if not self.connected.is_set() and not self._said_unreachable.is_set():
                log.warning(
                    "broker %s:%d not reachable yet; recognising offline meanwhile",
                    self.config.mqtt.host,
                    self.config.mqtt.port,
                )
            systemd.notify_ready()
            next_rescan = time.monotonic() + self.config.gallery_rescan_s
            withheld: str | None = None
            while not stop.wait(TICK_S):
                # A dead or stuck thread means no more messages, training or frames:
                # stop pinging and let systemd restart the service rather than limp on.
                problem = self.health_problem()
                if problem is None:
                    systemd.notify_watchdog()
                elif problem != withheld:
                    self.counters["watchdog_withheld"] += 1
                    log.error("not pinging the systemd watchdog: %s", problem)
                    systemd.notify_status(f"unhealthy: {problem}")
                withheld = problem
                if time.monotonic() >= next_rescan:
                    next_rescan = time.monotonic() + self.config.gallery_rescan_s
                    self._publish_status_if_connected()  # only if the gallery size changed
        finally:
            self.close()

    def close(self) -> None:
        """Publish the offline status, disconnect and stop the worker."""
        if self._closed:
            return
        self._closed = True
        systemd.notify_stopping()
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._jobs.put(None)
        if self.live is not None:
            # Before the offline status: its last act (presence OFF) must reach the broker.
            self.live.close()
        if self.connected.is_set():
            info = self._client.publish(
                self._status_topic, self._status_payload("offline"), qos=1, retain=True
            )
            try:
                info.wait_for_publish(OFFLINE_PUBLISH_WAIT_S)
            except (RuntimeError, ValueError) as err:
                log.warning("offline status not sent: %s", err)
        self._client.disconnect()
        self._client.loop_stop()
        # A training in progress cannot be interrupted; the worker is a daemon thread.
        if self._worker.is_alive():
            self._worker.join(OFFLINE_PUBLISH_WAIT_S)

    def health_problem(self) -> str | None:
        """Why the node cannot serve (a dead or stuck thread), or None if it can."""
        problem = health.thread_problem(
            "worker", self._worker, self._job_activity, self.limits.job_s
        ) or health.thread_problem(
            # paho's loop_start() thread; it only ends by loop_stop() or a crash.
            "MQTT network",
            self._client._thread,  # paho keeps it private
            self._callback_activity,
            self.limits.callback_s,
        )
        live = self.live
        if problem is None and live is not None:
            # edge/live.py keeps its thread and source private; read them here
            # rather than change the camera side.
            source = live._source
            problem = health.camera_problem(
                live._thread,
                ended=source is None or source.status.state == "ended",
                last_read=None if source is None else source.last_read,
                limit_s=self.limits.camera_s,
            )
        return problem

    # --- status ----------------------------------------------------------------

    def _status_payload(self, state: str) -> bytes:
        detail = self.artifacts.detail
        if self.live is not None:
            detail = f"{detail}; {self.live.detail()}" if detail else self.live.detail()
        status = DeviceStatus(
            state="online" if state == "online" else "offline",
            model_version=self.model_version,
            gallery_size=self.gallery.count(),
            last_round=self._last_round,
            detail=redact(detail),  # a camera error may quote its URL
        )
        return to_json(status)

    def _publish_status(self, force: bool = False) -> None:
        """Publish the retained online status if anything in it changed."""
        payload = self._status_payload("online")
        with self._changed:
            if payload == self._last_status and not force:
                return
            self._last_status = payload
        self._client.publish(self._status_topic, payload, qos=1, retain=True)
        systemd.notify_status(
            f"model v{self.model_version}, round {self._last_round}, "
            f"{self.gallery.count()} gallery images. {self.artifacts.detail}"
            + (f" {self.live.pipeline.counters.fps:.1f} fps" if self.live is not None else "")
        )

    def _publish_status_if_connected(self) -> None:
        if self.connected.is_set():
            self._publish_status()

    # --- MQTT callbacks (paho's thread) -------------------------------------------

    def _guarded(self, callback: Callable[..., None]) -> Callable[..., None]:
        """No exception may reach paho (its thread would die, the message stay
        unacknowledged); and how long a callback runs is the watchdog's business."""

        def guarded(*args: Any) -> None:
            with self._callback_activity.running(callback.__name__):
                try:
                    callback(*args)
                except Exception:
                    self.counters["callback_error"] += 1
                    log.exception("MQTT callback %s failed (carrying on)", callback.__name__)

        return guarded

    def _on_connect(
        self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        if reason.is_failure:
            log.warning("broker refused the connection: %s", reason)
            return
        self._said_unreachable.clear()
        try:
            # The model before the round: the broker sends retained messages in
            # subscription order, so a late joiner has its base model first.
            client.subscribe(
                [
                    (self.topics.global_model, 1),
                    (self.topics.tflite_model, 1),
                    (self.topics.backbone_chunks, 1),  # after the manifest, as published
                    (self.topics.round, 1),
                    (self.topics.secagg_inbox(self.device), 1),
                    *(self.live.subscriptions() if self.live is not None else []),
                    *(self.announcer.subscriptions() if self.announcer is not None else []),
                ]
            )
            self._publish_status(force=True)  # the broker may hold our last will
            if self.live is not None:
                self.live.connected()
            if self.announcer is not None:
                self.announcer.announce()
            self.connected.set()
            log.info(
                "connected to %s:%d as %s",
                self.config.mqtt.host,
                self.config.mqtt.port,
                self.device,
            )
        except Exception:
            self.counters["connect_error"] += 1
            log.exception("on_connect failed")

    def _on_connect_fail(self, _client: mqtt.Client, _userdata: Any) -> None:
        """Nothing answered at the broker's address: say so at once, once per outage."""
        if not self._said_unreachable.is_set():
            self._said_unreachable.set()
            log.warning(
                "no broker at %s:%d (is it running, on this port?): retrying in the background;"
                " recognising offline meanwhile",
                self.config.mqtt.host,
                self.config.mqtt.port,
            )

    def _on_disconnect(
        self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _properties: Any
    ) -> None:
        self.connected.clear()
        self.subscribed.clear()
        if not self._stopping.is_set():
            log.warning("disconnected from the broker (%s); paho reconnects", reason)

    def _on_subscribe(
        self, _client: mqtt.Client, _userdata: Any, _mid: int, reasons: list[Any], _props: Any
    ) -> None:
        refused = [str(reason) for reason in reasons if reason.is_failure]
        if refused:  # an ACL that denies these means no model will ever arrive: say so loudly
            self.counters["subscribe_refused"] += 1
            log.error("broker refused subscriptions (%s): check the ACL", ", ".join(refused))
            return
        self.subscribed.set()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        handlers: dict[str, Callable[[bytes], None]] = {
            self.topics.global_model: self._on_global,
            self.topics.tflite_model: self.backbone.on_manifest,
            self.topics.round: self._on_round,
            self.topics.secagg_inbox(self.device): self.secure.on_inbox,
        }
        handler = handlers.get(message.topic)
        if handler is None and mqtt.topic_matches_sub(self.topics.backbone_chunks, message.topic):
            handler = functools.partial(self.backbone.on_chunk, message.topic)
        try:
            if handler is None:
                raise RejectedMessage("unexpected_topic", message.topic)
            if not message.payload:
                log.info("%s cleared (empty retained message)", message.topic)
                return
            handler(bytes(message.payload))
        except RejectedMessage as err:
            self.counters[err.reason] += 1
            log.warning("dropped message on %s: %s", message.topic, err)
        except Exception as err:
            self.counters["handler_error"] += 1
            log.exception("error handling %s: %s", message.topic, err)

    def _on_global(self, payload: bytes) -> None:
        current_model = self._model
        model = parse_global(
            payload,
            site=self.config.site,
            max_bytes=self.config.mqtt.max_message_bytes,
            keys=self.trusted_keys,
            # From the shapes this node expects, not from the header's claim.
            max_decoded_bytes=model_decode_limit(
                None if current_model is None else current_model.weights
            ),
        )
        current = self._model
        new_lineage = current is None or model.lineage != current.lineage
        if new_lineage and current is not None:
            refuse_older_lineage(current, model.lineage, model.epoch)
        if not new_lineage and current is not None and model.version <= current.version:
            log.info("global model v%d ignored: already at v%d", model.version, current.version)
            return
        if not new_lineage and current is not None:
            self._refuse_if_worse_on_gallery(current, model)
        # Refused (and counted) before anything changes if its head cannot serve.
        self._give_head(model, strict=True)
        try:
            self.state.save_global(model)
        except OSError as err:  # keep serving; the retained copy restores it after a restart
            self.counters["store_failed"] += 1
            log.error("could not store global model v%d: %s", model.version, err)
        with self._changed:
            if new_lineage:
                self._start_lineage(current, model)
            self._model = model
            self._changed.notify_all()
        log.info(
            "global model v%d from round %d (lineage %s, threshold %.3f)",
            model.version,
            model.round,
            model.lineage,
            model.threshold,
        )
        self._publish_status()

    def _refuse_if_worse_on_gallery(self, current: GlobalModel, model: GlobalModel) -> None:
        """RejectedMessage if the new head serves this house far worse than the installed
        one: leave-one-out on the gallery and the stranger store, open-set at each head's
        own threshold (issue 13 item 1, issue 18 item 2). A new lineage is never refused
        (a reset must not deadlock), nor is a gallery too small to score."""
        drop = self.config.accept.max_gallery_accuracy_drop
        features = self.artifacts.gallery_features
        if drop is None or features is None or model.backbone != current.backbone:
            return
        if model.weights[0].shape[:1] != features.features.shape[1:]:
            return  # a head that cannot take these features: _give_head refuses it (bad_shapes)
        backbone = self.recognizer.backbone
        strangers = (
            None if backbone is None else self.strangers.features(backbone.sha256, backbone.size)
        )
        before = leave_one_out(features, current.weights, current.threshold, strangers)
        after = leave_one_out(features, model.weights, model.threshold, strangers)
        if before is None or after is None or after >= before - drop:
            return
        raise RejectedMessage(
            "worse_on_gallery",
            f"global model v{model.version} decides {after:.0%} of this gallery and its "
            f"strangers right at its threshold {model.threshold:.3f} (leave-one-out), "
            f"v{current.version} {before:.0%}: more than {drop:.0%} worse "
            f"(accept.max_gallery_accuracy_drop); keeping v{current.version}",
        )

    def _give_head(self, model: GlobalModel, strict: bool = False) -> None:
        """Hand a global model's head and threshold to the recognizer."""
        head = Head(
            weights=model.weights,
            version=model.version,
            lineage=model.lineage,
            backbone=model.backbone,
            threshold=model.threshold,
        )
        try:
            self.recognizer.set_head(head)
        except RecognizerError as err:
            if strict:
                raise RejectedMessage("bad_shapes", str(err)) from None
            self.counters["bad_shapes"] += 1
            log.warning("stored model v%d unusable: %s", model.version, err)

    def _start_lineage(self, current: GlobalModel | None, model: GlobalModel) -> None:
        """A reset or an upgrade: the old lineage's rounds, update and residual mean nothing.

        Called with `_changed` held.
        """
        log.info(
            "new lineage %s (was %s): accepting v%d, dropping the old model's round state",
            model.lineage,
            None if current is None else current.lineage,
            model.version,
        )
        self._held = self._sent = None
        self._rounds_taken.clear()
        self._send_permitted = 0
        self._last_round = 0
        self._residual = None
        try:
            self.state.save_last_round(0)
            self.state.clear_residual()
        except OSError as err:
            self.counters["store_failed"] += 1
            log.error("could not reset the round state: %s", err)

    def _on_round(self, payload: bytes) -> None:
        announcement = parse_json(payload, RoundAnnouncement, max_bytes=MAX_ROUND_BYTES)
        # Before anything is recorded or queued: a forged or unsigned round (when
        # signing is configured) or one asking for a plan out of bounds is refused.
        check_announcement(
            announcement,
            site=self.config.site,
            aggregator_key=None if self.trusted_keys is None else self.trusted_keys[AGGREGATOR],
            require_signature=self.trusted_keys is not None,
            limits=self.config.accept,
        )
        if announcement.secagg is not None:
            self._on_secure_round(announcement)
        else:
            self._on_plain_round(announcement)

    def _on_plain_round(self, announcement: RoundAnnouncement) -> None:
        number = announcement.round
        if announcement.phase in ("closed", "abandoned"):
            with self._changed:
                if self._held is not None and self._held.round == number:
                    log.info("round %d %s: dropping the held update", number, announcement.phase)
                    self._held = None
                    self._rounds_taken.discard(number)
            return
        if self.device not in announcement.selected:
            log.info("round %d: not selected", number)
            return
        with self._changed:
            current = self._model
            if (
                announcement.lineage is not None
                and current is not None
                and announcement.lineage != current.lineage
            ):
                # Another lineage's round (a reset or an upgrade): our round numbers,
                # held and sent updates belong to the old one. Wait for its base model.
                log.info(
                    "round %d of lineage %s: waiting for its model", number, announcement.lineage
                )
                self._rounds_taken.add(number)
                self._jobs.put(lambda: self._take_part(announcement))
                return
            sent = self._sent
            if sent is not None and sent.round == number:
                log.info("round %d announced again while open: sending its update again", number)
                self._client.publish(self.topics.update(self.device), sent.payload, qos=1)
                return
            held = None
            if announcement.phase == "send":
                self._send_permitted = max(self._send_permitted, number)
                if self._held is not None and self._held.round == number:
                    held, self._held = self._held, None
            if held is None:
                if number <= self._last_round or number in self._rounds_taken:
                    log.info("round %d (%s): already taken part", number, announcement.phase)
                    return
                self._rounds_taken.add(number)
        if held is not None:
            log.info("round %d: send phase, sending the held update", number)
            self._send(held)
            return
        self._jobs.put(lambda: self._take_part(announcement))

    def _on_secure_round(self, announcement: RoundAnnouncement) -> None:
        """A secure round's phase: the keys phase trains, later phases answer (worker)."""
        number, phase = announcement.round, announcement.phase
        if phase in ("closed", "abandoned"):
            self._jobs.put(lambda: self.secure.end(number))
            return
        if self.device not in announcement.selected:
            log.info("round %d: not selected", number)
            return
        if phase != "keys":
            self._jobs.put(lambda: self._secure_step(announcement))
            return
        with self._changed:
            taken = number in self._rounds_taken or self.secure.round == number
            if number <= self._last_round or taken:
                log.info("round %d (keys): already taken part", number)
                return
            self._rounds_taken.add(number)
        self._jobs.put(lambda: self._take_part(announcement))

    # --- worker jobs -------------------------------------------------------------

    def _secure_step(self, announcement: RoundAnnouncement) -> None:
        try:
            self.secure.step(announcement)
        except RejectedMessage as err:  # e.g. a roster or inbox the library refuses
            self.counters[err.reason] += 1
            log.warning("round %d (%s): %s", announcement.round, announcement.phase, err)

    def _work(self) -> None:
        lower_thread_priority()
        while (job := self._jobs.get()) is not None:
            if self._stopping.is_set():  # shutting down: start no new training
                continue
            try:
                with self._job_activity.running("a worker job"):
                    job()
            except Exception as err:
                self.counters["job_error"] += 1
                log.exception("worker job failed: %s", err)
            # Let go of the finished job before waiting for the next one: a backbone
            # install's closure holds the whole artifact (the float and int8
            # flatbuffers, ~28 MB) and would stay resident until the next round.
            job = None

    def _take_part(self, announcement: RoundAnnouncement) -> None:
        try:
            self._train_and_deliver(announcement)
        finally:
            with self._changed:
                if self.held_round != announcement.round:
                    self._rounds_taken.discard(announcement.round)

    def _train_and_deliver(self, announcement: RoundAnnouncement) -> None:
        number = announcement.round
        if announcement.secagg is not None:
            self._train_secure(announcement)
            return
        if announcement.codec not in TENSOR_CODECS:
            self.counters["bad_codec"] += 1
            log.warning(
                "round %d: codec %s is not an update codec; skipping", number, announcement.codec
            )
            return
        # top-k: the unsent remainder goes into training, so it is carried once
        trained = self._train(
            announcement, self._residual if announcement.codec == "topk" else None
        )
        if trained is None:
            return
        base, result = trained
        delta, residual = result.delta, None
        if announcement.codec == "topk":
            delta, residual = with_error_feedback(base.names, delta, announcement.density)
        payload = build_update(
            site=self.config.site,
            signer=self.signer,
            round_id=number,
            base_version=base.version,
            num_examples=result.num_examples,
            names=base.names,
            delta=delta,
            codec=announcement.codec,
            density=announcement.density,
            meta={"loss": result.loss, "train_seconds": round(result.seconds, 2)},
        )
        update = HeldUpdate(number, payload, residual)
        with self._changed:
            send_now = announcement.send_when_trained or self._send_permitted >= number
            if not send_now:
                if self._held is not None:  # an older round's update the aggregator never asked for
                    self._rounds_taken.discard(self._held.round)
                self._held = update
        log.info(
            "round %d: trained in %.1f s, loss %.3f, %d bytes%s",
            number,
            result.seconds,
            result.loss,
            len(payload),
            "" if send_now else "; holding for the send phase",
        )
        if send_now:
            self._send(update)

    def _train_secure(self, announcement: RoundAnnouncement) -> None:
        """Keys phase: once the base model and the training data are here, advertise (the
        phase then waits for every doorbell's keys, not its training), train, and prepare
        the masked-ready update for the send phase. A doorbell that cannot train does not
        advertise: the round never waits for its shares."""
        # no error feedback: the aggregator rescales the subset (edge/secure.py says why)
        trained = self._train(announcement, None, ready=lambda: self.secure.begin(announcement))
        if trained is None:
            self.secure.end(announcement.round)  # no update: drop out of the round
            return
        self.secure.prepare(announcement, trained[1].delta)
        log.info(
            "round %d: trained in %.1f s, loss %.3f; update ready to mask",
            announcement.round,
            trained[1].seconds,
            trained[1].loss,
        )

    def _train(
        self,
        announcement: RoundAnnouncement,
        residual: Weights | None,
        ready: Callable[[], None] | None = None,
    ) -> tuple[GlobalModel, TrainedDelta] | None:
        """The client step's training from the round's base model; None to skip the round.

        `ready`: called once the base model and the training data are here, just before
        training (a secure round advertises its keys then)."""
        number = announcement.round
        if time.time() > announcement.deadline:
            log.info("round %d: deadline already passed; skipping", number)
            return None
        base = self._wait_for_base(announcement)
        if base is None:
            return None
        found = self._training_data(number, base)
        if found is None:
            return None
        data, strangers = found
        if ready is not None:
            ready()
        plan = announcement.train
        params = TrainParams(
            epochs=plan.epochs,
            batch_size=plan.batch_size,
            learning_rate=plan.learning_rate,
            prox_mu=plan.prox_mu,
            seed=round_seed(self.device, number),
        )
        log.info(
            "round %d: training on %d gallery images of %d person(s) and %d strangers "
            "from model v%d",
            number,
            len(data),
            len(data.persons),
            len(strangers),
            base.version,
        )
        try:
            result = train_delta(
                base.weights, data.features, data.labels, strangers, params, residual=residual
            )
        except ValueError as err:
            self.counters["bad_shapes"] += 1
            log.warning(
                "round %d: base model v%d does not fit this node: %s", number, base.version, err
            )
            return None
        self.trainings += 1
        if not math.isfinite(result.loss):
            # One person and no strangers: nothing to tell apart, the head did not move.
            log.warning(
                "round %d: nothing to learn from (one person, no strangers yet); skipping", number
            )
            return None
        return base, result

    def _training_data(
        self, number: int, base: GlobalModel
    ) -> tuple[GalleryFeatures, Features] | None:
        """The gallery's features and the strangers', under the base model's backbone."""
        backbone = self.recognizer.backbone
        if backbone is None or self.artifacts.backbone_id != base.backbone:
            self.counters["no_backbone"] += 1  # missing, or refused (counted by its reason)
            log.warning(
                "round %d: no backbone %s for model v%d yet; skipping",
                number,
                base.backbone[:12],
                base.version,
            )
            return None
        data = self.gallery.features(backbone, self.config.training.max_images_per_person)
        if len(data) == 0:
            log.warning("round %d: the gallery is empty (nobody enrolled); skipping", number)
            return None
        return data, self.strangers.features(backbone.sha256, backbone.size)

    def _wait_for_base(self, announcement: RoundAnnouncement) -> GlobalModel | None:
        """The round's base model, waiting a while for it to arrive; None to skip."""
        wanted = announcement.base_version
        lineage = announcement.lineage  # None: an aggregator that does not name it
        until = min(announcement.deadline, time.time() + self.config.training.base_model_wait_s)
        with self._changed:
            while True:
                model = self._model
                same = model is not None and lineage in (None, model.lineage)
                if model is not None and same and model.version == wanted:
                    return model
                if model is not None and same and model.version > wanted:
                    log.warning(
                        "round %d: base is v%d but this node already has v%d; skipping",
                        announcement.round,
                        wanted,
                        model.version,
                    )
                    return None
                left = until - time.time()
                if left <= 0 or self._stopping.is_set():
                    log.warning(
                        "round %d: base model v%d never arrived (have %s); skipping",
                        announcement.round,
                        wanted,
                        self.model_version,
                    )
                    return None
                self._changed.wait(min(left, TICK_S))

    def _send(self, update: HeldUpdate) -> None:
        self._publish_update(
            self.topics.update(self.device), update.payload, f"round {update.round}"
        )
        with self._changed:
            self._sent = update
        self._record_sent(update.round, update.residual)
        log.info("round %d: update sent (%d bytes)", update.round, len(update.payload))

    def _publish_update(self, topic: str, payload: bytes, what: str) -> None:
        info = self._client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:  # paho queues it and sends after reconnecting
            log.warning("%s: update queued while offline (%s)", what, mqtt.error_string(info.rc))

    def _record_sent(self, number: int, residual: Weights | None) -> None:
        """A round's update is sent: remember the round and keep its error-feedback residual."""
        with self._changed:
            self._last_round = max(self._last_round, number)
            self._rounds_taken.discard(number)
            if residual is not None:
                self._residual = residual
        try:
            self.state.save_last_round(self._last_round)
            if residual is not None:
                self.state.save_residual(residual)
        except OSError as err:
            self.counters["store_failed"] += 1
            log.error("could not record round %d: %s", number, err)
        self._publish_status()
