"""Score a data set with an Inspector and compute image and pixel metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from anomalyd.decision import fails
from anomalyd.evaluation.dataset import Dataset, Sample
from anomalyd.evaluation.metrics import aupro, auroc
from anomalyd.model.images import read_rgb
from anomalyd.model.inspector import Inspector


@dataclass
class Scored:
    sample: Sample
    score: float
    frame_map: np.ndarray | None  # full-resolution map, kept only when masks exist

    @cached_property
    def _mask_facts(self) -> tuple[int, bool] | None:
        """(defect pixels, map's peak on the defect) from one read of the mask; None without map or mask."""
        fmap = self.frame_map
        if fmap is None or self.sample.mask_path is None:
            return None
        mask = self.sample.mask(fmap.shape)
        y, x = np.unravel_index(int(np.argmax(fmap)), fmap.shape)
        tol = max(2, round(0.01 * max(fmap.shape)))
        on_defect = bool(mask[max(0, y - tol) : y + tol + 1, max(0, x - tol) : x + tol + 1].any())
        return int(mask.sum()), on_defect

    @property
    def defect_pixels(self) -> int | None:
        """The defect mask's area at the map's size (None without a map or a mask)."""
        facts = self._mask_facts
        return None if facts is None else facts[0]

    @property
    def peak_on_defect(self) -> bool:
        """Whether the map's hottest pixel lies on the defect's mask (within 1 % of the frame's longer side).

        A rejection counts for the part only if it was rejected *for the defect*: a
        frame can score high because of something else in it (soiling, an edge), and
        then the part was caught by luck. The tolerance allows for the map's blur.
        """
        facts = self._mask_facts
        return facts is not None and facts[1]


def score_dataset(inspector: Inspector, dataset: Dataset, progress: Callable[[int], None]) -> list[Scored]:
    out = []
    for sample in dataset.samples:
        frame = read_rgb(sample.path)
        result = inspector.inspect(frame)
        fmap = result.frame_map(frame.shape) if dataset.has_masks else None
        out.append(Scored(sample, result.score, fmap))
        progress(1)
    return out


def _metrics(items: list[Scored], with_pixels: bool) -> dict[str, float | None]:
    labels = np.array([s.sample.is_defect for s in items])
    scores = np.array([s.score for s in items])
    result: dict[str, float | None] = {"image_auroc": auroc(labels, scores), "pixel_auroc": None, "aupro": None}
    if with_pixels:
        maps = np.stack([s.frame_map for s in items if s.frame_map is not None])
        masks = np.stack([s.sample.mask(s.frame_map.shape) for s in items if s.frame_map is not None])
        if masks.any():
            result["pixel_auroc"] = auroc(masks.ravel(), maps.ravel())
            result["aupro"] = aupro(masks, maps)
    return result


def at_threshold(items: list[Scored], threshold: float) -> dict[str, float | int]:
    """What a plant reads at the bundle's threshold: good parts rejected, defective parts let through."""
    good = [s for s in items if not s.sample.is_defect]
    bad = [s for s in items if s.sample.is_defect]
    rejected = sum(fails(s.score, threshold) for s in good)
    escaped = sum(not fails(s.score, threshold) for s in bad)
    return {
        "threshold": round(threshold, 4),
        "false_reject_rate": round(rejected / len(good), 4) if good else float("nan"),
        "escape_rate": round(escaped / len(bad), 4) if bad else float("nan"),
        "false_rejects": int(rejected),
        "escapes": int(escaped),
    }


def at_false_reject_rate(items: list[Scored], rate: float = 0.02) -> dict[str, float | int] | None:
    """Escapes at the lowest threshold that rejects at most ``rate`` of these good parts.

    The threshold is set on the evaluated good parts themselves (an oracle): it
    says what the scores can separate, not what the bundle's own threshold does.
    """
    good = sorted((s.score for s in items if not s.sample.is_defect), reverse=True)
    bad = [s.score for s in items if s.sample.is_defect]
    if not good or not bad:
        return None
    allowed = int(np.floor(rate * len(good)))
    threshold = float(np.nextafter(good[allowed], np.inf)) if allowed < len(good) else good[-1]
    out = at_threshold(items, threshold)
    out["threshold"] = threshold  # not rounded: it sits one float above a good part
    out["target_false_reject_rate"] = rate
    return out


def attribution(items: list[Scored], threshold: float) -> dict[str, float | int] | None:
    """Of the defective parts with masks: how many the threshold rejects with the map's peak on the defect."""
    masked = [s for s in items if s.sample.is_defect and s.sample.mask_path is not None and s.frame_map is not None]
    if not masked:
        return None
    on_defect = [s.peak_on_defect for s in masked]
    rejected = [fails(s.score, threshold) for s in masked]
    both = sum(r and o for r, o in zip(rejected, on_defect, strict=True))
    return {
        "defective_with_masks": len(masked),
        "peak_on_defect": int(sum(on_defect)),
        "rejected": int(sum(rejected)),
        "rejected_with_peak_on_defect": int(both),
        "caught_for_the_defect_rate": round(both / len(masked), 4),
    }


# Defect sizes in pixels of the frame (mask area): where a plant reads what size of defect is caught.
AREA_BINS = (0, 300, 1000, 3000)


def escapes_by_area(items: list[Scored], threshold: float) -> list[dict[str, object]]:
    """Per defect-area bin (from the masks): defective parts and the share let through at ``threshold``."""
    # A defective part with a map but no mask counts as 0 pixels.
    sized = [(s, s.defect_pixels or 0) for s in items if s.sample.is_defect and s.frame_map is not None]
    out: list[dict[str, object]] = []
    for i, low in enumerate(AREA_BINS):
        high = AREA_BINS[i + 1] if i + 1 < len(AREA_BINS) else None
        members = [s for s, area in sized if area >= low and (high is None or area < high)]
        if members:
            escaped = sum(s.score < threshold for s in members)
            on_defect = sum(s.peak_on_defect for s in members)
            label = f"{low}–{high} px" if high is not None else f"≥ {low} px"
            out.append(
                {
                    "area": label,
                    "parts": len(members),
                    "escapes": escaped,
                    "escape_rate": round(escaped / len(members), 4),
                    "peak_on_defect": on_defect,
                }
            )
    return out


def compute_metrics(scored: list[Scored], with_pixels: bool, threshold: float | None = None) -> dict[str, object]:
    """Overall metrics and, per defect type, the same against the good parts.

    With ``threshold`` (the bundle's suggestion): the false-reject and escape
    rates at it, overall and per defect type.
    """
    overall: dict[str, object] = dict(_metrics(scored, with_pixels))
    if threshold is not None:
        overall["at_threshold"] = at_threshold(scored, threshold)
        if with_pixels:
            overall["escapes_by_area"] = escapes_by_area(scored, threshold)
            overall["attribution"] = attribution(scored, threshold)
    overall["at_2pct_false_rejects"] = at_false_reject_rate(scored, 0.02)
    good = [s for s in scored if not s.sample.is_defect]
    per_defect = {}
    for kind in sorted({s.sample.defect_type for s in scored if s.sample.is_defect}):
        subset = good + [s for s in scored if s.sample.defect_type == kind]
        per_defect[kind] = dict(_metrics(subset, with_pixels))
        if threshold is not None:
            per_defect[kind]["escape_rate"] = at_threshold(subset, threshold)["escape_rate"]
    overall["per_defect"] = per_defect
    overall["counts"] = {"good": len(good), "defect": len(scored) - len(good)}
    return overall
