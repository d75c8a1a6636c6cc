"""The oracle operating point the BSData explorations report (shared by the scripts here)."""

from __future__ import annotations

import numpy as np


def threshold_at_fr(good_scores: np.ndarray, fr: float = 0.02) -> float:
    """The threshold that rejects ``fr`` of these good parts' scores (just above the one it lets pass)."""
    good = np.sort(good_scores)
    return float(good[min(len(good) - 1, int(np.ceil((1 - fr) * len(good))) - 1)] + 1e-9)


def escape_at_fr(labels: np.ndarray, scores: np.ndarray, fr: float = 0.02) -> float:
    """Share of defective parts below the threshold that rejects ``fr`` of the good parts (set on them)."""
    return float(np.mean(scores[labels] < threshold_at_fr(scores[~labels], fr)))
