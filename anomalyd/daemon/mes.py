"""Results to the MES over MQTT: one JSON message per answer, the daemon's state retained with a last will.

Topics (``<prefix>`` is ``mqtt.topic_prefix``, by default ``anomalyd/<line>``):

- ``<prefix>/result``: one message per answer the PLC was given (QoS 1, not retained),
  in the order the answers were given.
- ``<prefix>/state``: ``online`` on every connect, ``offline`` on a clean stop and, as
  the last will, when the daemon dies or its link does (QoS 1, retained).

It never blocks the line: the recorder hands a result over with one append to a
bounded queue; a thread of its own publishes. While the broker is away results
wait in that queue (``mqtt.queue_size``) and go out in order when it returns; a
full queue drops its *oldest* result, counts it (``anomalyd_mqtt_dropped_total``)
and logs once per outage. The records database has every result, so an MES can
reconcile a gap by inspection id. Up to ``_MAX_UNACKED`` results are handed to
paho at a time; paho sends those again after a reconnect (QoS 1).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from anomalyd.config import MqttConfig
from anomalyd.daemon.handshake import ERROR_MEANINGS, ErrorCode
from anomalyd.daemon.metrics import Metrics
from anomalyd.daemon.records import Record
from anomalyd.decision import Label
from anomalyd.errors import StartupError
from anomalyd.log import get_logger

log = get_logger(__name__)

_MAX_UNACKED = 100


def result_message(record: Record, line: str, overlay_path: str | None = None) -> dict[str, Any]:
    """The JSON body of one result: what the PLC was told about which part, by which model, when."""
    code = ErrorCode(record.error_code)
    message: dict[str, Any] = {
        "line": line,
        "inspection_id": record.inspection_id,
        "part_id": record.part_id,
        "recipe": record.recipe,
        "verdict": record.verdict,
        "passed": record.verdict != Label.NG,
        "score": record.score,
        "threshold": record.threshold,
        "error_code": int(code),
        "error": code.name.lower(),
        "error_text": ERROR_MEANINGS[code],
        "late": bool(record.late),
        "refused": bool(record.refused),
        "latency_ms": None if record.latency_ms is None else round(record.latency_ms, 2),
        "bundle_id": record.bundle_id,
        "time": dt.datetime.fromtimestamp(record.time_ns / 1e9, dt.timezone.utc).isoformat(timespec="milliseconds"),
    }
    images = {}
    if record.archive_path:
        images["frame"] = Path(record.archive_path).name
    if overlay_path:
        images["overlay"] = Path(overlay_path).name
    if images:
        message["images"] = images  # names in the reject archive (daemon.data_dir/archive)
    return message


class MqttPublisher:
    def __init__(self, config: MqttConfig, line: str, metrics: Metrics) -> None:
        import paho.mqtt.client as mqtt

        self.line = line
        prefix = config.topic_prefix.rstrip("/") or f"anomalyd/{line}"
        self.result_topic, self.state_topic = f"{prefix}/result", f"{prefix}/state"
        self.metrics = metrics
        self._queue: deque[dict[str, Any]] = deque()
        self._size = config.queue_size
        self._cond = threading.Condition()
        self._closed = False
        self._connected = False
        self._outage_logged = False
        self._mids = threading.Lock()  # never held while calling paho (its callbacks take its own locks)
        self._unacked: set[int] = set()
        self._acked_early: set[int] = set()

        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id or f"anomalyd-{line}", clean_session=True
        )
        client.max_inflight_messages_set(20)
        client.reconnect_delay_set(1, 30)
        client.will_set(self.state_topic, self._state("offline"), qos=1, retain=True)
        if config.username:
            password = None
            if config.password_file is not None:
                try:
                    password = config.password_file.read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise StartupError(f"mqtt.password_file {config.password_file}: {exc.strerror}") from None
            client.username_pw_set(config.username, password)
        if config.tls:
            try:
                client.tls_set(
                    ca_certs=str(config.ca_file) if config.ca_file else None,
                    certfile=str(config.cert_file) if config.cert_file else None,
                    keyfile=str(config.key_file) if config.key_file else None,
                )
            except (OSError, ValueError) as exc:
                raise StartupError(f"mqtt TLS: {exc}") from None
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        self._client = client
        # connect_async: an absent broker at start is an outage like any other, not a start-up fault.
        client.connect_async(config.host, config.port, keepalive=config.keepalive_s)
        client.loop_start()
        metrics.mqtt_waiting.set_function(lambda: self.waiting)
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()
        log.info("mqtt.publishing", broker=f"{config.host}:{config.port}", topic=self.result_topic, tls=config.tls)

    def _state(self, state: str) -> bytes:
        return json.dumps({"line": self.line, "state": state}).encode()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        """Results not yet acknowledged by the broker (queued here and in flight)."""
        with self._mids:
            return len(self._queue) + len(self._unacked)

    def offer(self, record: Record, overlay_path: str | None = None) -> None:
        """From the recorder, on the inspection thread: one append, never a wait."""
        message = result_message(record, self.line, overlay_path)
        with self._cond:
            if len(self._queue) >= self._size:
                self._queue.popleft()
                self.metrics.mqtt_dropped.inc()
                if not self._outage_logged:
                    self._outage_logged = True
                    log.warning(
                        "mqtt.dropping",
                        queue_size=self._size,
                        note="the broker is away and the queue is full: the oldest results are dropped "
                        "(the records database keeps them)",
                    )
            self._queue.append(message)
            self._cond.notify()

    # ------------------------------------------------------------ paho's thread
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt.refused", reason=str(reason))
            return
        client.publish(self.state_topic, self._state("online"), qos=1, retain=True)
        with self._cond:
            self._connected = True
            self._outage_logged = False
            self._cond.notify()
        self.metrics.mqtt_connected.set(1)
        log.info("mqtt.connected", waiting=self.waiting)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        with self._cond:
            was = self._connected
            self._connected = False
        self.metrics.mqtt_connected.set(0)
        if was and not self._closed:
            log.warning("mqtt.disconnected", reason=str(reason), note="results wait in the queue; paho reconnects")

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        with self._mids:
            if mid in self._unacked:
                self._unacked.discard(mid)
                self.metrics.mqtt_published.inc()
            else:
                self._acked_early.add(mid)  # acknowledged before publish() returned its mid to us
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------ our thread
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not (self._connected and self._queue and len(self._unacked) < _MAX_UNACKED):
                    self._cond.wait(0.5)
                if self._closed:
                    return
                message = self._queue.popleft()
            try:
                info = self._client.publish(self.result_topic, json.dumps(message).encode(), qos=1)
            except Exception:  # a message paho refuses is logged and skipped, never a dead thread
                log.exception("mqtt.publish_failed", inspection_id=message.get("inspection_id"))
                continue
            with self._mids:
                if info.mid in self._acked_early:
                    self._acked_early.discard(info.mid)
                    self.metrics.mqtt_published.inc()
                else:
                    self._unacked.add(info.mid)

    def close(self, timeout_s: float = 2.0) -> None:
        """Send what can be sent within ``timeout_s``, say offline (retained), disconnect."""
        deadline = time.monotonic() + timeout_s
        while self._connected and self.waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=1.0)
        if self._connected:
            info = self._client.publish(self.state_topic, self._state("offline"), qos=1, retain=True)
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        self._client.disconnect()
        self._client.loop_stop()
        if self.waiting:
            log.warning("mqtt.unsent_at_stop", count=self.waiting, note="the records database has them")
