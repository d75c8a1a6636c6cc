"""The PLC handshake as a pure state machine: commands and results in, status out.

No I/O here: the PLC worker feeds it what it read and writes what it returns,
so every timing rule is unit-tested without a PLC.

Timing (one inspection)::

    trigger       ___/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\______________
    trigger_ack   _____/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\____________   echoes trigger
    busy          _____/‾‾‾‾‾‾‾‾\\_______________________   set on the edge, cleared with the result
    result_valid  ‾‾‾‾‾\\________/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\_____   cleared on trigger, set with result, cleared by result_ack
    result_toggle _____________/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾   flips once per result
    result_ack    ___________________________/‾‾‾‾\\___   PLC: "I have read it"
"""

from __future__ import annotations

import threading
from dataclasses import replace
from enum import IntEnum

from anomalyd.drivers.plc.layout import Command, Status


class ErrorCode(IntEnum):
    """Values of the status block's ``error_code`` (the README's table)."""

    OK = 0
    CAMERA_TIMEOUT = 1
    OVER_BUDGET = 2
    MODEL_ERROR = 3
    CAMERA_DISCONNECTED = 4
    BAD_FRAME = 5
    TRIGGER_OVERRUN = 6
    DISABLED = 7
    INTERNAL = 8


ERROR_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.OK: "no error",
    ErrorCode.CAMERA_TIMEOUT: "no frame within daemon.grab_timeout_ms after the trigger (part failed)",
    ErrorCode.OVER_BUDGET: "result later than daemon.budget_ms (part failed, never a late pass)",
    ErrorCode.MODEL_ERROR: "the model raised an error on this frame (part failed)",
    ErrorCode.CAMERA_DISCONNECTED: "camera lost; the daemon is reopening it (ready = 0)",
    ErrorCode.BAD_FRAME: "frame of the wrong size or format (part failed)",
    ErrorCode.TRIGGER_OVERRUN: "trigger while busy; the extra trigger was ignored",
    ErrorCode.DISABLED: "trigger while enable = 0; no inspection was made",
    ErrorCode.INTERNAL: "unexpected internal error (see the log)",
}


# Faults that last until something recovers (cleared when ready returns).
STANDING_FAULTS = (ErrorCode.CAMERA_DISCONNECTED, ErrorCode.INTERNAL)


class Handshake:
    """Holds the status block and applies the handshake rules; thread-safe."""

    def __init__(self, threshold: float = 0.0, inspection_id: int = 0) -> None:
        self._lock = threading.Lock()
        self._status = Status(threshold=threshold, inspection_id=inspection_id)
        self._last_trigger = False
        self._last_ack = False
        self._deadline: float | None = None

    @property
    def status(self) -> Status:
        with self._lock:
            return self._status

    def _set(self, **changes: object) -> Status:
        self._status = replace(self._status, **changes)  # type: ignore[arg-type]
        return self._status

    def on_command(self, command: Command) -> bool:
        """Apply what the PLC wrote; True when this is a trigger to inspect."""
        with self._lock:
            rising = command.trigger and not self._last_trigger
            ack_rising = command.result_ack and not self._last_ack
            self._last_trigger, self._last_ack = command.trigger, command.result_ack
            changes: dict[str, object] = {"trigger_ack": command.trigger}
            if ack_rising:
                changes["result_valid"] = False
            start = False
            if rising:
                if not command.enable:
                    changes.update(error=True, error_code=int(ErrorCode.DISABLED))
                elif self._status.busy:
                    changes.update(error=True, error_code=int(ErrorCode.TRIGGER_OVERRUN))
                elif not self._status.ready:
                    changes.update(error=True, error_code=int(self._status.error_code or ErrorCode.INTERNAL))
                else:
                    changes.update(busy=True, result_valid=False)
                    self._deadline = None
                    start = True
            self._set(**changes)
            return start

    def begin(self) -> None:
        """An inspection starts without a PLC trigger (hardware trigger, free run)."""
        with self._lock:
            self._deadline = None
            self._set(busy=True, result_valid=False)

    def arm(self, deadline: float) -> None:
        """The frame is here: the result is due by ``deadline`` (monotonic seconds)."""
        with self._lock:
            self._deadline = deadline

    def expire(self, now: float, budget_ms: float) -> Status | None:
        """Past the deadline with no result: publish a fail-safe NG now (never a late pass)."""
        with self._lock:
            if not self._status.busy or self._deadline is None or now < self._deadline:
                return None
            return self._publish(0.0, self._status.threshold, False, int(ErrorCode.OVER_BUDGET), budget_ms)

    def finish(self, score: float, threshold: float, passed: bool, error_code: int, latency_ms: float) -> Status | None:
        """Publish a result: fields, result_valid, toggle flip, inspection_id + 1, busy off.

        Returns None when the deadline already published a fail-safe result for
        this inspection (the late result is then only recorded, not sent).
        """
        with self._lock:
            if not self._status.busy:
                return None
            return self._publish(score, threshold, passed, error_code, latency_ms)

    def _publish(self, score: float, threshold: float, passed: bool, error_code: int, latency_ms: float) -> Status:
        self._deadline = None
        s = self._status
        return self._set(
            busy=False,
            result_valid=True,
            result_toggle=not s.result_toggle,
            inspection_id=(s.inspection_id + 1) & 0xFFFFFFFF,
            passed=passed and error_code == 0,
            fail=not passed or error_code != 0,
            error=error_code != 0,
            error_code=int(error_code),
            score=float(score),
            threshold=float(threshold),
            latency_ms=float(latency_ms),
        )

    def beat(self) -> None:
        """One heartbeat period passed (16-bit counter, wraps)."""
        with self._lock:
            self._set(heartbeat=(self._status.heartbeat + 1) & 0xFFFF)

    def set_ready(self, ready: bool, error_code: int = 0) -> None:
        """Model/camera/PLC readiness; a standing fault shows as error + code while not ready."""
        with self._lock:
            if not ready:
                self._set(ready=False, error=error_code != 0, error_code=int(error_code))
            elif self._status.error_code in STANDING_FAULTS:
                self._set(ready=True, error=False, error_code=0)
            else:
                self._set(ready=True)

    def set_threshold(self, threshold: float) -> None:
        with self._lock:
            self._set(threshold=float(threshold))
