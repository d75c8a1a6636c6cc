"""Keeps the camera open: opens it, notices its loss, reopens it with back-off, checks frames."""

from __future__ import annotations

import time
from typing import Any

from anomalyd.daemon.handshake import ErrorCode, Handshake
from anomalyd.daemon.metrics import Metrics
from anomalyd.drivers.camera.base import Camera, CameraDisconnected, CameraError, Frame, open_camera
from anomalyd.log import get_logger

log = get_logger(__name__)

BACKOFF_FIRST_S = 0.5
BACKOFF_MAX_S = 10.0


class CameraSupervisor:
    """Owns the camera's life; the loop asks ``ensure_open()`` and reports ``lost()``.

    ``ensure_open`` never sleeps longer than it is told, so the loop keeps
    proving it is alive (the PLC heartbeat) while a camera is away.
    """

    def __init__(self, config: Any, handshake: Handshake, metrics: Metrics, camera: Camera | None = None) -> None:
        self.config = config
        self.handshake = handshake
        self.metrics = metrics
        self.camera: Camera = camera if camera is not None else open_camera(config)
        self.ok = False
        self.expected_shape: tuple[int, ...] | None = None
        self._reported_down = False
        # camera.reopen_backoff_s (GenICam cameras) is the first wait; it doubles up to 10 s (or that value).
        self._first_backoff_s = float(getattr(config, "reopen_backoff_s", BACKOFF_FIRST_S))
        self._max_backoff_s = max(BACKOFF_MAX_S, self._first_backoff_s)
        self._backoff_s = self._first_backoff_s
        self._next_attempt = 0.0
        self._opened_once = False

    @property
    def name(self) -> str:
        return self.camera.name

    def ensure_open(self, now: float | None = None) -> bool:
        """True when the camera is open; otherwise try to reopen it if the back-off allows."""
        if self.ok:
            return True
        now = time.monotonic() if now is None else now
        if now < self._next_attempt:
            return False
        try:
            self.camera.open()
        except CameraError as exc:
            if not isinstance(exc, CameraDisconnected) and not self._opened_once:
                raise  # refused settings at start-up: a person must fix them (exit 2)
            self.lost(str(exc))
            self._next_attempt = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self._max_backoff_s)
            return False
        if self._reported_down:
            log.info("camera.recovered", camera=self.name)
        self.ok = True
        self._opened_once = True
        self._reported_down = False
        self._backoff_s = self._first_backoff_s
        self.expected_shape = None
        self.metrics.camera_connected.set(1)
        self.metrics.ready.set(1)
        self.handshake.set_ready(True)
        return True

    def lost(self, reason: str) -> None:
        """The device is gone: ready = 0 with code 4, close it, reopen later."""
        if not self._reported_down:  # once per outage: no log storm while it stays away
            log.error("camera.lost", camera=self.name, error=reason)
            self._reported_down = True
        self.ok = False
        self.metrics.camera_connected.set(0)
        self.metrics.ready.set(0)
        self.handshake.set_ready(False, int(ErrorCode.CAMERA_DISCONNECTED))
        try:
            self.camera.close()
        except Exception as exc:  # a dead device may fail to close; we reopen anyway
            log.debug("camera.close_failed", error=str(exc))

    def check(self, frame: Frame) -> str | None:
        """Why ``frame`` cannot be inspected (wrong size after the first frame), or None."""
        if self.expected_shape is None:
            self.expected_shape = frame.image.shape
        if frame.image.shape != self.expected_shape:
            return f"frame {frame.image.shape}, expected {self.expected_shape}"
        return None

    def close(self) -> None:
        if self.ok:
            self.camera.close()
            self.ok = False
