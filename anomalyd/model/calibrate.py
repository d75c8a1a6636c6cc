"""Score normalisation and threshold suggestions.

The score a technician sees is ``raw / reference`` where ``reference`` is the
highest raw score among the good images held back from fitting: 1.0 means "as
unusual as the most unusual good part we held back". The suggested threshold
adds a margin above that; with labelled validation images, the F1-optimal
threshold is computed too.
"""

from __future__ import annotations

import numpy as np

# Margin above the highest held-back good part when no defect examples are given.
DEFAULT_MARGIN = 1.10


def calibration(holdout_raw: np.ndarray) -> dict[str, object]:
    """Statistics of the held-back good scores, stored in the manifest."""
    raw = np.asarray(holdout_raw, dtype=np.float64)
    reference = float(raw.max())
    normalised = raw / reference
    return {
        "reference_raw": reference,
        "holdout_count": int(raw.size),
        "holdout_raw": [float(v) for v in raw],
        "holdout_normalised": {
            "mean": float(normalised.mean()),
            "std": float(normalised.std()),
            "min": float(normalised.min()),
            "p50": float(np.percentile(normalised, 50)),
            "max": 1.0,
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


def suggest_thresholds(val_scores: np.ndarray | None = None, val_labels: np.ndarray | None = None) -> dict[str, object]:
    """Suggested image thresholds in normalised units."""
    out: dict[str, object] = {"suggested_image": DEFAULT_MARGIN, "source": "margin above held-back good parts"}
    if val_scores is not None and val_labels is not None and 0 < np.sum(val_labels) < len(val_labels):
        thr, f1 = f1_optimal_threshold(val_scores, val_labels)
        out.update({"f1_image": thr, "f1": f1, "suggested_image": thr, "source": "F1-optimal on --val"})
    return out
