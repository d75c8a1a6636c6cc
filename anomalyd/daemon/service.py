"""The inspection daemon: frames in, verdicts to the PLC, records on disk, for months.

Threads: this one runs the inspection loop (trigger → frame → model → verdict);
the PLC worker owns the link; the record and archive writers keep disk I/O off
the hot path; the metrics server answers Prometheus. Signals only set flags that
the loop acts on between inspections.
"""

from __future__ import annotations

import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

from anomalyd.config import RELOADABLE, AppConfig, config_hash
from anomalyd.config_loader import ConfigError, load_config
from anomalyd.daemon.decision import decide
from anomalyd.daemon.metrics import Metrics, MetricsServer
from anomalyd.daemon.notify import Notifier
from anomalyd.daemon.plc_worker import PlcWorker
from anomalyd.daemon.recorder import Outcome, Recorder
from anomalyd.drivers.camera.base import Camera, CameraDisconnected, CameraError, CameraTimeout, Frame, open_camera
from anomalyd.drivers.plc.base import open_plc_link
from anomalyd.drivers.plc.handshake import ErrorCode, Handshake
from anomalyd.engines.inspector import Inspector, open_inspector
from anomalyd.log import configure_logging, get_logger
from anomalyd.model.bundle import load_bundle

log = get_logger(__name__)


class Daemon:
    def __init__(self, config_path: Path, config: AppConfig) -> None:
        self.config_path = config_path
        self.config = config
        self.config_id = config_hash(config)
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        self.notifier = Notifier()
        self.metrics = Metrics()
        self.camera: Camera | None = None
        self.camera_ok = False
        self._camera_reported_down = False
        self.expected_shape: tuple[int, ...] | None = None
        self.inspector: Inspector | None = None
        self._last_loop = time.monotonic()

    # ------------------------------------------------------------ start-up
    def start(self) -> None:
        cfg = self.config
        bundle = load_bundle(cfg.model.bundle)
        roi = (
            (cfg.camera.roi.x, cfg.camera.roi.y, cfg.camera.roi.width, cfg.camera.roi.height)
            if cfg.camera.roi
            else None
        )
        self.inspector = open_inspector(bundle, cfg.engine, cfg.search, roi)
        self.inspector.warm_up()
        log.info(
            "model.loaded",
            bundle=bundle.bundle_id,
            engine=self.inspector.engine_name,
            threshold=self.threshold,
            input_size=bundle.input_size,
        )
        self.recorder = Recorder(cfg.daemon, cfg.archive, self.metrics, bundle.bundle_id)
        self.recorder.config_id = self.config_id
        self.handshake = Handshake(self.threshold, inspection_id=self.recorder.last_inspection_id())
        self.plc = PlcWorker(
            open_plc_link(cfg.plc),
            self.handshake,
            heartbeat_s=cfg.daemon.heartbeat_ms / 1000.0,
            poll_s=cfg.daemon.poll_ms / 1000.0,
            budget_ms=cfg.daemon.budget_ms,
            reconnect_max_s=getattr(cfg.plc, "reconnect_max_s", 5.0),
            on_connection=self._plc_connection,
        )
        self.metrics_server: MetricsServer | None = None
        if cfg.metrics.enabled:
            self.metrics_server = MetricsServer(self.metrics, cfg.metrics.host, cfg.metrics.port, self.health)
            log.info("metrics.serving", url=f"http://{cfg.metrics.host}:{self.metrics_server.port}/metrics")
        self.plc.start()
        self._open_camera()
        self.notifier.ready(self._status_line())
        log.info(
            "daemon.ready",
            trigger=cfg.daemon.trigger,
            budget_ms=cfg.daemon.budget_ms,
            plc=self.plc.link.name,
            camera=self.camera.name if self.camera else None,
        )

    @property
    def threshold(self) -> float:
        assert self.inspector is not None
        t = self.config.thresholds.image
        return t if t is not None else self.inspector.bundle.suggested_threshold

    def _plc_connection(self, up: bool) -> None:
        self.metrics.plc_connected.set(1 if up else 0)
        if up:
            self.metrics.reconnects.inc()

    def _open_camera(self) -> bool:
        if self.camera is None:
            self.camera = open_camera(self.config.camera)
        try:
            self.camera.open()
        except CameraDisconnected as exc:
            self._camera_down(str(exc))
            return False
        self.camera_ok = True
        self._camera_reported_down = False
        self.expected_shape = None
        self.metrics.camera_connected.set(1)
        self.handshake.set_ready(True)
        self.metrics.ready.set(1)
        return True

    def _camera_down(self, reason: str) -> None:
        if not self._camera_reported_down:  # once per outage: no log storm while it stays away
            log.error("camera.lost", camera=self.camera.name if self.camera else "?", error=reason)
            self._camera_reported_down = True
        self.camera_ok = False
        self.metrics.camera_connected.set(0)
        self.metrics.ready.set(0)
        self.handshake.set_ready(False, int(ErrorCode.CAMERA_DISCONNECTED))
        if self.camera is not None:
            try:
                self.camera.close()
            except Exception as exc:  # a dead device may fail to close; we reopen anyway
                log.debug("camera.close_failed", error=str(exc))

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        self._install_signals()
        backoff = 0.5
        done = 0
        limit = self.config.daemon.max_inspections
        next_status = 0.0
        while not self.stop_event.is_set():
            self._last_loop = time.monotonic()
            self.notifier.watchdog()  # from the loop itself: a hung loop is restarted
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                self.reload()
            if time.monotonic() >= next_status:
                self.notifier.status(self._status_line())
                next_status = time.monotonic() + 5.0
            if not self.camera_ok:
                if self.stop_event.wait(backoff) or not self._open_camera():
                    backoff = min(backoff * 2, 10.0)
                    continue
                log.info("camera.recovered", camera=self.camera.name if self.camera else "?")
                backoff = 0.5
            if self.inspect_next():
                done += 1
                if limit and done >= limit:
                    log.info("daemon.limit_reached", inspections=done)
                    break
        return self.shutdown()

    def inspect_next(self) -> bool:
        """Wait for the next part and inspect it; True if a result was produced."""
        assert self.camera is not None
        mode = self.config.daemon.trigger
        grab_timeout = self.config.daemon.grab_timeout_ms / 1000.0
        if mode == "plc":
            try:
                triggered_at = self.plc.triggers.get(timeout=0.2)
            except queue.Empty:
                return False
            try:
                self.camera.software_trigger()
                frame = self.camera.grab(grab_timeout)
            except CameraTimeout as exc:
                self._error_result(ErrorCode.CAMERA_TIMEOUT, str(exc), triggered_at)
                return True
            except CameraError as exc:
                self._error_result(ErrorCode.CAMERA_DISCONNECTED, str(exc), triggered_at)
                self._camera_down(str(exc))
                return True
        else:
            try:
                frame = self.camera.grab(min(grab_timeout, 0.5))
            except CameraTimeout:
                return False  # no part in front of the camera: not an error in these modes
            except CameraError as exc:
                self._camera_down(str(exc))
                return False
            self.handshake.begin()
        return self._inspect_frame(frame)

    def _inspect_frame(self, frame: Frame) -> bool:
        assert self.inspector is not None
        started = time.monotonic()
        self.handshake.arm(started + self.config.daemon.budget_ms / 1000.0)
        if self.expected_shape is None:
            self.expected_shape = frame.image.shape
        if frame.image.shape != self.expected_shape:
            self._error_result(
                ErrorCode.BAD_FRAME, f"frame {frame.image.shape}, expected {self.expected_shape}", started, frame
            )
            return True
        try:
            inspection = self.inspector.inspect(frame.image)
        except Exception as exc:  # any model failure fails this part, not the daemon
            log.exception("model.failed", frame_id=frame.frame_id)
            self._error_result(ErrorCode.MODEL_ERROR, str(exc), started, frame)
            return True
        _x, _y, w, h = inspection.roi
        verdict = decide(inspection.score, inspection.anomaly_map, w * h, self.config.thresholds, self.threshold)
        latency_ms = (time.monotonic() - started) * 1000.0
        late = latency_ms > self.config.daemon.budget_ms
        code = ErrorCode.OVER_BUDGET if late else ErrorCode.OK
        published = self.handshake.finish(
            inspection.score, verdict.threshold, verdict.passed and not late, int(code), latency_ms
        )
        self.plc.wake()
        status = published or self._expired_status()
        if late:
            log.warning(
                "inspection.over_budget", latency_ms=round(latency_ms, 1), budget_ms=self.config.daemon.budget_ms
            )
        label = "NG" if status.error_code or published is None else verdict.label
        self.recorder.add(
            Outcome(
                status.inspection_id,
                label,
                ErrorCode(status.error_code),
                latency_ms,
                verdict.threshold,
                verdict,
                inspection,
                frame,
            )
        )
        return True

    def _expired_status(self) -> Any:
        """The fail-safe result the deadline already published for this inspection."""
        deadline = time.monotonic() + 1.0
        while not self.plc.expired and time.monotonic() < deadline:
            time.sleep(0.001)
        return self.plc.expired.pop(0) if self.plc.expired else self.handshake.status

    def _error_result(self, code: ErrorCode, reason: str, started: float, frame: Frame | None = None) -> None:
        latency_ms = (time.monotonic() - started) * 1000.0
        log.warning("inspection.error", code=int(code), error=code.name.lower(), reason=reason)
        status = self.handshake.finish(0.0, self.threshold, False, int(code), latency_ms) or self._expired_status()
        self.plc.wake()
        self.recorder.add(
            Outcome(status.inspection_id, "NG", ErrorCode(status.error_code), latency_ms, self.threshold, frame=frame)
        )

    # ------------------------------------------------------------ reload, health, stop
    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())

    def reload(self) -> bool:
        """Re-read the YAML; apply reloadable sections; keep everything on a bad edit."""
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("reload.rejected", issue=str(issue), file=issue.file, line=issue.line, key=issue.key)
            log.error("reload.kept_old_config", thresholds=self.config.thresholds.model_dump())
            self.notifier.ready(self._status_line())
            return False
        restart = [
            name
            for name in AppConfig.model_fields
            if name not in RELOADABLE and getattr(new, name) != getattr(self.config, name)
        ]
        applied = {name: getattr(new, name) for name in RELOADABLE}
        self.config = self.config.model_copy(update=applied)
        self.config_id = config_hash(self.config)
        self.recorder.config_id = self.config_id
        self.recorder.archive_config = self.config.archive
        self.handshake.set_threshold(self.threshold)
        configure_logging(self.config.logging.level, self.config.logging.format)
        log.info(
            "reload.applied",
            thresholds=self.config.thresholds.model_dump(),
            threshold=self.threshold,
            needs_restart=restart,
        )
        self.notifier.ready(self._status_line())
        return True

    def health(self) -> dict[str, object]:
        loop_age = time.monotonic() - self._last_loop
        state: dict[str, object] = {
            "ready": self.handshake.status.ready,
            "camera": self.camera_ok,
            "plc": self.plc.connected,
            "loop_age_s": round(loop_age, 3),
            **self.recorder.counts,
        }
        state["healthy"] = bool(state["ready"]) and loop_age < 5.0
        return state

    def _status_line(self) -> str:
        c = self.recorder.counts
        return (
            f"OK {c['OK']} WARN {c['WARN']} NG {c['NG']} errors {c['errors']} "
            f"late {c['deadline_misses']} plc {'up' if self.plc.connected else 'down'} "
            f"camera {'up' if self.camera_ok else 'down'}"
        )

    def shutdown(self) -> int:
        log.info("daemon.stopping", **self.recorder.counts)
        self.notifier.stopping()
        self.handshake.set_ready(False)
        self.plc.stop(final=self.handshake.status)
        if self.camera is not None and self.camera_ok:
            self.camera.close()
        self.recorder.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.inspector is not None:
            self.inspector.close()
        self.notifier.close()
        log.info("daemon.stopped")
        return 0


def run_daemon(config_path: Path) -> int:
    config = load_config(config_path)
    configure_logging(config.logging.level, config.logging.format)
    log.info("daemon.starting", config=str(config_path), pid=os.getpid(), config_hash=config_hash(config))
    daemon = Daemon(config_path, config)
    daemon.start()
    return daemon.run()
