"""The inspection daemon: wires the parts together and runs the loop.

Threads: this one runs the inspection loop (dispatcher → judge); the PLC worker
owns the link, the deadline and the heartbeat; the record and archive writers
keep disk I/O off the hot path; the metrics server answers Prometheus. Signals
only set flags that the loop acts on between inspections.

Each job lives in its own module: ``handshake`` (the result contract, pure),
``plc_worker`` (the link), ``camera_supervisor`` (camera life), ``dispatch``
(where the next part comes from), ``judge`` (one part to one answer),
``reloader`` (SIGHUP), ``recorder`` (counts, records, archive).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time
from pathlib import Path

from anomalyd.config import AppConfig, config_hash
from anomalyd.config_loader import config_sections, load_config
from anomalyd.daemon.audit import AuditError, AuditLog
from anomalyd.daemon.camera_supervisor import CameraSupervisor
from anomalyd.daemon.dispatch import Dispatcher
from anomalyd.daemon.drift import DriftTracker, DriftWatch
from anomalyd.daemon.handshake import Answer, ErrorCode, Handshake
from anomalyd.daemon.judge import Judge
from anomalyd.daemon.mes import MqttPublisher
from anomalyd.daemon.metrics import LabelledOutcomes, Metrics, MetricsServer, line_name
from anomalyd.daemon.notify import Notifier
from anomalyd.daemon.page import PageFeed, PageServer, page_token
from anomalyd.daemon.plc_worker import PlcWorker
from anomalyd.daemon.recipes import RecipeBook
from anomalyd.daemon.recorder import Recorder
from anomalyd.daemon.reloader import reload_config, reload_entries
from anomalyd.drivers.plc.base import PLC_LINKS, PlcError, open_plc_link
from anomalyd.engines.base import EngineHooks
from anomalyd.errors import StartupError
from anomalyd.log import configure_logging, get_logger

log = get_logger(__name__)
CERTIFICATE_WARNING_DAYS = 30  # a certificate's renewal is planned this long before it expires


class Daemon:
    """Wiring: every part is built once, in order, from the config (``__init__``); ``start`` starts them.

    Nothing is built later and nothing is set into another object after it was made:
    a part that calls back into the daemon (records failing, the counter, a refused
    trigger) is built after the parts its callback uses. A start-up fault a person must
    fix raises StartupError (one line, exit 2).
    """

    def __init__(self, config_path: Path, config: AppConfig) -> None:
        cfg = config
        self.config_path = config_path
        self.config = config
        self.config_id = config_hash(config)
        self.config_sections = frozenset(config_sections(config_path))
        self.stop_event = threading.Event()
        self.reload_requested = threading.Event()
        # Before the pid file names this process: `anomalyd promote` may send SIGHUP at once,
        # and SIGHUP's default action ends the process (a restart loop under systemd).
        self._install_signals()
        self.notifier = Notifier()
        self.line = line_name(cfg.daemon.line)  # metrics, MQTT and the page name the station alike
        self.metrics = Metrics(self.line)
        self.metrics.registry.register(LabelledOutcomes(cfg.daemon.data_dir / "inspections.sqlite"))
        self._audit_cache: list[dict[str, object]] = []
        self._audit_read_at = -1e9
        self.heartbeat_s = cfg.daemon.heartbeat_ms / 1000.0
        # The loop never waits longer than this, so the heartbeat can prove it is alive.
        self.tick_s = min(0.2, self.heartbeat_s / 4)
        self._last_loop = time.monotonic()
        self._reported_dead: list[str] = []
        self._plc_was_up = False
        self._next_cert_check = float("inf")  # OPC UA certificates: checked at start, then hourly
        self.audit_problem = ""  # the audit chain's first break, shown on the page ("" while whole)

        check_data_dir(cfg.daemon.data_dir)  # before the slow model load: a person must fix it
        try:
            # A short wait: a reload that cannot be audited is refused rather than hold up the line.
            self.audit = AuditLog(cfg.daemon.data_dir / "inspections.sqlite", timeout_s=1.0)
        except sqlite3.Error as exc:
            raise StartupError(
                f"{cfg.daemon.data_dir / 'inspections.sqlite'}: cannot open the audit log ({exc})"
            ) from None
        # Where `anomalyd promote` and `rollback` find the daemon to reload.
        (cfg.daemon.data_dir / "anomalyd.pid").write_text(f"{os.getpid()}\n", encoding="ascii")
        self.handshake = Handshake(
            budget_ms=cfg.daemon.budget_ms,
            grab_timeout_ms=cfg.daemon.grab_timeout_ms,
            records_required=cfg.records.required,
        )
        self.recipes = self._load_recipes(cfg)
        self.plc = self._plc_worker(cfg)  # built, not started: its callbacks reach the recorder only once it runs
        self.page_feed = PageFeed(cfg.page.filmstrip, self._page_state) if cfg.page.enabled else None
        self.mes = MqttPublisher(cfg.mqtt, self.line, self.metrics) if cfg.mqtt.enabled else None
        self.recorder = self._recorder(cfg)
        self.handshake.set_threshold(self.threshold)
        self.camera = CameraSupervisor(cfg.camera, self.handshake, self.metrics)
        self.dispatcher = Dispatcher(
            cfg.daemon.trigger,
            self.handshake,
            self.camera,
            self.plc.triggers,
            cfg.daemon.grab_timeout_ms / 1000.0,
            self.tick_s,
            on_refused=self.recorder.add_refused,
        )
        self.drift: DriftWatch | None = None
        if cfg.drift.enabled:
            tracker = DriftTracker(cfg.drift.window, cfg.drift.margin, cfg.drift.min_parts)
            self.drift = DriftWatch(tracker, self._drift_changed, self.metrics)
        self.judge = Judge(
            self.recipes, self.handshake, self.camera, self.recorder, on_answer=self.plc.wake, drift=self.drift
        )
        # The servers last: a request may come the moment they listen, and they read every part above.
        self.metrics_server: MetricsServer | None = None
        if cfg.metrics.enabled:
            self.metrics_server = MetricsServer(self.metrics, cfg.metrics.host, cfg.metrics.port, self.health)
            log.info("metrics.serving", url=f"http://{cfg.metrics.host}:{self.metrics_server.port}/metrics")
        self.page_server: PageServer | None = None
        if self.page_feed is not None:
            feed = self.page_feed
            self.metrics.count_from("page_skipped_images", lambda: feed.skipped_images)
            self.metrics.count_from("page_skipped_results", lambda: feed.skipped_items)
            self.page_server = PageServer(
                feed, cfg.page.host, cfg.page.port, page_token(cfg.page.token_file), cfg.page.max_clients, self._label
            )
            log.info("page.serving", url=f"http://{cfg.page.host}:{self.page_server.port}/")

    def _load_recipes(self, cfg: AppConfig) -> RecipeBook:
        if cfg.model.trusted_keys:
            log.info("bundles.authenticated", trusted_keys=[str(k) for k in cfg.model.trusted_keys])
        else:
            log.warning("bundles.not_authenticated", hint="set model.trusted_keys to refuse unsigned bundles")
        # A first start on a new GPU builds the TensorRT plan (minutes on a Jetson): systemd is told.
        hooks = EngineHooks(on_long_build=self.notifier.extend_timeout)
        recipes = RecipeBook(cfg, self.handshake, RecipeBook.opener(cfg, hooks))
        recipes.load_all()  # every recipe loaded and warmed up before READY
        default = recipes.get(0)
        assert default is not None
        log.info(
            "model.loaded",
            recipes=sorted(recipes.specs),
            default_recipe=recipes.default,
            bundle=default.bundle_id,
            engine=default.inspector.engine_name,
            threshold=default.threshold,
            input_size=default.inspector.bundle.input_size,
        )
        return recipes

    def _plc_worker(self, cfg: AppConfig) -> PlcWorker:
        link = open_plc_link(cfg.plc)
        if PLC_LINKS[cfg.plc.type].serves:
            # We are the server: a port that cannot be bound is a set-up fault, not a PLC outage.
            try:
                link.open()
            except PlcError as exc:
                where = f"plc.port {getattr(cfg.plc, 'port', '?')} on {getattr(cfg.plc, 'host', '?')}"
                raise StartupError(f"{where}: {exc}") from None
        return PlcWorker(
            link,
            self.handshake,
            heartbeat_s=self.heartbeat_s,
            poll_s=cfg.daemon.poll_ms / 1000.0,
            reconnect_max_s=getattr(cfg.plc, "reconnect_max_s", 5.0),
            on_connection=self._plc_connection,
            on_refused=self._refused,
            on_expired=self._expired,
            loop_alive=self._loop_alive,
            client_timeout_s=getattr(cfg.plc, "client_timeout_heartbeats", 10) * self.heartbeat_s,
        )

    def _recorder(self, cfg: AppConfig) -> Recorder:
        default = self.recipes.get(0)
        assert default is not None
        try:
            recorder = Recorder(
                cfg.daemon,
                cfg.archive,
                self.metrics,
                default.bundle_id,
                cfg.records,
                on_failing=self._records_failing,
                on_ids=self._ids_state,
                on_id_limit=self.handshake.set_id_limit,
                config_id=self.config_id,
                page_feed=self.page_feed,
                mes=self.mes,
            )
            last_id = recorder.last_inspection_id()
        except (sqlite3.Error, OSError) as exc:
            raise StartupError(
                f"{cfg.daemon.data_dir}: cannot open the records or the inspection counter ({exc}); "
                "check the folder, its free space and its files (a corrupt database can be moved aside)"
            ) from None
        self.handshake.continue_from(last_id)
        self.handshake.on_continue = recorder.ids.reserve  # a PLC block ahead of us: saved before use
        return recorder

    # ------------------------------------------------------------ start-up
    def start(self) -> None:
        """Start the parts built above: the PLC link, the camera; then audit the start and say READY."""
        cfg = self.config
        self._check_certificates()
        self.plc.start()
        self.camera.ensure_open()
        self.audit.append(
            "start",
            {
                "config_hash": self.config_id,
                "pid": os.getpid(),
                "recipes": {n: r["bundle"] for n, r in self.recipes.state()["loaded"].items()},  # type: ignore[attr-defined]
            },
            actor="daemon",
        )
        self._check_audit()
        self.notifier.ready(self._status_line())
        log.info(
            "daemon.ready",
            trigger=cfg.daemon.trigger,
            budget_ms=cfg.daemon.budget_ms,
            plc=self.plc.link.name,
            camera=self.camera.name,
        )

    @property
    def threshold(self) -> float:
        """The default recipe's image threshold (each answer carries its own recipe's)."""
        default = self.recipes.get(0)
        return default.threshold if default is not None else 0.0

    def _plc_connection(self, up: bool) -> None:
        self.metrics.plc_connected.set(1 if up else 0)
        if up and self._plc_was_up:
            self.metrics.reconnects.inc()  # re-connections only, not the first
        self._plc_was_up = self._plc_was_up or up

    def _page_state(self) -> dict[str, object]:
        status = self.handshake.status
        return {
            "counts": dict(self.recorder.counts),
            "camera": self.camera.ok,
            "plc": self.plc.up,
            "records_failing": self.recorder.failing,
            "ready": status.ready,
            "recipe": status.recipe,
            "recipes": self.recipes.state(),
            "drift": self.drift.tracker.states() if self.drift is not None else {},
            "drifting": status.drift,
            "audit": self._recent_audit(),
            "audit_broken": self.audit_problem,
            "now": time.time(),  # the page computes ages on the daemon's clock, not the browser's
            "stale_after_s": self.config.page.stale_after_s,
            "line": self.line,
        }

    def _recent_audit(self) -> list[dict[str, object]]:
        """The last audit entries, read from the database at most every 5 s (not once per result)."""
        now = time.monotonic()
        if now - self._audit_read_at > 5.0:
            self._audit_cache = self.audit.recent(5)
            self._audit_read_at = now
            self._check_audit()  # entries written by promote/rollback from another process, too
        return self._audit_cache

    def _drift_changed(self, drifting: bool) -> None:
        self.handshake.set_drift(drifting)
        self.plc.wake()

    def _records_failing(self, failing: bool) -> None:
        # From the records thread (from its first write on: the handshake and the PLC worker are built before it).
        self.handshake.set_records_failing(failing)
        self.plc.wake()

    def _refused(self, answer: Answer) -> None:
        """A trigger the PLC worker answered without an inspection: recorded like every answer."""
        self.recorder.add_refused(answer)

    def _label(self, inspection_id: int, label: str, who: str) -> None:
        """From the page: a person's word on a part, stored with the records and audited."""
        from anomalyd.daemon.labels import add_labels

        add_labels(self.config.daemon.data_dir / "inspections.sqlite", [inspection_id], label, actor=who)  # type: ignore[arg-type]

    def _check_certificates(self) -> None:
        """A link with certificates (OPC UA): log and export the days left on each; warn 30 days ahead."""
        certificate_expiry = getattr(PLC_LINKS[self.config.plc.type], "certificate_expiry", None)
        if certificate_expiry is None:
            return
        self._next_cert_check = time.monotonic() + 3600.0
        for name, expires in certificate_expiry(self.config.plc).items():
            self.metrics.certificate_expiry.labels(certificate=name).set(expires)
            days = round((expires - time.time()) / 86400.0, 2)
            if days < CERTIFICATE_WARNING_DAYS:
                log.warning("opcua.certificate_expiring", certificate=name, days_left=days)
            else:
                log.info("opcua.certificate", certificate=name, days_left=days)

    def _ids_state(self, ok: bool) -> None:
        """The inspection counter cannot be saved: no id it could repeat is handed out (code 11)."""
        self.metrics.ids_ok.set(1 if ok else 0)
        if ok:
            self.handshake.release(ErrorCode.RECORDS_UNAVAILABLE)
        else:
            self.handshake.hold(ErrorCode.RECORDS_UNAVAILABLE)
        self.plc.wake()

    def _expired(self, answer: Answer) -> None:
        log.warning("inspection.deadline", id=answer.status.inspection_id, part_id=answer.part_id)

    def _loop_alive(self) -> bool:
        return time.monotonic() - self._last_loop < self.heartbeat_s

    # ------------------------------------------------------------ the loop
    def run(self) -> int:
        """The loop; whatever ends it (a stop, a limit, a fault nobody foresaw), shutdown runs."""
        try:
            self._loop()
        except Exception:
            log.exception("daemon.loop_failed")  # the stop below still flushes records and writes not-ready
            self.shutdown()
            return 1
        return self.shutdown()

    def _loop(self) -> None:
        done = 0
        limit = self.config.daemon.max_inspections
        next_status = 0.0
        while not self.stop_event.is_set():
            self._last_loop = time.monotonic()
            dead = self.dead_workers()
            if not dead:
                self.notifier.watchdog()  # from the loop itself, only while every worker lives
            elif dead != self._reported_dead:
                log.error("daemon.worker_dead", workers=dead, hint="systemd's watchdog restarts the daemon")
            self._reported_dead = dead
            # Saves the counter ahead of the ids (also after a PLC block moved them on) and retries a failed save.
            self.recorder.ids.reserve(self.handshake.status.inspection_id)
            if self.reload_requested.is_set():
                self.reload_requested.clear()
                try:
                    self.reload()
                except Exception:  # a reload is never a reason to stop the line: the old config stays
                    log.exception("reload.failed")
                    self.notifier.ready(self._status_line())
            if time.monotonic() >= self._next_cert_check:
                self._check_certificates()
            if time.monotonic() >= next_status:
                self.notifier.status(self._status_line())
                next_status = time.monotonic() + 5.0
            try:
                camera_up = self.camera.ensure_open()
            except Exception as exc:  # e.g. a camera absent at start appears with refused settings
                log.exception("camera.open_failed")
                self.camera.lost(f"cannot open: {exc}")
                camera_up = False
            if not camera_up and self.config.daemon.trigger != "plc":
                self.stop_event.wait(self.tick_s)
                continue
            try:
                part = self.dispatcher.next_part()
            except Exception as exc:  # a driver fault we did not foresee: reopen the camera, never crash
                log.exception("camera.unexpected_error")
                self.camera.lost(f"unexpected: {exc}")
                continue
            if part is None:
                continue
            self.judge.judge(part)
            self.recipes.collect()  # between parts: close inspectors a reload replaced
            done += 1
            if limit and done >= limit:
                log.info("daemon.limit_reached", inspections=done)
                break

    def dead_workers(self) -> list[str]:
        """Worker threads that should run and do not (a dead one stops the watchdog ping and /healthz)."""
        dead = []
        if not self.plc.alive:
            dead.append("plc")
        if not self.recorder.records.alive:
            dead.append("records")
        if not self.recorder.archive.alive:
            dead.append("archive")
        if self.page_feed is not None and not self.page_feed.alive:
            dead.append("page")
        if self.mes is not None and not self.mes.alive:
            dead.append("mqtt")
        return dead

    # ------------------------------------------------------------ reload, health, stop
    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGINT, lambda *_: self.stop_event.set())
        signal.signal(signal.SIGHUP, lambda *_: self.reload_requested.set())

    def reload(self) -> bool:
        """Re-read the YAML; apply reloadable sections; keep everything on a bad edit.

        What the reload changes is audited first; if the entry cannot be written
        the reload is refused and the old values stay.
        """
        self.notifier.reloading()
        result = reload_config(self.config_path, self.config, self.config_sections)
        applied = result.applied
        if applied:
            try:
                for action, detail in reload_entries(self.config, result.config, self.recipes.resolved()):
                    self.audit.record(action, detail, actor="daemon (reload)")
            except AuditError as exc:
                log.error("reload.refused", reason=str(exc), kept=self.config.thresholds.model_dump())
                applied = False
            self._check_audit()
        if applied:
            self.config_sections = result.sections
            self.config = result.config
            self.config_id = config_hash(self.config)
            # Each owner applies its own part of the reload.
            self.recorder.reconfigure(self.config.archive, self.config_id)
            loading = self.recipes.apply(self.config)
            self.handshake.set_threshold(self.threshold)
            configure_logging(self.config.logging.level, self.config.logging.format)
            log.info(
                "reload.applied",
                thresholds=self.config.thresholds.model_dump(),
                threshold=self.threshold,
                recipes_loading=loading,
                needs_restart=result.needs_restart,
            )
        self.notifier.ready(self._status_line())
        return applied

    def _check_audit(self) -> None:
        """Verify the audit chain; a break is reported (log, metric, page), never a reason to stop the line."""
        verdict = self.audit.verify()
        problem = "" if verdict.ok else verdict.problem
        self.metrics.audit_ok.set(1 if verdict.ok else 0)
        if problem and problem != self.audit_problem:
            log.error("audit.chain_broken", problem=problem, hint="anomalyd audit --verify")
        elif not problem and self.audit_problem:
            log.info("audit.chain_whole", entries=verdict.entries)
        self.audit_problem = problem

    def health(self) -> dict[str, object]:
        loop_age = time.monotonic() - self._last_loop
        state: dict[str, object] = {
            "ready": self.handshake.status.ready,
            "camera": self.camera.ok,
            "plc": self.plc.up,
            "loop_age_s": round(loop_age, 3),
            "records_failing": self.recorder.failing,
            "records_pending": self.recorder.records.pending,
            **self.recorder.counts,
        }
        dead = self.dead_workers()
        state["workers_dead"] = dead
        state["healthy"] = (
            bool(state["ready"]) and loop_age < 5.0 and not self.recorder.failing and bool(state["plc"]) and not dead
        )
        return state

    def _status_line(self) -> str:
        c = self.recorder.counts
        return (
            f"OK {c['OK']} WARN {c['WARN']} NG {c['NG']} errors {c['errors']} "
            f"late {c['deadline_misses']} missed {c['missed_triggers']} "
            f"records {'FAILING' if self.recorder.failing else 'ok'} "
            f"plc {'up' if self.plc.up else 'down'} camera {'up' if self.camera.ok else 'down'}"
            + (f" DEAD {','.join(dead)}" if (dead := self.dead_workers()) else "")
        )

    def shutdown(self) -> int:
        log.info("daemon.stopping", **self.recorder.counts)
        self.audit.append("stop", {"counts": dict(self.recorder.counts)}, actor="daemon")
        self.notifier.stopping()
        self.handshake.stopping()
        self.plc.stop(final=self.handshake.status)
        self.camera.close()
        self.recorder.close(last_issued=self.handshake.status.inspection_id)
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.page_server is not None:
            self.page_server.close()
        if self.page_feed is not None:
            self.page_feed.close()
        if self.mes is not None:
            self.mes.close()  # after the records: the last results are on their way, then "offline"
        self.recipes.close()
        self.notifier.close()
        log.info("daemon.stopped")
        return 0


def check_data_dir(path: Path) -> None:
    """The data folder must exist (or be creatable) and take files, or nothing can be recorded."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(
            f"daemon.data_dir {path}: not writable ({exc.strerror}); create it and give the daemon's user write access"
        ) from None


def run_daemon(config_path: Path) -> int:
    config = load_config(config_path)
    configure_logging(config.logging.level, config.logging.format)
    log.info("daemon.starting", config=str(config_path), pid=os.getpid(), config_hash=config_hash(config))
    daemon = Daemon(config_path, config)
    daemon.start()
    return daemon.run()
