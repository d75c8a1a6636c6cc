"""One part from frame to answer: model, decision, publication into its window, record."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from anomalyd.config import ThresholdsConfig
from anomalyd.daemon.camera_supervisor import CameraSupervisor
from anomalyd.daemon.decision import Verdict, decide
from anomalyd.daemon.dispatch import Part
from anomalyd.daemon.handshake import Answer, ErrorCode, Handshake
from anomalyd.daemon.recorder import Outcome, Recorder
from anomalyd.engines.inspector import Inspection, Inspector
from anomalyd.log import get_logger

log = get_logger(__name__)


class Judge:
    """Turns a :class:`Part` into exactly one answer for its own window, and records it."""

    def __init__(
        self,
        inspector: Inspector,
        handshake: Handshake,
        camera: CameraSupervisor,
        recorder: Recorder,
        thresholds: Callable[[], ThresholdsConfig],
        threshold: Callable[[], float],
        on_answer: Callable[[], None] = lambda: None,
    ) -> None:
        self.inspector = inspector
        self.handshake = handshake
        self.camera = camera
        self.recorder = recorder
        self.thresholds = thresholds
        self.threshold = threshold
        self.on_answer = on_answer  # e.g. wake the PLC worker so the result is written now

    def judge(self, part: Part) -> Answer:
        """Answer ``part``; an unexpected fault fails it with code 8 and the loop goes on."""
        try:
            return self._judge(part)
        except Exception as exc:
            log.exception("inspection.internal_error", part_id=part.ticket.part_id)
            return self._answer(part, None, None, ErrorCode.INTERNAL, str(exc))

    def _judge(self, part: Part) -> Answer:
        if part.frame is None:
            return self._answer(part, None, None, part.error, part.reason)
        if (why := self.camera.check(part.frame)) is not None:
            return self._answer(part, None, None, ErrorCode.BAD_FRAME, why)
        try:
            inspection = self.inspector.inspect(part.frame.image)
        except Exception as exc:  # any model failure fails this part, not the daemon
            log.exception("model.failed", frame_id=part.frame.frame_id)
            return self._answer(part, None, None, ErrorCode.MODEL_ERROR, str(exc))
        if not (math.isfinite(inspection.score) and np.isfinite(inspection.anomaly_map).all()):
            # nan >= threshold is False: a non-finite number would pass the part.
            return self._answer(part, inspection, None, ErrorCode.MODEL_ERROR, "non-finite score or anomaly map")
        _x, _y, w, h = inspection.roi
        verdict = decide(inspection.score, inspection.anomaly_map, w * h, self.thresholds(), self.threshold())
        return self._answer(part, inspection, verdict, ErrorCode.OK, "")

    def _answer(
        self, part: Part, inspection: Inspection | None, verdict: Verdict | None, code: ErrorCode, reason: str
    ) -> Answer:
        now = time.monotonic()
        start = part.frame_at or part.ticket.opened_at
        latency_ms = (now - start) * 1000.0
        if code == ErrorCode.OK and self.recorder.required and self.recorder.failing:
            # records.required: a part whose record cannot be written is not passed.
            code, reason = ErrorCode.RECORDS_UNAVAILABLE, "records cannot be written"
        score = inspection.score if inspection is not None else 0.0
        threshold = verdict.threshold if verdict is not None else self.threshold()
        passed = verdict is not None and verdict.passed
        answer = self.handshake.finish(part.ticket, now, score, threshold, passed, int(code), latency_ms)
        self.on_answer()
        if code:
            log.warning("inspection.error", code=int(code), error=code.name.lower(), reason=reason)
        if answer.late:
            log.warning(
                "inspection.late",
                id=answer.status.inspection_id,
                part_id=answer.part_id,
                latency_ms=round(latency_ms, 1),
                budget_ms=self.handshake.budget_s * 1000.0,
            )
        self.recorder.add(Outcome(answer, latency_ms, verdict, inspection, part.frame))
        return answer
