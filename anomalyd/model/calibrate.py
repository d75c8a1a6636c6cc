"""Score normalisation and threshold suggestions.

The score a technician sees is ``raw / reference``. With enough held-back good
images (``ROBUST_MIN_HOLDOUT``), ``reference`` is a robust **limit of good
parts**: the median of their scores plus ``LIMIT_SPREADS`` robust standard
deviations (1.4826 × the median absolute deviation). 1.0 then means "beyond
what good parts do", and the suggested threshold is 1.0.

Why not the highest held-back part plus a margin (the first rule): the maximum
of a few dozen images is set by its single most unusual one, and in real "good"
folders that one is often an unlabelled defect or a dirty frame (BSData's
caveat 4). On BSData pitting the old rule put the threshold 25 % above every
good test part and let 40 % of the pitted parts through; the median and MAD
are not moved by one outlier. With few held-back images (the MAD of three
numbers means nothing) the old rule stays: the highest held-back part, and a
threshold 10 % above it. With labelled ``--val`` images the F1-optimal
threshold replaces either.
"""

from __future__ import annotations

import numpy as np

# Margin above the highest held-back good part when there are too few for a robust limit.
DEFAULT_MARGIN = 1.10
ROBUST_MIN_HOLDOUT = 10
# Median + 4 robust sigmas: under 0.01 % of a normal distribution and about 0.7 % of a
# Gumbel (the law of a maximum over many patches) lies above it.
LIMIT_SPREADS = 4.0
# The spread is never taken below 2 % of the median (a near-constant hold-out would give a limit at its median).
MIN_RELATIVE_SPREAD = 0.02


def robust_limit(holdout_raw: np.ndarray) -> float:
    """Median + LIMIT_SPREADS robust sigmas of the held-back good scores."""
    raw = np.asarray(holdout_raw, dtype=np.float64)
    median = float(np.median(raw))
    spread = max(1.4826 * float(np.median(np.abs(raw - median))), MIN_RELATIVE_SPREAD * median)
    return median + LIMIT_SPREADS * spread


def calibration(holdout_raw: np.ndarray) -> dict[str, object]:
    """Statistics of the held-back good scores and the reference they define, stored in the manifest."""
    raw = np.asarray(holdout_raw, dtype=np.float64)
    robust = raw.size >= ROBUST_MIN_HOLDOUT
    reference = robust_limit(raw) if robust else float(raw.max())
    normalised = raw / reference
    return {
        "reference_raw": reference,
        "reference_rule": f"median + {LIMIT_SPREADS:g} robust sigmas" if robust else "highest held-back part",
        "holdout_count": int(raw.size),
        "holdout_raw": [float(v) for v in raw],
        "holdout_normalised": {
            "mean": float(normalised.mean()),
            "std": float(normalised.std()),
            "min": float(normalised.min()),
            "p50": float(np.percentile(normalised, 50)),
            "max": float(normalised.max()),
            "above_reference": int(np.count_nonzero(normalised > 1.0)),
        },
    }


def f1_optimal_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) that maximise F1 for "defect if score ≥ threshold".

    The threshold is placed midway between the two scores where the decision
    changes, so a small drift does not flip the boundary cases.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).astype(bool)
    order = np.argsort(-scores)
    s, lab = scores[order], labels[order]
    tp = np.cumsum(lab)
    fp = np.cumsum(~lab)
    fn = lab.sum() - tp
    f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
    # Only cut between distinct scores.
    valid = np.r_[s[:-1] > s[1:], True]
    f1 = np.where(valid, f1, -1.0)
    best = int(np.argmax(f1))
    below = s[best + 1] if best + 1 < s.size else s[best] * 0.9
    return float((s[best] + below) / 2.0), float(f1[best])


def suggest_thresholds(
    holdout_raw: np.ndarray, val_raw: np.ndarray | None = None, val_labels: np.ndarray | None = None
) -> dict[str, object]:
    """Suggested image thresholds in normalised units (``raw / calibration(holdout_raw)["reference_raw"]``)."""
    robust = np.asarray(holdout_raw).size >= ROBUST_MIN_HOLDOUT
    out: dict[str, object] = (
        {"suggested_image": 1.0, "source": "robust limit of held-back good parts (median + 4 robust sigmas)"}
        if robust
        else {"suggested_image": DEFAULT_MARGIN, "source": "margin above the highest held-back good part"}
    )
    if val_raw is not None and val_labels is not None and 0 < np.sum(val_labels) < len(val_labels):
        reference = float(calibration(holdout_raw)["reference_raw"])  # type: ignore[arg-type]
        thr, f1 = f1_optimal_threshold(np.asarray(val_raw) / reference, val_labels)
        out.update({"f1_image": thr, "f1": f1, "suggested_image": thr, "source": "F1-optimal on --val"})
    return out
