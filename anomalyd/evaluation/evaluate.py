"""Score a data set with an Inspector and compute image and pixel metrics."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from anomalyd.engines.inspector import Inspector
from anomalyd.evaluation.dataset import Dataset, Sample
from anomalyd.evaluation.metrics import aupro, auroc
from anomalyd.model.images import read_rgb


@dataclass
class Scored:
    sample: Sample
    score: float
    frame_map: np.ndarray | None  # full-resolution map, kept only when masks exist


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


def compute_metrics(scored: list[Scored], with_pixels: bool) -> dict[str, object]:
    """Overall metrics and, per defect type, the same against the good parts."""
    overall: dict[str, object] = dict(_metrics(scored, with_pixels))
    good = [s for s in scored if not s.sample.is_defect]
    per_defect = {}
    for kind in sorted({s.sample.defect_type for s in scored if s.sample.is_defect}):
        subset = good + [s for s in scored if s.sample.defect_type == kind]
        per_defect[kind] = _metrics(subset, with_pixels)
    overall["per_defect"] = per_defect
    overall["counts"] = {"good": len(good), "defect": len(scored) - len(good)}
    return overall
