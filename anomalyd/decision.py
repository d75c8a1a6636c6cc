"""From score and map to a verdict: threshold, warn band, minimum defect area.

The one decision: the daemon, ``score``, ``compare``, ``eval``, the reports,
the overlays and the page all call :func:`decide` (or :func:`fails`), so a
non-finite score fails everywhere, as it does on the line (code 3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from anomalyd.config import ThresholdsConfig


class Label(str, Enum):
    """What a part was called: OK, WARN (passed, inside the warn band) or NG (the PLC was told fail)."""

    OK = "OK"
    WARN = "WARN"
    NG = "NG"

    def __str__(self) -> str:  # "OK", not "Label.OK", in every Python (3.12 changed format() of mixins)
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


@dataclass(frozen=True)
class Verdict:
    passed: bool
    warn: bool
    threshold: float
    defect_area_px: int | None
    finite: bool = True  # False: the score or map was not a number (the line answers code 3)

    @property
    def label(self) -> Label:
        return Label.NG if not self.passed else (Label.WARN if self.warn else Label.OK)


def fails(score: float, threshold: float) -> bool:
    """The image rule alone: a score at or above the threshold, or not a number, fails."""
    return not math.isfinite(score) or score >= threshold


def decide(
    score: float,
    anomaly_map: np.ndarray | None,
    roi_area_px: int,
    thresholds: ThresholdsConfig,
    default_threshold: float,
) -> Verdict:
    """Fail when the score reaches the image threshold (and, if set, the defect is large enough).

    A score (or map) that is not finite fails: ``nan >= threshold`` is False and
    would otherwise pass the part.
    """
    image_thr = thresholds.image if thresholds.image is not None else default_threshold
    if not math.isfinite(score) or (anomaly_map is not None and not np.isfinite(anomaly_map).all()):
        return Verdict(passed=False, warn=False, threshold=image_thr, defect_area_px=None, finite=False)
    area: int | None = None
    if thresholds.pixel is not None and anomaly_map is not None:
        # Map pixels above the pixel threshold, scaled to frame pixels of the ROI.
        share = float((anomaly_map >= thresholds.pixel).mean())
        area = round(share * roi_area_px)
    failed = score >= image_thr
    if failed and thresholds.min_area_px > 0 and area is not None:
        failed = area >= thresholds.min_area_px
    warn = not failed and thresholds.warn is not None and score >= thresholds.warn
    return Verdict(passed=not failed, warn=warn, threshold=image_thr, defect_area_px=area)
