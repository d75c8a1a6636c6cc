"""Where the next part comes from: a PLC trigger, a hardware-triggered frame, or free run.

Each part arrives with its :class:`Ticket` (the window its answer goes into) and
either its frame or the error that prevented one.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass

from anomalyd.daemon.camera_supervisor import CameraSupervisor
from anomalyd.daemon.handshake import Answer, ErrorCode, Handshake, Ticket
from anomalyd.drivers.camera.base import BadFrame, CameraError, CameraTimeout, Frame


@dataclass(frozen=True)
class Part:
    """One part to answer: its window and its frame, or why there is no frame."""

    ticket: Ticket
    frame: Frame | None = None
    error: ErrorCode = ErrorCode.OK
    reason: str = ""
    frame_at: float = 0.0  # monotonic time the frame arrived (start of the budget)


class Dispatcher:
    """Waits at most ``tick_s`` for the next part, so the loop stays responsive."""

    def __init__(
        self,
        mode: str,
        handshake: Handshake,
        camera: CameraSupervisor,
        triggers: queue.Queue[Ticket],
        grab_timeout_s: float,
        tick_s: float,
        on_refused: Callable[[Answer], None] = lambda answer: None,
    ) -> None:
        self.mode = mode
        self.handshake = handshake
        self.camera = camera
        self.triggers = triggers
        self.grab_timeout_s = grab_timeout_s
        self.tick_s = tick_s
        self.on_refused = on_refused

    def next_part(self) -> Part | None:
        if self.mode == "plc":
            return self._from_trigger()
        return self._from_stream()

    def _from_trigger(self) -> Part | None:
        try:
            ticket = self.triggers.get(timeout=self.tick_s)
        except queue.Empty:
            return None
        if not self.handshake.is_open(ticket):
            # The deadline answered while the ticket waited (the loop was held up): taking a
            # frame now would inspect some later part under this part's name.
            return Part(ticket, error=ErrorCode.OVER_BUDGET, reason="deadline passed before the frame was taken")
        cam = self.camera
        if not cam.ok:
            return Part(ticket, error=ErrorCode.CAMERA_DISCONNECTED, reason="camera is being reopened")
        try:
            cam.camera.software_trigger()
            frame = cam.camera.grab(self.grab_timeout_s)
        except CameraTimeout as exc:
            return Part(ticket, error=ErrorCode.CAMERA_TIMEOUT, reason=str(exc))
        except BadFrame as exc:
            return Part(ticket, error=ErrorCode.BAD_FRAME, reason=str(exc))
        except CameraError as exc:
            cam.lost(str(exc))
            return Part(ticket, error=ErrorCode.CAMERA_DISCONNECTED, reason=str(exc))
        frame_at = time.monotonic()
        self.handshake.arm(ticket, frame_at)
        return Part(ticket, frame, frame_at=frame_at)

    def _from_stream(self) -> Part | None:
        cam = self.camera
        try:
            frame = cam.camera.grab(min(self.grab_timeout_s, self.tick_s))
        except CameraTimeout:
            return None  # no part in front of the camera: not an error in these modes
        except BadFrame as exc:
            edge = self.handshake.begin(time.monotonic())  # a part passed; its frame is unusable: NG, code 5
            if edge is None:
                return None  # no id may be issued (the counter cannot be saved): not answered
            if isinstance(edge, Answer):
                self.on_refused(edge)
                return None
            return Part(edge, error=ErrorCode.BAD_FRAME, reason=str(exc))
        except CameraError as exc:
            cam.lost(str(exc))
            return None
        frame_at = time.monotonic()
        if self.mode == "free_run" and not self.handshake.enabled:
            return None  # free run inspects whatever passes; enable = 0 means: not now
        edge = self.handshake.begin(frame_at)
        if edge is None:
            return None
        if isinstance(edge, Answer):
            self.on_refused(edge)  # hardware trigger while enable = 0: this part is answered NG
            return None
        self.handshake.arm(edge, frame_at)
        return Part(edge, frame, frame_at=frame_at)
