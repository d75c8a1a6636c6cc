"""The thread that owns the PLC link: polls commands, writes the status block, reconnects.

It is the only writer of the status block, so a write is always the whole
block as the handshake holds it. A pulled cable is noticed by the next poll
(every ``poll_ms``, well inside one heartbeat period), logged once at error
level, retried with back-off, and after reconnecting the block is rewritten.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable

from anomalyd.daemon.handshake import Answer, Handshake, Ticket
from anomalyd.drivers.plc.base import PlcDisconnected, PlcError, PlcLink
from anomalyd.drivers.plc.layout import Status
from anomalyd.log import get_logger

log = get_logger(__name__)


class PlcWorker:
    def __init__(
        self,
        link: PlcLink,
        handshake: Handshake,
        heartbeat_s: float,
        poll_s: float,
        reconnect_max_s: float,
        on_connection: Callable[[bool], None] = lambda up: None,
        on_refused: Callable[[Answer], None] = lambda answer: None,
        on_expired: Callable[[Answer], None] = lambda answer: None,
        loop_alive: Callable[[], bool] = lambda: True,
        client_timeout_s: float = 1.0,
    ) -> None:
        self.link = link
        self.handshake = handshake
        self.heartbeat_s = heartbeat_s
        self.poll_s = poll_s
        self.reconnect_max_s = reconnect_max_s
        self.on_connection = on_connection
        self.on_refused = on_refused
        self.on_expired = on_expired
        self.loop_alive = loop_alive
        self.client_timeout_s = client_timeout_s
        self._peer_up = False  # what on_connection was last told
        self.triggers: queue.Queue[Ticket] = queue.Queue()
        self.connected = False
        self.reconnect_times_s: list[float] = []
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._last_written: Status | None = None
        self._fatal: Exception | None = None
        self._last_fault: type[BaseException] | None = None
        self._thread = threading.Thread(target=self._run, name="plc", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The worker runs (or was never started / was stopped on purpose)."""
        return self._thread.is_alive() or self._stop.is_set() or self._thread.ident is None

    def _guarded(self, callback: Callable[[Answer], None], answer: Answer) -> None:
        """A listener's fault is logged; the answer is already in the block, the worker goes on."""
        try:
            callback(answer)
        except Exception:
            log.exception("plc.listener_failed", id=answer.status.inspection_id)

    @property
    def up(self) -> bool:
        """A PLC is there: our link is connected, and in server modes a client has read the status lately."""
        seen = getattr(self.link, "client_seen", None)
        return self.connected and (seen is None or bool(seen(self.client_timeout_s)))

    def _notify_connection(self) -> None:
        """Tell on_connection when :attr:`up` changes (connect, disconnect, a server's client comes or goes)."""
        up = self.up
        if up == self._peer_up:
            return
        self._peer_up = up
        if getattr(self.link, "client_seen", None) is not None:
            log.info("plc.client_reading" if up else "plc.no_client_reading", link=self.link.name)
        try:
            self.on_connection(up)
        except Exception:
            log.exception("plc.listener_failed")

    def wake(self) -> None:
        """A result is ready: write it now, not at the next poll."""
        self._wake.set()

    def _connect(self) -> bool:
        try:
            self.link.open()
        except PlcDisconnected as exc:
            log.debug("plc.connect_failed", link=self.link.name, error=str(exc))
            return False
        except PlcError as exc:
            # Wrong DB / registers: log every time so a technician sees it, but keep trying
            # (the PLC programmer may be downloading the DB right now).
            if str(exc) != str(self._fatal):
                log.error("plc.misconfigured", link=self.link.name, error=str(exc))
            self._fatal = exc
            return False
        except Exception as exc:  # a driver fault we did not foresee: keep trying, never die
            if type(exc) is not self._last_fault:
                log.exception("plc.open_failed", link=self.link.name)
                self._last_fault = type(exc)
            return False
        self._fatal = None
        self._last_written = None  # rewrite the whole block after every (re)connect
        try:
            in_plc = self.link.read_status()
        except Exception as exc:  # PlcError or any other: the link is not usable yet
            log.debug("plc.status_unreadable", link=self.link.name, error=str(exc))
            return False
        # An id the PLC has already seen (our records lost, the counter file deleted) is never reissued.
        if in_plc is not None and self.handshake.continue_from(in_plc.inspection_id):
            log.warning("plc.ids_continued", link=self.link.name, inspection_id=in_plc.inspection_id)
        return True

    def _run(self) -> None:
        backoff = 0.1
        lost_at: float | None = None
        next_beat = time.monotonic() + self.heartbeat_s
        logged_down = False
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                # The heartbeat proves the inspection loop is alive, not only this thread.
                self.handshake.beat(self.loop_alive())
                next_beat += self.heartbeat_s
                if next_beat < now:  # we were blocked (reconnect): do not burst beats
                    next_beat = now + self.heartbeat_s
            if (expired := self.handshake.expire(now)) is not None:
                self._guarded(self.on_expired, expired)
            if not self.connected:
                if self._connect():
                    self.connected = True
                    backoff = 0.1
                    if lost_at is not None:
                        self.reconnect_times_s.append(time.monotonic() - lost_at)
                    log.info("plc.connected", link=self.link.name, recovered=logged_down)
                    logged_down = False
                    self._notify_connection()
                else:
                    if not logged_down and self._fatal is None:
                        log.error("plc.unreachable", link=self.link.name, retry_max_s=self.reconnect_max_s)
                        logged_down = True
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, self.reconnect_max_s)
                    continue
            try:
                command = self.link.read_command()
                edge = self.handshake.on_command(command, time.monotonic())
                if isinstance(edge, Ticket):
                    self.triggers.put(edge)
                elif isinstance(edge, Answer):
                    self._guarded(self.on_refused, edge)  # only queued: the write below is not delayed
                status = self.handshake.status
                if status != self._last_written:
                    self.link.write_status(status)
                    self._last_written = status
            except PlcDisconnected as exc:
                self.connected = False
                lost_at = time.monotonic()
                log.error("plc.disconnected", link=self.link.name, error=str(exc))
                logged_down = True
                self._notify_connection()
                continue
            except Exception as exc:  # any other fault (a driver's, a listener's): drop the link, reopen it
                self.connected = False
                lost_at = time.monotonic()
                if type(exc) is not self._last_fault:  # once per kind of fault, not once per retry
                    log.exception("plc.worker_error", link=self.link.name)
                    self._last_fault = type(exc)
                logged_down = True
                self._notify_connection()
                with contextlib.suppress(Exception):
                    self.link.close()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.reconnect_max_s)
                continue
            self._last_fault = None
            self._notify_connection()
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def stop(self, final: Status | None = None) -> None:
        """Stop polling; write ``final`` (e.g. ready = 0) if connected."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)
        if final is not None and self.connected:
            with contextlib.suppress(PlcDisconnected):
                self.link.write_status(final)
        self.link.close()
