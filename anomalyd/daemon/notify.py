"""systemd's sd_notify protocol, spoken directly (no libsystemd binding needed)."""

from __future__ import annotations

import contextlib
import os
import socket
import time


class Notifier:
    """Sends READY/WATCHDOG/STATUS/STOPPING to $NOTIFY_SOCKET; silent when not under systemd."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address:
            # A leading '@' names a socket in the abstract namespace.
            self._address = b"\0" + address[1:].encode() if address.startswith("@") else address
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_s = usec / 1e6 if usec and (pid is None or int(pid) == os.getpid()) else 0.0
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if self._address else None
        self._next_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *lines: str) -> None:
        if self._socket is None or self._address is None:
            return
        # Never block the inspection loop on systemd: a full queue drops the message.
        with contextlib.suppress(OSError):
            self._socket.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, self._address)

    def ready(self, status: str = "") -> None:
        self.send("READY=1", f"STATUS={status}" if status else "STATUS=ready")

    def watchdog(self) -> None:
        """Ping at a quarter of WatchdogSec (once a second without one), however often called."""
        now = time.monotonic()
        if now >= self._next_ping:
            self._next_ping = now + (self.watchdog_s / 4 if self.watchdog_s else 1.0)
            self.send("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        """Start-up takes longer (a TensorRT plan is being built): ask systemd for ``seconds`` more."""
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}", "STATUS=building the TensorRT plan")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
