"""Prometheus metrics and /healthz on loopback (by default)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from anomalyd.errors import StartupError

_BUCKETS_MS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 75, 100, 150, 250, 500, 1000, 2500)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.inspections = Counter("anomalyd_inspections", "Inspections by verdict", ["verdict"], registry=r)
        self.latency = Histogram(
            "anomalyd_latency_ms", "Latency per stage in milliseconds", ["stage"], buckets=_BUCKETS_MS, registry=r
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
            "anomalyd_score_median", "Rolling median of the parts' scores", ["recipe"], registry=r
        )
        self.records_unwritten = Gauge(
            "anomalyd_records_unwritten",
            "Records that reached only stderr (record.unwritten lines), not the database or its journal",
            registry=r,
        )
        self.audit_ok = Gauge("anomalyd_audit_chain_ok", "1 while the audit log's hash chain is whole", registry=r)
        self.audit_ok.set(1)
        self.certificate_days = Gauge(
            "anomalyd_certificate_days_left", "Days until an OPC UA certificate expires", ["certificate"], registry=r
        )
        self.ids_ok = Gauge("anomalyd_id_counter_ok", "1 while the inspection counter can be saved", registry=r)
        self.ids_ok.set(1)
        self.missed_triggers = Counter(
            "anomalyd_missed_triggers", "Triggers answered without an inspection, by error code", ["code"], registry=r
        )


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
        self.started = time.time()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
