"""Score normalisation and threshold suggestions.

The score a technician sees is ``raw / reference``, where ``reference`` is the
highest raw score among the good images held back from fitting: 1.0 means "as
unusual as the most unusual good part we held back".

The suggested threshold: with ``ENOUGH_HOLDOUT`` held-back parts or more it
sits one robust spread (1.4826 × the median absolute deviation of the
held-back scores) above the highest of them: the margin scales with how much
good parts vary instead of being a fixed 10 %. Measured (docs/accuracy.md): BSData
pitting 1 % false rejects and 36 % escapes (the fixed 10 %: 0 % and 41.5 %;
no margin: 2 % and 33 %); MVTec bottle 5 % (1 of 20) and 0 % (the fixed
10 %: 0 % and 0 %; no margin: 10 % and 0 %). With fewer held-back parts their
spread says little and the 10 % margin stays.

A bundle with a supervised head (``fit --defects``) has no margin: its threshold
is the highest held-back good part. The head has learnt what the line's defects
look like, its good parts score tightly, and the margin only let defects pass:
cross-validated on BSData by camera view with all labels, 17 % escapes and 0 %
false rejects with the margin, 15 % and 3 % without (20 labels: 28 % / 0 % and
19 % / 2 %; docs/accuracy.md).

One held-back part far above the others (beyond the median + ``OUTLIER_SPREADS``
robust sigmas, 1.4826 × the median absolute deviation) is taken for what it
usually is in a "good" folder, an unlabelled defect or a dirty frame, and the
second highest sets the reference; the manifest says so. With labelled
``--val`` images the F1-optimal threshold replaces either rule.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Margin above the highest held-back good part when there are too few to trust their maximum.
DEFAULT_MARGIN = 1.10
ENOUGH_HOLDOUT = 20
MARGIN_SPREADS = 1.0
# A Gumbel (the law of a maximum over many patches) puts about 0.01 % of its mass this far above its
# median; a held-back part there is not ordinary variation.
OUTLIER_SPREADS = 8.0


def robust_spread(holdout_raw: np.ndarray) -> float:
    """1.4826 × the median absolute deviation (the standard deviation, for a normal law; one outlier cannot move it)."""
    raw = np.asarray(holdout_raw, dtype=np.float64)
    return 1.4826 * float(np.median(np.abs(raw - np.median(raw))))


def reference_of(holdout_raw: np.ndarray) -> tuple[float, bool]:
    """(reference raw score, whether the highest held-back part was set aside as an outlier)."""
    raw = np.sort(np.asarray(holdout_raw, dtype=np.float64))
    if raw.size >= 3:
        median = float(np.median(raw))
        spread = robust_spread(raw)
        if spread > 0 and raw[-1] > median + OUTLIER_SPREADS * spread:
            return float(raw[-2]), True
    return float(raw[-1]), False


def calibration(holdout_raw: np.ndarray, images: Sequence[str] | None = None) -> dict[str, object]:
    """Statistics of the held-back good scores and the reference they define, stored in the manifest.

    ``images`` (the held-back files, in the order of ``holdout_raw``) names the highest one: the part
    that sets a head's threshold. On BSData one speckled frame of the good folder was the highest in 9
    of 10 cross-validation folds for image-label heads, the next at 0.75–0.97 of it (docs/accuracy.md):
    a technician should look at it.
    """
    raw = np.asarray(holdout_raw, dtype=np.float64)
    reference, outlier = reference_of(raw)
    normalised = raw / reference
    named: dict[str, object] = {}
    if images is not None:
        assert len(images) == raw.size, "one name per held-back score"
        order = np.argsort(raw)
        named = {
            "holdout_images": list(images),
            "highest_holdout": {
                "image": images[int(order[-1])],
                "score": float(normalised[order[-1]]),
                "next_score": float(normalised[order[-2]]) if raw.size > 1 else None,
            },
        }
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
        **named,
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
    holdout_raw: np.ndarray,
    val_raw: np.ndarray | None = None,
    val_labels: np.ndarray | None = None,
    supervised: bool = False,
) -> dict[str, object]:
    """Suggested image thresholds in normalised units (``raw / reference_of(holdout_raw)[0]``).

    ``supervised``: the bundle has a head learnt from labelled defects (no margin, above).
    """
    raw = np.asarray(holdout_raw, dtype=np.float64)
    reference = reference_of(raw)[0]
    out: dict[str, object]
    if supervised and raw.size >= ENOUGH_HOLDOUT:
        out = {
            "suggested_image": 1.0,
            "source": f"the highest held-back good part ({raw.size} held back; a bundle with a head has no margin)",
        }
    elif raw.size >= ENOUGH_HOLDOUT:
        margin = MARGIN_SPREADS * robust_spread(raw) / reference
        out = {
            "suggested_image": round(1.0 + margin, 4),
            "source": f"one robust spread above the highest held-back good part ({raw.size} held back)",
        }
    else:
        out = {
            "suggested_image": DEFAULT_MARGIN,
            "source": "10 % above the highest held-back good part (few held back)",
        }
    if val_raw is not None and val_labels is not None and 0 < np.sum(val_labels) < len(val_labels):
        thr, f1 = f1_optimal_threshold(np.asarray(val_raw) / reference, val_labels)
        out.update({"f1_image": thr, "f1": f1, "suggested_image": thr, "source": "F1-optimal on --val"})
    return out
