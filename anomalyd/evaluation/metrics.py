"""Detection and localisation metrics: AUROC and AUPRO (MVTec AD's definitions).

Both are computed from one descending sort of the scores, with ties grouped so
that the curve has one point per distinct threshold (as scikit-learn does).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# NumPy 2 renamed trapz to trapezoid; NumPy 1.26 (NVIDIA's JetPack 6 torch wheels) has only trapz.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Curve:
    """A curve as x/y points in increasing x, with the thresholds that made them."""

    x: np.ndarray
    y: np.ndarray
    thresholds: np.ndarray


def _tie_ends(sorted_scores: np.ndarray) -> np.ndarray:
    """Index of the last element of each run of equal scores in a sorted array."""
    return np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> Curve:
    """ROC curve (x = false-positive rate, y = true-positive rate)."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(f"ROC needs both classes (got {positives} positive, {negatives} negative)")
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], labels[order]
    ends = _tie_ends(s)
    tp = np.cumsum(lab)[ends]
    fp = (ends + 1) - tp
    fpr = np.r_[0.0, fp / negatives]
    tpr = np.r_[0.0, tp / positives]
    return Curve(fpr, tpr, np.r_[np.inf, s[ends]])


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (trapezoidal, like scikit-learn's roc_auc_score)."""
    c = roc_curve(labels, scores)
    return float(_trapezoid(c.y, c.x))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> Curve:
    """Per-region overlap against the false-positive rate over all normal pixels.

    ``masks``: ``[N, H, W]`` booleans; ``maps``: ``[N, H, W]`` scores. Regions are
    the 8-connected components of each mask; PRO at a threshold is the mean,
    over all regions of all images, of the fraction of the region above it.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float32)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    # Weight of each pixel: 1/|normal| for the FPR axis, 1/(|region|·regions) for PRO.
    fpr_weight = np.zeros(masks.shape, dtype=np.float64)
    pro_weight = np.zeros(masks.shape, dtype=np.float64)
    normal = ~masks
    n_normal = int(normal.sum())
    if n_normal == 0:
        raise ValueError("PRO needs normal pixels")
    fpr_weight[normal] = 1.0 / n_normal
    region_sizes: list[tuple[int, np.ndarray]] = []
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        for r in range(1, count):
            region_sizes.append((i, labels == r))
    if not region_sizes:
        raise ValueError("PRO needs at least one defect region")
    for i, region in region_sizes:
        pro_weight[i][region] = 1.0 / (int(region.sum()) * len(region_sizes))
    flat = maps.ravel()
    order = np.argsort(-flat, kind="stable")
    s = flat[order]
    ends = _tie_ends(s)
    fpr = np.cumsum(fpr_weight.ravel()[order])[ends]
    pro = np.cumsum(pro_weight.ravel()[order])[ends]
    return Curve(np.r_[0.0, fpr], np.r_[0.0, pro], np.r_[np.inf, s[ends]])


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to ``fpr_limit``, divided by ``fpr_limit`` (so ≤ 1)."""
    c = pro_curve(masks, maps)
    x, y = c.x, np.minimum(c.y, 1.0)
    cut = int(np.searchsorted(x, fpr_limit, side="right"))
    if cut < x.size:
        # Interpolate the curve at exactly fpr_limit.
        x0, x1, y0, y1 = x[cut - 1], x[cut], y[cut - 1], y[cut]
        y_lim = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0) if x1 > x0 else y1
        x, y = np.r_[x[:cut], fpr_limit], np.r_[y[:cut], y_lim]
    return float(_trapezoid(y, x) / fpr_limit)
