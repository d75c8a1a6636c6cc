"""A learned feature: the first tap's stage, fine-tuned with the head on the line's labelled defects.

The pretrained network was taught ImageNet, not BSData's pits: the memory's good-parts distance
cannot tell a small dark pit from a droplet, and a head on frozen features can only weigh what
the network already sees. Here a copy of the stage that gives the feature grid (Lite0's stage 3,
two blocks fed by the frozen stage 2) is trained end to end with the head, starting from the
pretrained weights and from ``train_head``'s head. The frozen network stays as it was: the memory
searches its features, the deeper taps and the distance go into the head unchanged, and the
copy's channels follow the frozen ones in the extractor's output (``PatchFeatures``).

Training runs on crops of the stage's input map, half around defect cells (each defective image
its share, as ``HeadSettings.balance``), half around good cells; the loss is the head's on the
crop's centre cells. Crops lie inside their frame, so a crop gives its scored cells exactly what
the whole frame gives them (:func:`crop_windows`). The copy's batch norms keep ImageNet's
statistics: crops of one line are no batch to learn them from. Measured on BSData, cross-validated
by camera view (docs/accuracy.md, ``bench/learned_stage_cv.py``): with every labelled pit, 11 of 94
pits escape at 2 % false rejects in each of three seeds, against 14, 15 and 12 with the head alone;
with 20 labels it gave nothing in the exploration, and with image labels only (no masks) it learnt
the head's mistakes and was worse. Hence the rule: learn the stage with masks on at least
``min_masked`` defective images.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalyd.model.backbones import BACKBONES
from anomalyd.model.features import PatchFeatures, learned_channels
from anomalyd.model.head import Head, mlp_logits
from anomalyd.training.head_training import defect_cell_weights


@dataclass(frozen=True)
class LearnSettings:
    # auto: learn the stage when at least ``min_masked`` defective images have masks; on: whenever some do.
    mode: Literal["auto", "on", "off"] = "auto"
    # Between the 20 labels where it gave nothing and the 75 a fold where it helped (BSData), unmeasured:
    # 50 is the learning curve's step below "all".
    min_masked: int = 50
    steps: int = 500
    batch: int = 64  # crops per step, half on defects
    # Pixels of the stage's input map per crop side: 24 is 12 cells of Lite0's stage 3, the scored window and
    # the 4 cells each side that its features reach (the stage and the 3x3 mean), so each scored cell's
    # features are exact (tests/test_learned_stage.py) and the gradients the same as with larger crops; 32 (16
    # cells, the earlier default) learnt the same weights (within float rounding) at about twice the cost.
    crop: int = 24
    # Cells scored at the centre of each crop (window x window); a window of 8 needs crops of 32 and was worse
    # on BSData (docs/accuracy.md).
    window: int = 4
    lr: float = 1e-3  # the stage's (1e-4 learnt less: docs/accuracy.md)
    head_lr: float = 3e-4


def wanted(settings: LearnSettings, masked_images: int) -> bool:
    """Whether fit learns the stage, by the rule above."""
    if settings.mode == "off" or masked_images == 0:
        return False
    return settings.mode == "on" or masked_images >= settings.min_masked


def stage_inputs(model: PatchFeatures, images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` 0..255 → the learned stage's input map (the frozen stage before it), float16."""
    offset, scale = model.get_buffer("offset"), model.get_buffer("scale")
    with torch.inference_mode():
        return model.backbone.output_of((images - offset) * scale, model.learned_input).half()  # type: ignore[operator]


class _Trainable(nn.Module):
    """The learned stage → 3x3 mean → with the frozen deeper taps and the distance → the head's MLP."""

    def __init__(self, stage: nn.Module, head: Head) -> None:
        super().__init__()
        self.stage = stage
        t = {k: v.detach().cpu().clone() for k, v in head.t.items()}
        self.register_buffer("mean", t["mean"])
        self.register_buffer("std", t["std"])
        self.w1 = nn.Parameter(t["w1"])
        self.b1 = nn.Parameter(t["b1"])
        self.w2 = nn.Parameter(t["w2"])
        self.b2 = nn.Parameter(t["b2"])

    def learned(self, maps: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.stage(maps.float()), 3, stride=1, padding=1, count_include_pad=False)

    def logits(self, learned: torch.Tensor, rest: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """``[M, c]`` learned, ``[M, C - c]`` frozen deeper taps, ``[M]`` distances → ``[M]``."""
        x = torch.cat([learned, rest, dist[:, None]], 1)
        mean, std = self.get_buffer("mean"), self.get_buffer("std")
        return mlp_logits(x, mean, std, self.w1, self.b1, self.w2, self.b2)


def crop_windows(
    stage: Callable[[torch.Tensor], torch.Tensor],
    maps: torch.Tensor,
    chosen: torch.Tensor,
    grid: tuple[int, int],
    factor: int,
    crop: int,
    window: int = 4,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The learned stage on a crop around each chosen cell: (frame, cell, features) of window² cells each.

    ``chosen [B]`` are flat indices ``frame·h·w + cell`` into ``maps [N, c_in, factor·h, factor·w]``.
    Each crop lies inside its frame (clamped at the edges) and starts on a multiple of ``factor``,
    and its scored cells hold the chosen one, at the crop's centre where the frame allows: so a
    cell's features are what the whole frame gives it (the frame's edge is the crop's edge, and an
    edge inside the frame is far enough away), exactly, as the test checks.
    Returns ``[B·window²]`` frame indices, cell indices, and ``[B·window², c]`` features.
    """
    gh, gw = grid
    span_h, span_w = min(crop // factor, gh), min(crop // factor, gw)  # cells a crop covers
    frame, cell = chosen // (gh * gw), chosen % (gh * gw)
    ci = (cell // gw - window // 2).clamp(0, gh - window)  # the scored window's first cell, in the frame
    cj = (cell % gw - window // 2).clamp(0, gw - window)
    top = (ci - (span_h - window) // 2).clamp(0, gh - span_h)  # the crop's first cell
    left = (cj - (span_w - window) // 2).clamp(0, gw - span_w)
    crops = torch.stack([
        maps[f, :, factor * t : factor * (t + span_h), factor * u : factor * (u + span_w)]
        for f, t, u in zip(frame.tolist(), top.tolist(), left.tolist(), strict=True)
    ])  # fmt: skip
    out = stage(crops)  # [B, c, span_h, span_w]
    offsets = torch.arange(window)
    rows = (ci - top)[:, None, None] + offsets[None, :, None]  # [B, window, 1] within the crop
    cols = (cj - left)[:, None, None] + offsets[None, None, :]  # [B, 1, window]
    b = torch.arange(len(chosen))[:, None, None]
    features = out.permute(0, 2, 3, 1)[b, rows, cols].reshape(-1, out.shape[1])
    flat_cells = (ci[:, None, None] + offsets[None, :, None]) * gw + cj[:, None, None] + offsets[None, None, :]
    frames = frame[:, None].expand(-1, window * window).reshape(-1)
    return frames, flat_cells.reshape(-1), features


def learn_stage(
    backbone: str,
    model: PatchFeatures,
    head: Head,
    maps: torch.Tensor,
    cells: np.ndarray,
    dist: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    grid: tuple[int, int],
    settings: LearnSettings,
    balance: float,
    seed: int = 0,
    progress: Callable[[int], None] = lambda _n: None,
) -> Head:
    """Train ``model.learned`` (of a ``backbone``) in place with ``head``; return the head as the bundle reads it.

    ``maps [N, c_in, H', W']``: the stage's input maps (:func:`stage_inputs`) of the images whose
    frozen features are ``cells [N, h·w, C]`` and distances ``dist [N, h·w]``; ``positive`` and
    ``negative [N, h·w]`` mark the defect cells and the good ones (cells of neither are not learnt).
    The returned head reads the extractor's channels from ``first_channel`` on: the frozen deeper
    taps, then the learned stage (its inputs re-ordered to match), then the distance.
    """
    if model.learned is None:
        raise ValueError("the patch-feature module has no learned stage")
    if head.use_distance is False or head.context:
        raise ValueError("a learned stage needs a head on the cell and its distance (no neighbourhood)")
    c_first = learned_channels(backbone, model.taps)
    strides = BACKBONES[backbone].strides
    factor = strides[model.taps[0]] // strides[model.learned_input]
    trainable = _Trainable(model.learned, head)
    g = torch.Generator().manual_seed(seed)
    head_params = [trainable.w1, trainable.b1, trainable.w2, trainable.b2]
    stage_params = list(model.learned.parameters())
    groups = [{"params": head_params, "lr": settings.head_lr}, {"params": stage_params, "lr": settings.lr}]
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    model.learned.eval()  # batch norms keep ImageNet's statistics
    rest_t = torch.from_numpy(np.ascontiguousarray(cells[:, :, c_first:]))
    dist_t = torch.from_numpy(np.ascontiguousarray(dist, dtype=np.float32))
    pos_t, neg_t = torch.from_numpy(positive), torch.from_numpy(negative)
    pos_flat = torch.from_numpy(np.flatnonzero(positive.ravel()))
    neg_flat = torch.from_numpy(np.flatnonzero(negative.ravel()))
    if not len(pos_flat) or not len(neg_flat):
        raise ValueError("learning a stage needs defect cells and good cells")
    pos_weight = torch.from_numpy(defect_cell_weights(positive, balance)[pos_flat.numpy()])
    half = settings.batch // 2
    with torch.enable_grad():
        for _step in range(settings.steps):
            chosen = torch.cat([
                pos_flat[torch.multinomial(pos_weight, half, replacement=True, generator=g)],
                neg_flat[torch.randint(len(neg_flat), (half,), generator=g)],
            ])  # fmt: skip
            frames, flat_cells, learned = crop_windows(
                trainable.learned, maps, chosen, grid, factor, settings.crop, settings.window
            )
            lg = trainable.logits(learned, rest_t[frames, flat_cells], dist_t[frames, flat_cells])
            is_pos, is_neg = pos_t[frames, flat_cells].float(), neg_t[frames, flat_cells].float()
            loss_pos = F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg), reduction="none")
            loss_neg = F.binary_cross_entropy_with_logits(lg, torch.zeros_like(lg), reduction="none")
            loss = (loss_pos * is_pos).sum() / is_pos.sum().clamp_min(1)
            loss = loss + (loss_neg * is_neg).sum() / is_neg.sum().clamp_min(1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            progress(1)
    model.learned.requires_grad_(False)
    return _as_read(trainable, cells.shape[-1], c_first, head)


def _as_read(trainable: _Trainable, c: int, c_first: int, head: Head) -> Head:
    """The trained head with its inputs in the extractor's order past ``c_first``: deeper taps, learned, distance."""
    order = np.r_[np.arange(c_first, c), np.arange(c_first), c]
    arrays = {
        "mean": trainable.get_buffer("mean").numpy()[order],
        "std": trainable.get_buffer("std").numpy()[order],
        "w1": trainable.w1.detach().numpy()[order] if trainable.w1.numel() else trainable.w1.detach().numpy(),
        "b1": trainable.b1.detach().numpy(),
        "w2": trainable.w2.detach().numpy() if trainable.w1.numel() else trainable.w2.detach().numpy()[order],
        "b2": trainable.b2.detach().numpy().reshape(1),
    }
    return Head(arrays, head.use_distance, context=0, first_channel=c_first)
