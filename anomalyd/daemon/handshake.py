"""The PLC handshake as a pure state machine: commands, frames and results in, status out.

No I/O and no clock of its own: the PLC worker and the inspection loop feed it
what they read and the time, and publish what it returns, so every rule of the
result contract is unit-tested without a PLC.

The contract (docs/plc.md, "PLC integration"):

* Each accepted trigger opens one *window*, named by a :class:`Ticket`. A result
  is published only into the window of the trigger whose frame it scored; the
  status block then carries that trigger's ``part_id``.
* Every trigger gets exactly one answer. A refused one (``enable`` = 0, not
  ready, busy, a late inspection still running) is answered at once as a fail
  with its code, its own ``inspection_id`` and its ``part_id``.
* A window still open at its deadline is answered with the fail-safe NG
  (code 2); the model's late result is recorded, never published.
* ``pass`` = 1 never stands beside ``error`` = 1, and a non-finite score fails.

Timing (one inspection)::

    trigger       ___/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\______________
    trigger_ack   _____/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\____________   echoes trigger
    busy          _____/‾‾‾‾‾‾‾‾\\_______________________   set on the edge, cleared with the result
    result_valid  ‾‾‾‾‾\\________/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾\\_____   cleared on trigger, set with result, cleared by result_ack
    result_toggle _____________/‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾‾   flips once per answer
    result_ack    ___________________________/‾‾‾‾\\___   PLC: "I have read it"
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import IntEnum

from anomalyd.drivers.plc.layout import Command, Status


class ErrorCode(IntEnum):
    """Values of the status block's ``error_code`` (docs/plc.md)."""

    OK = 0
    CAMERA_TIMEOUT = 1
    OVER_BUDGET = 2
    MODEL_ERROR = 3
    CAMERA_DISCONNECTED = 4
    BAD_FRAME = 5
    TRIGGER_OVERRUN = 6
    DISABLED = 7
    INTERNAL = 8
    LATE_RUNNING = 9
    NOT_READY = 10
    RECORDS_UNAVAILABLE = 11
    RECIPE_UNAVAILABLE = 12
    RECIPE_LOADING = 13


ERROR_MEANINGS: dict[ErrorCode, str] = {
    ErrorCode.OK: "no error",
    ErrorCode.CAMERA_TIMEOUT: "no frame within daemon.grab_timeout_ms after the trigger (part failed)",
    ErrorCode.OVER_BUDGET: "no result within daemon.budget_ms (part failed; the late result is recorded, never sent)",
    ErrorCode.MODEL_ERROR: "the model raised an error or gave a non-finite score on this frame (part failed)",
    ErrorCode.CAMERA_DISCONNECTED: "camera lost; the daemon is reopening it (ready = 0; a trigger now is refused)",
    ErrorCode.BAD_FRAME: "frame of the wrong size or format (part failed)",
    ErrorCode.TRIGGER_OVERRUN: "trigger while busy (trigger_ready was 0): answered at once, part not inspected",
    ErrorCode.DISABLED: "trigger (or hardware-triggered frame) while enable = 0: answered at once, not inspected",
    ErrorCode.INTERNAL: "unexpected internal error (see the log; part failed)",
    ErrorCode.LATE_RUNNING: "trigger while a late inspection was still running: answered at once, not inspected",
    ErrorCode.NOT_READY: "trigger while ready = 0 (starting or stopping): answered at once, not inspected",
    ErrorCode.RECORDS_UNAVAILABLE: "records cannot be written and records.required is on (part failed)",
    ErrorCode.RECIPE_UNAVAILABLE: "requested recipe not configured, or its bundle failed to load (part failed)",
    ErrorCode.RECIPE_LOADING: "trigger while the requested recipe was loading (recipe_changing = 1): not inspected",
}

# Faults that last until something recovers (cleared when ready returns).
STANDING_FAULTS = (ErrorCode.CAMERA_DISCONNECTED, ErrorCode.INTERNAL)


@dataclass(frozen=True)
class Ticket:
    """One accepted trigger: the window its result, and only its result, may fill."""

    window: int
    part_id: int
    opened_at: float  # monotonic seconds
    recipe: int = 0  # the recipe latched with the trigger (0 resolved to the default)


@dataclass(frozen=True)
class Answer:
    """One published answer: the status block as it stood right after it."""

    status: Status
    late: bool = False  # the deadline answered; the model's own result came after it
    refused: bool = False  # the trigger was not inspected

    @property
    def part_id(self) -> int:
        return self.status.part_id

    @property
    def code(self) -> ErrorCode:
        return ErrorCode(self.status.error_code)


class HandshakeError(RuntimeError):
    """A result for a window this handshake never opened (a bug, never a PLC fault)."""


class Handshake:
    """Holds the status block and applies the handshake rules; thread-safe."""

    def __init__(
        self,
        threshold: float = 0.0,
        inspection_id: int = 0,
        budget_ms: float = 100.0,
        grab_timeout_ms: float = 1000.0,
        records_required: bool = False,
    ) -> None:
        self._lock = threading.Lock()
        self.records_required = records_required
        # A fresh start is recognisable: ready = 0 and result_valid = 0 until the first write.
        self._status = Status(threshold=threshold, inspection_id=inspection_id)
        self.budget_s = budget_ms / 1000.0
        self.grab_timeout_s = grab_timeout_ms / 1000.0
        self._last_trigger = False
        self._last_ack = False
        self._enable = True
        self._command_part_id = 0
        self._windows = 0
        self._open: Ticket | None = None  # the window awaiting its answer
        self._deadline: float | None = None
        self._running: Ticket | None = None  # the inspection the loop is doing (open or late)
        self._expired: dict[int, Answer] = {}  # window → the fail-safe answer the deadline gave
        # Recipes: what the PLC asks for, and what the daemon can serve.
        self._recipe_request = 0
        self._default_recipe = 0
        self._known: frozenset[int] = frozenset({0})
        self._loaded: frozenset[int] = frozenset({0})
        self._failed: frozenset[int] = frozenset()
        # Ids: never one past what the counter has saved (a restart could issue it again).
        self._id_limit: int | None = None
        self._held: ErrorCode | None = None  # not ready until released (the id counter cannot be saved)
        self.unanswered = 0  # triggers left unanswered because no id could be issued
        self.on_continue: Callable[[int], None] = lambda inspection_id: None
        self._wanted = (False, 0)  # the readiness set_ready last asked for (restored by release)

    # ------------------------------------------------------------ reading
    @property
    def status(self) -> Status:
        with self._lock:
            return self._status

    @property
    def enabled(self) -> bool:
        with self._lock:
            return self._enable

    def is_open(self, ticket: Ticket) -> bool:
        """True while ``ticket``'s window still waits for its answer."""
        with self._lock:
            return self._open is not None and self._open.window == ticket.window

    # ------------------------------------------------------------ internals
    def _recipe(self) -> int:
        return self._recipe_request or self._default_recipe

    def _recipe_problem(self) -> ErrorCode | None:
        recipe = self._recipe()
        if recipe not in self._known or recipe in self._failed:
            return ErrorCode.RECIPE_UNAVAILABLE
        if recipe not in self._loaded:
            return ErrorCode.RECIPE_LOADING
        return None

    def _set(self, **changes: object) -> Status:
        s = replace(self._status, **changes)  # type: ignore[arg-type]
        problem = self._recipe_problem()
        # trigger_ready = 1: a trigger now is answered (inspected, or at once with code 12 for a recipe
        # that is not there). A recipe that is loading holds it at 0 (recipe_changing = 1: wait).
        ready_now = (
            s.ready and self._enable and not s.busy and self._running is None and problem != ErrorCode.RECIPE_LOADING
        )
        derived = {
            "trigger_ready": ready_now,
            "recipe": self._recipe() & 0xFFFF,
            "recipe_changing": problem == ErrorCode.RECIPE_LOADING,
        }
        if any(getattr(s, k) != v for k, v in derived.items()):
            s = replace(s, **derived)  # type: ignore[arg-type]
        self._status = s
        return s

    def _publish(
        self,
        part_id: int,
        score: float,
        threshold: float,
        passed: bool,
        error_code: int,
        latency_ms: float,
        closes_window: bool,
    ) -> Status:
        if error_code == 0 and not math.isfinite(score):
            error_code = int(ErrorCode.MODEL_ERROR)  # nan >= threshold is False: never let it pass
        ok = passed and error_code == 0
        s = self._status
        changes: dict[str, object] = dict(
            result_valid=True,
            result_toggle=not s.result_toggle,
            inspection_id=(s.inspection_id + 1) & 0xFFFFFFFF,
            passed=ok,
            fail=not ok,
            error=error_code != 0,
            error_code=int(error_code),
            score=float(score),
            threshold=float(threshold),
            latency_ms=float(latency_ms),
            part_id=int(part_id) & 0xFFFFFFFF,
            decided_at=time.time(),
        )
        if closes_window:
            self._open, self._deadline = None, None
            changes["busy"] = False
        else:
            changes["missed_triggers"] = (s.missed_triggers + 1) & 0xFFFFFFFF
        return self._set(**changes)

    def _deadline_answer(self, ticket: Ticket, at: float) -> Status:
        """The fail-safe answer of a deadline (code 2): NG, score 0.0, the threshold in force, the
        latency from trigger to the deadline's answer. Never the model's (late) score."""
        return self._publish(
            ticket.part_id,
            0.0,
            self._status.threshold,
            False,
            int(ErrorCode.OVER_BUDGET),
            (at - ticket.opened_at) * 1000.0,
            closes_window=True,
        )

    def _refuse(self, part_id: int, code: ErrorCode) -> Answer:
        status = self._publish(part_id, 0.0, self._status.threshold, False, int(code), 0.0, closes_window=False)
        return Answer(status, refused=True)

    def _accept(self, part_id: int, now: float, first_frame_s: float) -> Ticket:
        self._windows += 1
        ticket = Ticket(self._windows, int(part_id), now, self._recipe())
        self._open = self._running = ticket
        self._deadline = now + first_frame_s + self.budget_s  # provisional: also covers a grab that hangs
        self._set(busy=True, result_valid=False)
        return ticket

    def _can_issue(self, n: int) -> bool:
        return self._id_limit is None or self._status.inspection_id + n <= self._id_limit

    def _answerable(self, accepting: bool) -> bool:
        """An id is left for this answer (and for the open window's own answer, still due)."""
        needed = 1 + (1 if self._open is not None and not accepting else 0)
        if self._can_issue(needed):
            return True
        self.unanswered += 1
        return False

    def _refusal_code(self) -> ErrorCode | None:
        if not self._enable:
            return ErrorCode.DISABLED
        if self._held is not None:
            return self._held
        if not self._status.ready:
            code = self._status.error_code
            return ErrorCode(code) if code in STANDING_FAULTS else ErrorCode.NOT_READY
        if (problem := self._recipe_problem()) is not None:
            return problem
        if self._open is not None:
            return ErrorCode.TRIGGER_OVERRUN
        if self._running is not None:
            return ErrorCode.LATE_RUNNING
        return None

    # ------------------------------------------------------------ the PLC side
    def on_command(self, command: Command, now: float) -> Ticket | Answer | None:
        """Apply what the PLC wrote (one read of the command block).

        Returns a :class:`Ticket` for a trigger to inspect, an :class:`Answer`
        for a trigger refused and already answered, or None.
        """
        with self._lock:
            rising = command.trigger and not self._last_trigger
            ack_rising = command.result_ack and not self._last_ack
            self._last_trigger, self._last_ack = command.trigger, command.result_ack
            self._enable = command.enable
            self._command_part_id = command.part_id
            self._recipe_request = command.recipe_request
            changes: dict[str, object] = {"trigger_ack": command.trigger}
            if ack_rising:
                changes["result_valid"] = False
            self._set(**changes)
            if not rising:
                return None
            code = self._refusal_code()
            if not self._answerable(accepting=code is None):
                return None  # no id may be issued: the PLC sees ready = 0 and code 11, and times out
            if code is not None:
                return self._refuse(command.part_id, code)
            return self._accept(command.part_id, now, self.grab_timeout_s)

    def expire(self, now: float) -> Answer | None:
        """Past the deadline with no result: publish the fail-safe NG now (never a late pass)."""
        with self._lock:
            ticket = self._open
            if ticket is None or self._deadline is None or now < self._deadline:
                return None
            answer = Answer(self._deadline_answer(ticket, now), late=True)
            self._expired[ticket.window] = answer
            return answer

    def beat(self, loop_alive: bool = True) -> None:
        """One heartbeat period passed; it counts only while the inspection loop is alive."""
        if not loop_alive:
            return
        with self._lock:
            self._set(heartbeat=(self._status.heartbeat + 1) & 0xFFFF)

    # ------------------------------------------------------------ the inspection side
    def begin(self, now: float) -> Ticket | Answer | None:
        """A frame arrived without a PLC trigger (hardware trigger): open its window or refuse it.

        The part_id is the one in the command block when the frame arrived. None:
        no id may be issued now (the counter cannot be saved), the frame is dropped.
        """
        with self._lock:
            code = self._refusal_code()
            if not self._answerable(accepting=code is None):
                return None
            if code is not None:
                return self._refuse(self._command_part_id, code)
            return self._accept(self._command_part_id, now, 0.0)

    def arm(self, ticket: Ticket, frame_at: float) -> None:
        """The frame for ``ticket`` is here: its result is due ``budget_ms`` after ``frame_at``."""
        with self._lock:
            if self._open is not None and self._open.window == ticket.window:
                self._deadline = frame_at + self.budget_s

    def finish(
        self,
        ticket: Ticket,
        now: float,
        score: float,
        threshold: float,
        passed: bool,
        error_code: int,
        latency_ms: float,
    ) -> Answer:
        """The loop's result for ``ticket``: published into its window, or, if late, only returned.

        The returned answer is what the PLC was told for this part: the result
        itself, or the deadline's fail-safe NG (``late`` = True).
        """
        with self._lock:
            if self._running is not None and self._running.window == ticket.window:
                self._running = None
            expired = self._expired.pop(ticket.window, None)
            if expired is not None:
                self._set()  # trigger_ready may return now
                return expired
            if self._open is None or self._open.window != ticket.window:
                raise HandshakeError(f"no open window {ticket.window} (open: {self._open})")
            if self._deadline is not None and now > self._deadline:
                # Past the deadline before its timer fired: the same fail-safe answer the timer gives.
                # The model's late score and latency are never published (they are in the record).
                return Answer(self._deadline_answer(ticket, self._deadline), late=True)
            if passed and self.records_required and self._status.records_failing:
                # Decided here, under the lock that sets the bit: the block never shows a pass beside
                # records_failing, even when the records thread failed after the judge looked.
                passed, error_code = False, int(ErrorCode.RECORDS_UNAVAILABLE)
            status = self._publish(ticket.part_id, score, threshold, passed, error_code, latency_ms, True)
            return Answer(status)

    def set_ready(self, ready: bool, error_code: int = 0) -> None:
        """Model/camera/PLC readiness.

        Not ready clears ``result_valid`` and ``pass`` (the block no longer names a
        current part) and shows a standing fault as error + code.
        """
        with self._lock:
            self._wanted = (ready, int(error_code))
            if not ready:
                self._set(
                    ready=False, result_valid=False, passed=False, error=error_code != 0, error_code=int(error_code)
                )
            elif self._held is not None:
                return  # held not ready (hold/release) whatever else recovers
            elif self._status.error_code in STANDING_FAULTS and not self._status.result_valid:
                self._set(ready=True, error=False, error_code=0)
            else:
                self._set(ready=True)

    def set_recipes(self, default: int, known: set[int], loaded: set[int], failed: set[int] | None = None) -> None:
        """The recipes configured, loaded and unloadable (0 always means the default one)."""
        with self._lock:
            self._default_recipe = default
            self._known = frozenset(known)
            self._loaded = frozenset(loaded)
            self._failed = frozenset(failed or ())
            self._set()

    def set_drift(self, drifting: bool) -> None:
        with self._lock:
            if self._status.drift != drifting:
                self._set(drift=drifting)

    def set_records_failing(self, failing: bool) -> None:
        with self._lock:
            if failing and self.records_required and self._status.passed:
                # The pass on show was decided before the records failed, but its own record is written after
                # it and may be the one failing: an unrecorded result is a fail, so the block withdraws the
                # pass (same part, same inspection id). Seen in CI: part 45 shown passed beside records_failing.
                self._set(
                    records_failing=True,
                    passed=False,
                    fail=True,
                    error=True,
                    error_code=int(ErrorCode.RECORDS_UNAVAILABLE),
                )
            else:
                self._set(records_failing=failing)

    def stopping(self) -> None:
        """The final block: ready = 0, no valid result, the last answer's error and error_code kept."""
        with self._lock:
            self._wanted = (False, 0)
            self._set(ready=False, result_valid=False, passed=False, busy=False)

    def hold(self, code: ErrorCode) -> None:
        """Not ready with ``code`` until :meth:`release`, whatever else becomes ready meanwhile."""
        with self._lock:
            self._held = code
            self._set(ready=False, result_valid=False, passed=False, error=True, error_code=int(code))

    def release(self, code: ErrorCode) -> None:
        with self._lock:
            if self._held != code:
                return
            self._held = None
            ready, wanted_code = self._wanted
            if not ready:
                self._set(ready=False, error=wanted_code != 0, error_code=wanted_code)
            elif self._status.error_code == code and not self._status.result_valid:
                self._set(ready=True, error=False, error_code=0)
            else:
                self._set(ready=True)

    def set_id_limit(self, limit: int | None) -> None:
        """The highest id the counter has saved: no id above it is ever published."""
        with self._lock:
            self._id_limit = limit

    def continue_from(self, inspection_id: int) -> bool:
        """Numbering goes on after ``inspection_id`` if that is ahead (e.g. the id in the PLC's block)."""
        with self._lock:
            if inspection_id <= self._status.inspection_id:
                return False
            self._set(inspection_id=inspection_id & 0xFFFFFFFF)
        self.on_continue(inspection_id & 0xFFFFFFFF)  # the counter saved past it before the next id
        return True

    def set_threshold(self, threshold: float) -> None:
        with self._lock:
            self._set(threshold=float(threshold))
