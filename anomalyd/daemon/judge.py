"""One part from frame to answer: model, decision, publication into its window, record."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from anomalyd.daemon.camera_supervisor import CameraSupervisor
from anomalyd.daemon.dispatch import Part
from anomalyd.daemon.drift import DriftWatch
from anomalyd.daemon.handshake import Answer, ErrorCode, Handshake
from anomalyd.daemon.recipes import Recipe, RecipeBook
from anomalyd.daemon.recorder import Recorder
from anomalyd.daemon.result import Result
from anomalyd.decision import Verdict, decide
from anomalyd.log import get_logger
from anomalyd.model.inspector import Inspection

log = get_logger(__name__)


class Judge:
    """Turns a :class:`Part` into exactly one answer for its own window, and records it."""

    def __init__(
        self,
        recipes: RecipeBook,
        handshake: Handshake,
        camera: CameraSupervisor,
        recorder: Recorder,
        on_answer: Callable[[], None] = lambda: None,
        drift: DriftWatch | None = None,
    ) -> None:
        self.drift = drift
        self.recipes = recipes
        self.handshake = handshake
        self.camera = camera
        self.recorder = recorder
        self.on_answer = on_answer  # e.g. wake the PLC worker so the result is written now
        self._answered: Answer | None = None  # the current part's answer, once published

    def judge(self, part: Part) -> Answer | None:
        """Answer ``part`` exactly once; an unexpected fault fails it with code 8 and the loop goes on.

        A fault after the answer was published (recording, the page, a log line)
        is logged and never answers the part a second time.
        """
        self._answered = None
        try:
            return self._judge(part)
        except Exception as exc:
            if self._answered is not None:
                log.exception("inspection.after_answer_failed", id=self._answered.status.inspection_id)
                return self._answered
            log.exception("inspection.internal_error", part_id=part.ticket.part_id)
            try:
                return self._fail(part, None, ErrorCode.INTERNAL, str(exc))
            except Exception:  # the handshake itself refused: the deadline still answers the part fail-safe
                log.exception("inspection.unanswerable", part_id=part.ticket.part_id)
                return self._answered

    def _judge(self, part: Part) -> Answer:
        recipe = self.recipes.get(part.ticket.recipe)
        if recipe is None:  # removed or failed since the trigger: never judged with another recipe
            return self._fail(part, None, ErrorCode.RECIPE_UNAVAILABLE, "recipe not loaded")
        if part.frame is None:
            return self._fail(part, recipe, part.error, part.reason)
        if (why := self.camera.check(part.frame)) is not None:
            return self._fail(part, recipe, ErrorCode.BAD_FRAME, why)
        try:
            inspection = recipe.inspector.inspect(part.frame.image)
        except Exception as exc:  # any model failure fails this part, not the daemon
            log.exception("model.failed", frame_id=part.frame.frame_id)
            return self._fail(part, recipe, ErrorCode.MODEL_ERROR, str(exc))
        if not (math.isfinite(inspection.score) and inspection.map_finite()):
            # nan >= threshold is False: a non-finite number would pass the part.
            return self._fail(part, recipe, ErrorCode.MODEL_ERROR, "non-finite score or anomaly map", inspection)
        _x, _y, w, h = inspection.roi
        rules = recipe.spec.thresholds
        # The map crosses to the host here only for the pixel rule (checked finite above); else when the
        # archive or the page asks for it, on their threads.
        amap = inspection.anomaly_map if rules.pixel is not None else None
        verdict = decide(inspection.score, amap, w * h, rules, recipe.threshold)
        answer = self._answer(part, recipe, inspection, verdict, ErrorCode.OK, "")
        if self.drift is not None and answer is not None:  # after the answer: the watch never delays or changes it
            try:
                self.drift.observe(recipe.number, recipe.bundle_id, recipe.calibration_median, inspection.score)
            except Exception as exc:
                log.error("drift.failed", error=str(exc))
        return answer

    def _fail(
        self,
        part: Part,
        recipe: Recipe | None,
        code: ErrorCode,
        reason: str,
        inspection: Inspection | None = None,
    ) -> Answer:
        """Fail ``part`` with ``code`` (no verdict: the model said nothing usable about it)."""
        return self._answer(part, recipe, inspection, None, code, reason)

    def _answer(
        self,
        part: Part,
        recipe: Recipe | None,
        inspection: Inspection | None,
        verdict: Verdict | None,
        code: ErrorCode,
        reason: str,
    ) -> Answer:
        now = time.monotonic()
        start = part.frame_at or part.ticket.opened_at
        latency_ms = (now - start) * 1000.0
        if code == ErrorCode.OK and self.recorder.required and self.recorder.failing:
            # records.required: a part whose record cannot be written is not passed.
            code, reason = ErrorCode.RECORDS_UNAVAILABLE, "records cannot be written"
        score = inspection.score if inspection is not None else 0.0
        threshold = verdict.threshold if verdict is not None else (recipe.threshold if recipe else 0.0)
        passed = verdict is not None and verdict.passed
        answer = self.handshake.finish(part.ticket, now, score, threshold, passed, int(code), latency_ms)
        self._answered = answer
        result = Result(
            answer,
            latency_ms,
            verdict,
            inspection,
            part.frame,
            recipe=part.ticket.recipe or self.recipes.default,
            bundle_id=recipe.bundle_id if recipe else None,
            reason=reason,
        )
        try:
            self._after(result)
        except Exception:  # side effects of an answer given: logged, never a second answer
            log.exception("inspection.after_answer_failed", id=answer.status.inspection_id)
        return answer

    def _after(self, result: Result) -> None:
        """What follows an answer: wake the PLC writer, log, record (each fault here is the caller's to log)."""
        self.on_answer()
        if result.code and not result.late:
            # The published code: the handshake may have failed a pass under its own lock (records.required).
            why = result.reason or "records cannot be written"
            log.warning("inspection.error", code=int(result.code), error=result.code.name.lower(), reason=why)
        if result.late:
            log.warning(
                "inspection.late",
                id=result.inspection_id,
                part_id=result.part_id,
                latency_ms=round(result.latency_ms, 1),
                budget_ms=self.handshake.budget_s * 1000.0,
            )
        self.recorder.add(result)
