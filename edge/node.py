"""The doorbell node: the parts of a doorbell's federation side, wired and run.

The parts, each in its module: the MQTT session and the status
(`edge.session`), the installed global model and its gates (`edge.installer`),
the backbone download (`edge.backbone_download`, `edge.artifacts`), taking
part in rounds (`edge.rounds`, `edge.round_training`) and, with a camera, the
live doorbell (`edge.live`). This module starts and stops them.

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
`counters`, so a bad message is dropped, never fatal, and never touches the
current model.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge import health
from edge.artifacts import Artifacts
from edge.backbone_download import BackboneDownload
from edge.config import EdgeConfig
from edge.events import EventPublisher
from edge.gallery import STRANGER_STORE, Gallery, StrangerStore
from edge.installer import ModelInstaller
from edge.live import LiveDoorbell, make_detector, make_publisher
from edge.parts import DoorbellParts
from edge.recognizer import Recognizer
from edge.round_training import RoundTraining
from edge.rounds import Job, RoundParticipant
from edge.session import Listener, NodeSession, payload_only
from edge.state import NodeState
from fedbell import systemd
from fedbell.errors import ConfigError
from fedbell.redact import redact
from fedbell.wire import signing
from fedbell.wire.messages import AGGREGATOR, Signer
from fedbell.wire.protocol import DeviceStatus, to_json

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
WORKER_JOIN_S = 5.0
"""How long closing waits for the worker's job to end (a training cannot be stopped)."""
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
    """One doorbell: its MQTT session, model, rounds, worker and camera, wired together."""

    def __init__(self, config: EdgeConfig, recognizer: Recognizer | None = None) -> None:
        self.config = config
        self.device = config.device_id
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
        self._job_activity = health.Activity()
        self._stopping = threading.Event()
        self._closed = False
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._worker = threading.Thread(
            target=self._work, name=f"{self.device}-worker", daemon=True
        )
        self._watcher = threading.Thread(
            target=self._watch_gallery, name=f"{self.device}-gallery", daemon=True
        )
        self.session = NodeSession(
            config, self.counters, status=self._status_payload, summary=self._status_summary
        )
        self.topics = self.session.topics
        self.artifacts = Artifacts(
            config,
            self.recognizer,
            state=self.state,
            gallery=self.gallery,
            counters=self.counters,
            on_scored=self.session.publish_status_if_connected,
        )
        self.parts = DoorbellParts(
            config,
            state=self.state,
            gallery=self.gallery,
            strangers=self.strangers,
            recognizer=self.recognizer,
            artifacts=self.artifacts,
            counters=self.counters,
            keys=self.trusted_keys,
        )
        self.models = ModelInstaller(
            self.parts,
            changed=threading.Condition(),
            # Late-bound: the rounds, made below, need the installer first.
            on_new_lineage=lambda current, model: self.rounds.start_lineage(current, model),  # noqa: PLW0108
            on_installed=self.session.publish_status,
        )
        self.backbone = BackboneDownload(
            self.topics,
            self.artifacts,
            self.counters,
            keys=self.trusted_keys,
            max_bytes=config.mqtt.max_message_bytes,
            install=lambda artifact: self._jobs.put(lambda: self.artifacts.install(artifact)),
            current=lambda: self.models.model,
        )
        self.training = RoundTraining(self.parts, models=self.models, stopping=self._stopping)
        self.rounds = RoundParticipant(
            self.parts,
            session=self.session,
            models=self.models,
            training=self.training,
            signer=self.signer,
            submit=self._jobs.put,
        )
        self.secure = self.rounds.secure
        # The model before the round: the broker sends retained messages in
        # subscription order, so a late joiner has its base model first.
        self.session.route(self.topics.global_model, payload_only(self.models.on_global))
        self.session.route(self.topics.tflite_model, payload_only(self.backbone.on_manifest))
        # after the manifest, as published
        self.session.route(self.topics.backbone_chunks, self.backbone.on_chunk)
        self.session.route(self.topics.round, payload_only(self.rounds.on_round))
        self.session.route(
            self.topics.secagg_inbox(self.device), payload_only(self.secure.on_inbox)
        )
        self.live: LiveDoorbell | None = None
        self.announcer: EventPublisher | None = None
        status_topic = self.session.status_topic
        if config.camera.enabled:
            self.live = LiveDoorbell(
                config,
                self.session.client,
                self.recognizer,
                status_topic,
                gallery=self.gallery,
                strangers=self.strangers,
                on_gallery_changed=self.artifacts.refresh,
            )
            self.session.add_listener(Listener(self.live.subscriptions, self.live.connected))
        elif config.home_assistant.enabled:
            # Without a camera (the demo's doorbells) it is still a doorbell to Home Assistant.
            announcer = make_publisher(config, self.session.client, status_topic, self.gallery)
            announcer.attach()
            self.session.add_listener(Listener(announcer.subscriptions, announcer.announce))
            self.announcer = announcer

    # --- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Load the stored artifact, start the worker, connect in the background."""
        # Loaded before connecting, so a retained artifact of the same version is
        # rightly skipped as known; if the stored one is unusable, it is not known.
        self.artifacts.load_stored()  # also embeds the gallery with it
        self._worker.start()
        self._watcher.start()
        self.session.start()

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
            while not self.session.connected.is_set() and time.monotonic() < deadline:
                if stop.wait(0.1):
                    return
            if not self.session.connected.is_set() and not self.session.said_unreachable():
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
                    # only if the gallery size changed
                    self.session.publish_status_if_connected()
        finally:
            self.close()

    def close(self) -> None:
        """Publish the offline status, disconnect and stop the worker."""
        if self._closed:
            return
        self._closed = True
        systemd.notify_stopping()
        self._stopping.set()
        with self.models.changed:  # a training waiting for its base model gives up
            self.models.changed.notify_all()
        self._jobs.put(None)
        if self.live is not None:
            # Before the offline status: its last act (presence OFF) must reach the broker.
            self.live.close()
        self.session.close()
        # A training in progress cannot be interrupted; the worker is a daemon thread.
        if self._worker.is_alive():
            self._worker.join(WORKER_JOIN_S)

    def health_problem(self) -> str | None:
        """Why the node cannot serve (a dead or stuck thread), or None if it can."""
        problem = health.thread_problem(
            "worker", self._worker, self._job_activity, self.limits.job_s
        ) or self.session.network_problem(self.limits.callback_s)
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

    # --- status ----------------------------------------------------------------

    def _status_payload(self, state: str) -> bytes:
        detail = self.artifacts.detail
        if self.live is not None:
            detail = f"{detail}; {self.live.detail()}" if detail else self.live.detail()
        status = DeviceStatus(
            state="online" if state == "online" else "offline",
            model_version=self.models.version,
            gallery_size=self.gallery.count(),
            last_round=self.rounds.last_round,
            detail=redact(detail),  # a camera error may quote its URL
        )
        return to_json(status)

    def _status_summary(self) -> str:
        return (
            f"model v{self.models.version}, round {self.rounds.last_round}, "
            f"{self.gallery.count()} gallery images. {self.artifacts.detail}"
            + (f" {self.live.pipeline.counters.fps:.1f} fps" if self.live is not None else "")
        )
