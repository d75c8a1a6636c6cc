"""Drift alarm: the scores of the line's parts against the bundle's calibration.

A dirty lens or a dimming lamp moves every part's score before it moves any
verdict. Per recipe, the rolling median of the last ``window`` scores is compared
with the median of the good images held back at fit (``calibration``); beyond
``margin`` (in normalised score units) the alarm stands until it comes back. The
median of all inspected parts is used, not only of those judged OK: when drift
makes good parts fail, the OK ones alone would hide it; a few real defects do
not move a median. The alarm never changes a verdict.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from anomalyd.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class DriftState:
    recipe: int
    median: float | None
    reference: float
    drifting: bool
    parts: int
    window_median: float  # of the parts so far, also before min_parts (exported; the alarm waits for min_parts)


class DriftTracker:
    def __init__(self, window: int, margin: float, min_parts: int) -> None:
        self.window, self.margin, self.min_parts = window, margin, min_parts
        self._lock = threading.Lock()
        self._scores: dict[tuple[int, str], deque[float]] = {}
        self._reference: dict[tuple[int, str], float] = {}
        self._alarm: dict[int, bool] = {}

    def add(self, recipe: int, bundle_id: str, reference: float, score: float) -> DriftState:
        """One inspected part's score; the recipe's state after it."""
        key = (recipe, bundle_id)  # a new bundle (promotion) starts a new series
        with self._lock:
            for other in [k for k in self._scores if k[0] == recipe and k != key]:
                del self._scores[other]
            scores = self._scores.setdefault(key, deque(maxlen=self.window))
            self._reference[key] = reference
            scores.append(score)
            window_median = float(np.median(scores))
            median = window_median if len(scores) >= self.min_parts else None
            drifting = median is not None and abs(median - reference) > self.margin
            self._alarm[recipe] = drifting
            return DriftState(recipe, median, reference, drifting, len(scores), window_median)

    @property
    def any_drifting(self) -> bool:
        with self._lock:
            return any(self._alarm.values())

    def states(self) -> dict[int, dict[str, object]]:
        with self._lock:
            out: dict[int, dict[str, object]] = {}
            for (recipe, bundle_id), scores in self._scores.items():
                median = float(np.median(scores)) if len(scores) >= self.min_parts else None
                out[recipe] = {
                    "bundle": bundle_id,
                    "median": None if median is None else round(median, 4),
                    "reference": round(self._reference[(recipe, bundle_id)], 4),
                    "drifting": self._alarm.get(recipe, False),
                    "parts": len(scores),
                }
            return out


class DriftWatch:
    """The tracker wired to the status block, metrics and log (transitions logged once)."""

    def __init__(self, tracker: DriftTracker, on_change: Callable[[bool], None], metrics: Any) -> None:
        self.tracker = tracker
        self.on_change = on_change
        self.metrics = metrics
        self._was: dict[int, bool] = {}

    def observe(self, recipe: int, bundle_id: str, reference: float, score: float) -> None:
        state = self.tracker.add(recipe, bundle_id, reference, score)
        self.metrics.score_median.labels(recipe=str(recipe)).set(state.window_median)
        self.metrics.score_reference.labels(recipe=str(recipe)).set(reference)
        self.metrics.drift.labels(recipe=str(recipe)).set(1 if state.drifting else 0)
        if state.drifting != self._was.get(recipe, False):
            self._was[recipe] = state.drifting
            event = "drift.detected" if state.drifting else "drift.cleared"
            (log.warning if state.drifting else log.info)(
                event,
                recipe=recipe,
                bundle=bundle_id,
                median=None if state.median is None else round(state.median, 4),
                reference=round(reference, 4),
                margin=self.tracker.margin,
            )
            self.on_change(self.tracker.any_drifting)
