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

from anomalyd.config import RELOADABLE, AppConfig, ConfigError, config_hash, load_config
from anomalyd.daemon.archive import ArchiveItem, RejectArchive
from anomalyd.daemon.decision import Verdict, decide
from anomalyd.daemon.metrics import Metrics, MetricsServer
from anomalyd.daemon.notify import Notifier
from anomalyd.daemon.plc_worker import PlcWorker
from anomalyd.daemon.records import Record, RecordStore
from anomalyd.drivers.camera.base import Camera, CameraDisconnected, CameraError, CameraTimeout, Frame, open_camera
from anomalyd.drivers.plc.base import open_plc_link
from anomalyd.drivers.plc.handshake import ErrorCode, Handshake
from anomalyd.engines.inspector import Inspection, Inspector, open_inspector
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
        self.counts: dict[str, int] = {"OK": 0, "WARN": 0, "NG": 0, "errors": 0, "deadline_misses": 0}
        self.camera: Camera | None = None
        self.camera_ok = False
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
        data = cfg.daemon.data_dir
        self.records = RecordStore(
            data / "inspections.sqlite", cfg.daemon.records_retention_days, cfg.daemon.records_retention_count
        )
        self.archive = RejectArchive(data / "archive", cfg.archive.quota_mb)
        self.handshake = Handshake(self.threshold, inspection_id=self.records.last_inspection_id())
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
        self.expected_shape = None
        self.metrics.camera_connected.set(1)
        self.handshake.set_ready(True)
        self.metrics.ready.set(1)
        return True

    def _camera_down(self, reason: str) -> None:
        if self.camera_ok or self.expected_shape is None:
            log.error("camera.lost", camera=self.camera.name if self.camera else "?", error=reason)
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
        self._account(verdict, code, latency_ms, inspection)
        self._record(
            status.inspection_id,
            verdict.label if not late else "NG",
            inspection.score,
            verdict,
            code,
            latency_ms,
            inspection,
            frame,
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
        self.counts["errors"] += 1
        self.counts["NG"] += 1
        self.metrics.errors.labels(code=str(int(code))).inc()
        self.metrics.inspections.labels(verdict="NG").inc()
        self._record(status.inspection_id, "NG", None, None, code, latency_ms, None, frame)

    def _account(self, verdict: Verdict, code: ErrorCode, latency_ms: float, inspection: Inspection) -> None:
        label = "NG" if code else verdict.label
        self.counts[label] += 1
        self.metrics.inspections.labels(verdict=label).inc()
        self.metrics.score.set(inspection.score)
        for stage, ms in inspection.timings_ms.items():
            self.metrics.latency.labels(stage=stage).observe(ms)
        self.metrics.latency.labels(stage="frame_to_result").observe(latency_ms)
        if code == ErrorCode.OVER_BUDGET:
            self.counts["deadline_misses"] += 1
            self.metrics.deadline_misses.inc()
            self.metrics.errors.labels(code=str(int(code))).inc()
            log.warning(
                "inspection.over_budget", latency_ms=round(latency_ms, 1), budget_ms=self.config.daemon.budget_ms
            )

    def _record(
        self,
        inspection_id: int,
        label: str,
        score: float | None,
        verdict: Verdict | None,
        code: ErrorCode,
        latency_ms: float,
        inspection: Inspection | None,
        frame: Frame | None,
    ) -> None:
        now = time.time_ns()
        archive_path = None
        keep_ok = self.config.archive.ok_sample_every
        wanted = label == "NG" or (keep_ok and inspection_id % keep_ok == 0)
        if self.config.archive.enabled and frame is not None and wanted:
            frame_path, overlay_path = self.archive.paths_for(inspection_id, label, now)
            fmap = inspection.frame_map(frame.image.shape) if inspection is not None else None
            if self.archive.add(ArchiveItem(frame_path, overlay_path, frame.image, fmap, 2.0 * self.threshold)):
                archive_path = str(frame_path)
        t = inspection.timings_ms if inspection is not None else {}
        self.records.add(
            Record(
                inspection_id=inspection_id,
                time_ns=now,
                verdict=label,
                score=score,
                threshold=verdict.threshold if verdict else self.threshold,
                error_code=int(code),
                latency_ms=latency_ms,
                preprocess_ms=t.get("preprocess"),
                extract_ms=t.get("extract"),
                search_ms=t.get("search"),
                map_ms=t.get("map"),
                defect_area_px=verdict.defect_area_px if verdict else None,
                archive_path=archive_path,
                source=frame.source if frame else None,
                frame_id=frame.frame_id if frame else None,
                bundle_id=self.inspector.bundle.bundle_id,  # type: ignore[union-attr]
                config_hash=self.config_id,
            )
        )
        log.info(
            "inspection",
            id=inspection_id,
            verdict=label,
            score=None if score is None else round(score, 4),
            latency_ms=round(latency_ms, 1),
            error_code=int(code),
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
            **self.counts,
        }
        state["healthy"] = bool(state["ready"]) and loop_age < 5.0
        return state

    def _status_line(self) -> str:
        c = self.counts
        return (
            f"OK {c['OK']} WARN {c['WARN']} NG {c['NG']} errors {c['errors']} "
            f"late {c['deadline_misses']} plc {'up' if self.plc.connected else 'down'} "
            f"camera {'up' if self.camera_ok else 'down'}"
        )

    def shutdown(self) -> int:
        log.info("daemon.stopping", **self.counts)
        self.notifier.stopping()
        self.handshake.set_ready(False)
        self.plc.stop(final=self.handshake.status)
        if self.camera is not None and self.camera_ok:
            self.camera.close()
        self.records.close()
        self.archive.close()
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
