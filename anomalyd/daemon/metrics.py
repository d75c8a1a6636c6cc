"""Prometheus metrics and /healthz on loopback (by default).

Names follow Prometheus' conventions (promtool-clean): durations in seconds, one
histogram per meaning (per-stage time, the model's total, frame to result) so a
sum over a label means something, counters end in ``_total``, no ``_created``
series, and a build-info gauge that carries the version and the line's name.
"""

from __future__ import annotations

import json
import platform
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from anomalyd import __version__
from anomalyd.errors import StartupError

# `_created` gauges double every counter's series and no dashboard reads them.
prometheus_client.disable_created_metrics()

_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)


def line_name(configured: str) -> str:
    """The line's name in metrics and messages: as configured, else the host's name."""
    return configured or socket.gethostname()


class Metrics:
    def __init__(self, line: str = "") -> None:  # line: the resolved name (line_name); "" → the host's
        self.registry = CollectorRegistry()
        r = self.registry
        self.build_info = Gauge(
            "anomalyd_build_info",
            "Always 1; the labels say which build runs on which line",
            ["version", "python", "line"],
            registry=r,
        )
        self.build_info.labels(version=__version__, python=platform.python_version(), line=line_name(line)).set(1)
        self.inspections = Counter(
            "anomalyd_inspections", "Answers by verdict the PLC was told", ["verdict"], registry=r
        )
        self.stage_seconds = Histogram(
            "anomalyd_stage_duration_seconds",
            "Time per model stage (preprocess, extract, search, map)",
            ["stage"],
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "anomalyd_inference_duration_seconds",
            "The model's time per frame, all stages",
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.frame_to_result_seconds = Histogram(
            "anomalyd_frame_to_result_seconds",
            "From the frame (or trigger) to the result written for the PLC",
            buckets=_BUCKETS_S,
            registry=r,
        )
        self.deadline_misses = Counter("anomalyd_deadline_misses", "Results later than the budget", registry=r)
        self.errors = Counter("anomalyd_errors", "Errors by PLC error code", ["code"], registry=r)
        self.camera_connected = Gauge("anomalyd_camera_connected", "1 while the camera is open", registry=r)
        self.plc_connected = Gauge(
            "anomalyd_plc_connected", "1 while a PLC is connected (server modes: a client read lately)", registry=r
        )
        self.ready = Gauge("anomalyd_ready", "1 while the daemon reports ready", registry=r)
        self.score = Gauge("anomalyd_last_score", "Normalised score of the last inspection", registry=r)
        self.reconnects = Counter("anomalyd_plc_reconnects", "PLC reconnections", registry=r)
        self.records_ok = Gauge("anomalyd_records_ok", "1 while records are written, 0 while they fail", registry=r)
        self.records_ok.set(1)
        self.records_pending = Gauge("anomalyd_records_pending", "Records waiting to be written", registry=r)
        self.drift = Gauge(
            "anomalyd_drift", "1 while a recipe's scores drift from its calibration", ["recipe"], registry=r
        )
        self.score_median = Gauge(
            "anomalyd_score_median",
            "Median normalised score of the recipe's last drift.window parts (from its first part on)",
            ["recipe"],
            registry=r,
        )
        self.score_reference = Gauge(
            "anomalyd_score_reference",
            "Median normalised score of the good images held back at fit (what drift compares with)",
            ["recipe"],
            registry=r,
        )
        self.records_unwritten = Gauge(
            "anomalyd_records_unwritten",
            "Records that reached only stderr (record.unwritten lines), not the database or its journal",
            registry=r,
        )
        self.audit_ok = Gauge("anomalyd_audit_chain_ok", "1 while the audit log's hash chain is whole", registry=r)
        self.audit_ok.set(1)
        self.certificate_expiry = Gauge(
            "anomalyd_opcua_certificate_expiry_timestamp_seconds",
            "When an OPC UA certificate in use expires (Unix time)",
            ["certificate"],
            registry=r,
        )
        self.ids_ok = Gauge("anomalyd_inspection_ids_ok", "1 while the inspection counter can be saved", registry=r)
        self.ids_ok.set(1)
        # Counts kept by the workers themselves, read at scrape time (bound by their owners).
        self._counts: dict[str, Callable[[], float]] = {}
        for name, help_text in (
            ("records_dropped", "Records dropped from memory while the database refused them (each also on stderr)"),
            ("archive_skipped", "Reject images not saved (disk quota or free-space reserve)"),
            ("page_skipped_images", "Results shown on the page without images (the page was behind)"),
            (
                "page_skipped_results",
                "Results the page never showed (it was far behind; the PLC and records have them)",
            ),
        ):
            self._counts[name] = lambda: 0.0
            r.register(_CountFrom(f"anomalyd_{name}", help_text, self._counts, name))
        self.mqtt_connected = Gauge("anomalyd_mqtt_connected", "1 while the MQTT broker is connected", registry=r)
        self.mqtt_published = Counter("anomalyd_mqtt_published", "Results the MQTT broker acknowledged", registry=r)
        self.mqtt_dropped = Counter(
            "anomalyd_mqtt_dropped", "Results dropped from a full MQTT queue (the records keep them)", registry=r
        )
        self.mqtt_waiting = Gauge(
            "anomalyd_mqtt_waiting", "Results queued for or in flight to the MQTT broker", registry=r
        )
        self.missed_triggers = Counter(
            "anomalyd_missed_triggers", "Triggers answered without an inspection, by error code", ["code"], registry=r
        )

    def count_from(self, name: str, read: Callable[[], float]) -> None:
        """Export a worker's own count (``records_dropped`` …) as the counter ``anomalyd_<name>_total``."""
        if name not in self._counts:
            raise KeyError(f"no counter {name!r}")
        self._counts[name] = read


class _CountFrom(Collector):
    def __init__(self, name: str, help_text: str, sources: dict[str, Callable[[], float]], key: str) -> None:
        self.name, self.help_text, self.sources, self.key = name, help_text, sources, key

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(self.name, self.help_text, value=float(self.sources[self.key]()))


class LabelledOutcomes(Collector):
    """Escapes and false rejects among the labelled parts, read from the records database at scrape time.

    Labels come from the page and from ``anomalyd label`` (another process), so
    they are counted from the database, never on the inspection loop; a scrape
    reads it at most every ``every_s`` seconds.
    """

    def __init__(self, database: Path, every_s: float = 5.0) -> None:
        self.database, self.every_s = database, every_s
        self._at = -float("inf")
        self._counts: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def counts(self) -> tuple[int, int, int] | None:
        """(escapes, false rejects, labelled parts); None while the database cannot be read."""
        with self._lock:
            if time.monotonic() - self._at >= self.every_s:
                self._at = time.monotonic()
                self._counts = self._read()
            return self._counts

    def _read(self) -> tuple[int, int, int] | None:
        if not self.database.exists():
            return (0, 0, 0)
        try:
            db = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True, timeout=1.0)
            try:
                has = db.execute("SELECT 1 FROM sqlite_master WHERE name = 'labels'").fetchone()
                if not has:
                    return (0, 0, 0)
                row = db.execute(
                    "SELECT SUM(l.label = 'defect' AND i.verdict != 'NG'), SUM(l.label = 'good' AND i.verdict = 'NG'), "
                    "COUNT(*) FROM (SELECT inspection_id, label FROM labels WHERE seq IN "
                    "(SELECT MAX(seq) FROM labels GROUP BY inspection_id)) AS l "
                    "JOIN inspections AS i ON i.inspection_id = l.inspection_id"
                ).fetchone()
            finally:
                db.close()
        except sqlite3.Error:
            return None
        return (int(row[0] or 0), int(row[1] or 0), int(row[2] or 0))

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self.counts()
        if counts is None:
            return
        escapes, false_rejects, labelled = counts
        yield GaugeMetricFamily(
            "anomalyd_labelled_escapes", "Parts that passed and were later labelled defect (kept records)", escapes
        )
        yield GaugeMetricFamily(
            "anomalyd_labelled_false_rejects", "Parts that failed and were labelled good (kept records)", false_rejects
        )
        yield GaugeMetricFamily("anomalyd_labelled_parts", "Parts with a label (kept records)", labelled)


class MetricsServer:
    """/metrics (Prometheus text) and /healthz (200 when healthy, else 503) in a thread."""

    def __init__(self, metrics: Metrics, host: str, port: int, health: Callable[[], dict[str, object]]) -> None:
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            # A client that connects and sends nothing is dropped, not kept forever.
            timeout = 5.0

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    body, ctype, code = generate_latest(registry), CONTENT_TYPE_LATEST, 200
                elif path == "/healthz":
                    state = health()
                    body = json.dumps(state).encode()
                    ctype, code = "application/json", 200 if state.get("healthy") else 503
                else:
                    body, ctype, code = b"not found\n", "text/plain", 404
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep the journal for our own events
                pass

        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise StartupError(
                f"metrics.port {port} on {host}: cannot listen ({exc.strerror}); "
                "another process has it, or choose another port (0: any free port)"
            ) from None
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
