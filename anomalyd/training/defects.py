"""Fit's learning from labelled defects: the defective images (``Defect``), their masks' cells, and the
supervised head (and learned stage) from them and the good images held back from the memory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from anomalyd.engines.base import resolve_device
from anomalyd.model.features import PatchFeatures, build_patch_features, learnable_stage
from anomalyd.model.head import Head
from anomalyd.model.images import read_rgb
from anomalyd.model.nearest import nearest_distances
from anomalyd.model.scoring import Preprocessor, Scorer
from anomalyd.training.extraction import OnnxFitExtractor, batches, extract_features, model_input_size
from anomalyd.training.head_training import cross_fit_parts, near_defect, train_head, uses_bags
from anomalyd.training.learn_features import learn_stage, stage_inputs, wanted
from anomalyd.training.settings import FitSettings, ProgressFactory, no_progress


@dataclass(frozen=True)
class Defect:
    """A labelled defective image: its defect type (folder name) and, optionally, its mask."""

    image: Path
    defect_type: str
    mask: Path | None = None


def mask_area(defect: Defect) -> int:
    """Defect pixels in the image's mask (0 without one)."""
    if defect.mask is None:
        return 0
    mask = cv2.imread(str(defect.mask), cv2.IMREAD_GRAYSCALE)
    return int(np.count_nonzero(mask)) if mask is not None else 0


def defect_cells(defect: Defect, grid: tuple[int, int], roi: tuple[int, int, int, int] | None) -> np.ndarray | None:
    """``[h·w]`` True on the feature cells a mask touches (None without a mask)."""
    if defect.mask is None:
        return None
    mask = cv2.imread(str(defect.mask), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{defect.mask}: not a readable mask")
    if roi is not None:
        x, y, w, h = roi
        mask = mask[y : y + h, x : x + w]
    small = cv2.resize((mask > 0).astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return (small > 0).ravel()


def learn_head(
    scorer: Scorer,
    model: nn.Module,
    defects: list[Defect],
    good: list[Path],
    settings: FitSettings,
    progress: ProgressFactory = no_progress,
    full_bank: torch.Tensor | None = None,
    lap: Callable[[str], None] = lambda _stage: None,
) -> tuple[Head, dict[str, object], PatchFeatures | None]:
    """The supervised head from labelled defects and good images held back from the memory, and the
    network with a learned stage where ``settings.learn`` says so (None: the frozen one stays).

    ``full_bank``: the memory in all features, where the search runs in a projection; an image-level
    label's unsure cells are then found by the distance in all features (BSData, 20 image labels, 16
    components: 44 % escapes at 2 % false rejects, against 78 % by the projection's distance).
    """
    spec = scorer.spec
    files = [d.image for d in defects] + good
    cpu_network = scorer.extractor if isinstance(scorer.extractor, OnnxFitExtractor) else None
    on_cpu = cpu_network if resolve_device(settings.device).type == "cpu" else None
    feats = extract_features(model, files, settings, progress("labelled", len(files)), on_cpu)
    with torch.inference_mode():
        dist = torch.cat([scorer.search(feats[i : i + 16]) for i in range(0, len(feats), 16)]).numpy()
    cells = feats.permute(0, 2, 3, 1).reshape(len(files), spec.cells, -1).numpy()
    defective = np.r_[np.ones(len(defects), bool), np.zeros(len(good), bool)]
    masks = [defect_cells(d, spec.feature_grid, settings.roi) for d in defects]
    # Images with a mask give defect cells; the others (image-level labels) are learnt from as train_head says.
    positive = np.zeros(dist.shape, bool)
    with_mask = np.zeros(len(files), bool)
    for i, m in enumerate(masks):
        if m is not None:
            positive[i], with_mask[i] = m, True
    masked = int(with_mask.sum())
    unsure_dist = None
    image_level = np.flatnonzero(defective & ~with_mask)  # only these images need their cells ranked …
    bags = uses_bags(settings.head, len(image_level))
    if bags:
        image_level = np.r_[image_level, np.flatnonzero(~defective)]  # … and, as bags, the good ones too
    if full_bank is not None and len(image_level):
        unsure_dist = dist.copy()
        with torch.inference_mode():
            for row in image_level.tolist():
                unsure_dist[row] = nearest_distances(torch.from_numpy(cells[row]), full_bank).numpy()
    head = train_head(
        cells, dist, positive, defective, settings.head, spec.feature_grid, settings.seed, with_mask, unsure_dist
    )
    learned = None
    lap("head")
    if wanted(settings.learn, masked) and _can_learn(settings):
        unlabelled = defective & ~with_mask
        learned, head = _learn_stage(
            head, files, cells, dist, positive, unlabelled, spec.feature_grid, settings, progress
        )
    entry = {
        "hidden": settings.head.hidden,
        "use_distance": settings.head.use_distance,
        "context": settings.head.context,
        "balance": settings.head.balance,
        "bags": bags,  # as used: see HeadSettings.bags_min_images
        "ensemble": settings.head.ensemble,
        "cross_fit": cross_fit_parts(settings.head, int((defective & ~with_mask).sum())),  # as used
        "defect_images": len(defects),
        "masked_images": masked,
        "defect_types": sorted({d.defect_type for d in defects}),
        "good_negatives": len(good),
        "first_channel": head.first_channel,
    }
    return head, entry, learned


def _can_learn(settings: FitSettings) -> bool:
    """A stage is learnt with a head on each cell and its distance; ``learn: on`` says when it cannot be."""
    reason = None
    if learnable_stage(settings.backbone, settings.taps, settings.proj_dim) is None:
        reason = f"{settings.backbone} with taps {','.join(settings.taps)} has no stage to learn"
    elif settings.head.context or not settings.head.use_distance:
        reason = "the head has a neighbourhood or no distance input"
    if reason and settings.learn.mode == "on":
        raise ValueError(f"learning a stage from the defects: {reason}")
    return reason is None


def _learn_stage(
    head: Head,
    files: list[Path],
    cells: np.ndarray,
    dist: np.ndarray,
    positive: np.ndarray,
    unlabelled: np.ndarray,
    grid: tuple[int, int],
    settings: FitSettings,
    progress: ProgressFactory,
) -> tuple[PatchFeatures, Head]:
    """The network with a copy of its first stage learnt from the masked defects (learn_features).

    Negatives: the good images' cells and the masked images' cells away from the defect; the
    image-labelled defective images (``unlabelled``) give neither (where their defect is, the
    masks do not say).
    """
    # Built as the frozen network was (the same weights), with the learned copy starting from them.
    model = build_patch_features(settings.backbone, settings.taps, settings.proj_dim, settings.weights, learned=True)
    negative = ~near_defect(positive, grid, settings.head.ring)
    negative[unlabelled] = False
    prepare = Preprocessor(model_input_size(files, settings), settings.roi, torch.device("cpu"))
    tick = progress("learned stage input", len(files))
    maps = []
    for chunk in batches(files, 4):
        maps.append(stage_inputs(model, prepare.batch([read_rgb(p) for p in chunk])))
        tick(len(chunk))
    tuned = learn_stage(
        settings.backbone, model, head, torch.cat(maps), cells, dist, positive, negative, grid, settings.learn,
        settings.head.balance, settings.seed, progress("learned stage", settings.learn.steps),
    )  # fmt: skip
    return model.eval(), tuned
