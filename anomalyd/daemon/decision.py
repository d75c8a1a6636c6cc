"""From score and map to a verdict: threshold, warn band, minimum defect area."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from anomalyd.config import ThresholdsConfig


@dataclass(frozen=True)
class Verdict:
    passed: bool
    warn: bool
    threshold: float
    defect_area_px: int | None

    @property
    def label(self) -> str:
        return "NG" if not self.passed else ("WARN" if self.warn else "OK")


def decide(
    score: float,
    anomaly_map: np.ndarray,
    roi_area_px: int,
    thresholds: ThresholdsConfig,
    default_threshold: float,
) -> Verdict:
    """Fail when the score reaches the image threshold (and, if set, the defect is large enough)."""
    image_thr = thresholds.image if thresholds.image is not None else default_threshold
    area: int | None = None
    if thresholds.pixel is not None:
        # Map pixels above the pixel threshold, scaled to frame pixels of the ROI.
        share = float((anomaly_map >= thresholds.pixel).mean())
        area = round(share * roi_area_px)
    failed = score >= image_thr
    if failed and thresholds.min_area_px > 0 and area is not None:
        failed = area >= thresholds.min_area_px
    warn = not failed and thresholds.warn is not None and score >= thresholds.warn
    return Verdict(passed=not failed, warn=warn, threshold=image_thr, defect_area_px=area)
