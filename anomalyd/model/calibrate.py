"""Score normalisation and threshold suggestions.

The score a technician sees is ``raw / reference``, where ``reference`` is the
highest raw score among the good images held back from fitting: 1.0 means "as
unusual as the most unusual good part we held back".

The suggested threshold: with ``ENOUGH_HOLDOUT`` held-back parts or more it is
1.0, the highest held-back part itself. Another good part lands above the
highest of n held-back ones with probability 1/(n+1) (2.6 % for the 37 of
BSData; 2 % measured there). The first rule, 10 % above it, let 40 % of
BSData's pitted parts through at 0 % false rejects; the margin bought nothing a
plant wants. With fewer held-back parts their maximum is a poor estimate of the
good tail, and the 10 % margin stays.

One held-back part far above the others (beyond the median + ``OUTLIER_SPREADS``
robust sigmas, 1.4826 × the median absolute deviation) is taken for what it
usually is in a "good" folder, an unlabelled defect or a dirty frame, and the
second highest sets the reference; the manifest says so. With labelled
``--val`` images the F1-optimal threshold replaces either rule.
"""

from __future__ import annotations

import numpy as np

# Margin above the highest held-back good part when there are too few to trust their maximum.
DEFAULT_MARGIN = 1.10
ENOUGH_HOLDOUT = 20
# A Gumbel (the law of a maximum over many patches) puts about 0.01 % of its mass this far above its
# median; a held-back part there is not ordinary variation.
OUTLIER_SPREADS = 8.0


def reference_of(holdout_raw: np.ndarray) -> tuple[float, bool]:
    """(reference raw score, whether the highest held-back part was set aside as an outlier)."""
    raw = np.sort(np.asarray(holdout_raw, dtype=np.float64))
    if raw.size >= 3:
        median = float(np.median(raw))
        spread = 1.4826 * float(np.median(np.abs(raw - median)))
        if spread > 0 and raw[-1] > median + OUTLIER_SPREADS * spread:
            return float(raw[-2]), True
    return float(raw[-1]), False


def calibration(holdout_raw: np.ndarray) -> dict[str, object]:
    """Statistics of the held-back good scores and the reference they define, stored in the manifest."""
    raw = np.asarray(holdout_raw, dtype=np.float64)
    reference, outlier = reference_of(raw)
    normalised = raw / reference
    return {
        "reference_raw": reference,
        "reference_rule": "second-highest held-back part (the highest is an outlier)"
        if outlier
        else "highest held-back part",
        "holdout_count": int(raw.size),
        "holdout_raw": [float(v) for v in raw],
        "holdout_normalised": {
            "mean": float(normalised.mean()),
            "std": float(normalised.std()),
            "min": float(normalised.min()),
            "p50": float(np.percentile(normalised, 50)),
            "max": float(normalised.max()),
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
    """Suggested image thresholds in normalised units (``raw / reference_of(holdout_raw)[0]``)."""
    enough = np.asarray(holdout_raw).size >= ENOUGH_HOLDOUT
    out: dict[str, object] = (
        {"suggested_image": 1.0, "source": f"the highest held-back good part (≥ {ENOUGH_HOLDOUT} held back)"}
        if enough
        else {"suggested_image": DEFAULT_MARGIN, "source": "10 % above the highest held-back good part (few held back)"}
    )
    if val_raw is not None and val_labels is not None and 0 < np.sum(val_labels) < len(val_labels):
        reference = reference_of(holdout_raw)[0]
        thr, f1 = f1_optimal_threshold(np.asarray(val_raw) / reference, val_labels)
        out.update({"f1_image": thr, "f1": f1, "suggested_image": thr, "source": "F1-optimal on --val"})
    return out
