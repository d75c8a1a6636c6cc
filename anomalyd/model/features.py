"""Patch features: mid-level backbone maps, locally aggregated and stacked.

This module is what ``extractor.onnx`` holds: normalised image batch in,
``[B, C, h, w]`` patch features out. Everything after it (search, map) is done
by the engines so that the same file runs under TensorRT, ONNX Runtime and torch.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomalyd.model.backbones import BACKBONES, build_backbone


class PatchFeatures(nn.Module):
    """Backbone taps → 3×3 average (local neighbourhood) → common grid → concat.

    With ``learned`` (a copy of the first tap's stage, fine-tuned on the line's labelled
    defects by :mod:`anomalyd.training.learn_features`), the output carries its channels
    after the frozen ones: ``[B, feature_dim + learned, h, w]``. The memory searches the
    frozen ``feature_dim`` (good parts are what they are); the supervised head reads the
    learned stage instead of the frozen one (``HeadSpec.first_channel``).
    """

    def __init__(
        self,
        backbone: nn.Module,
        taps: Sequence[str],
        proj_dim: int | None = None,
        mean: Sequence[float] = (0.0, 0.0, 0.0),
        std: Sequence[float] = (1.0, 1.0, 1.0),
        learned: nn.Module | None = None,
        learned_input: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.learned = learned
        self.learned_input = learned_input  # the backbone tap the learned stage reads (the one before it)
        # Normalisation lives in the graph: engines feed 0..255 floats and never
        # need to know the backbone's statistics.
        self.register_buffer("offset", torch.tensor(mean).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("scale", 1.0 / (torch.tensor(std).view(1, 3, 1, 1) * 255.0))
        self.taps = tuple(taps)
        self.proj_dim = proj_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, scale = self.get_buffer("offset"), self.get_buffer("scale")
        maps = self.backbone((x - offset) * scale)
        first = maps[self.taps[0]]
        size = (int(first.shape[-2]), int(first.shape[-1]))
        parts = []
        for name in self.taps:
            m = F.avg_pool2d(maps[name], 3, stride=1, padding=1, count_include_pad=False)
            if m.shape[-2:] != first.shape[-2:]:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            parts.append(m)
        feats = torch.cat(parts, dim=1)
        if self.proj_dim is not None and self.proj_dim < feats.shape[1]:
            # Channel-wise average pooling (PatchCore's reduction): no weights to ship.
            b, c, h, w = feats.shape
            flat = feats.permute(0, 2, 3, 1).reshape(b, h * w, c)
            flat = F.adaptive_avg_pool1d(flat, self.proj_dim)
            feats = flat.reshape(b, h, w, self.proj_dim).permute(0, 3, 1, 2)
        if self.learned is not None:
            tuned = self.learned(maps[self.learned_input])
            feats = torch.cat([feats, F.avg_pool2d(tuned, 3, stride=1, padding=1, count_include_pad=False)], dim=1)
        return feats


def feature_dim(backbone: str, taps: Sequence[str], proj_dim: int | None) -> int:
    """Channels of the patch features for a backbone and its taps."""
    total = sum(BACKBONES[backbone].channels[t] for t in taps)
    return min(total, proj_dim) if proj_dim else total


def feature_stride(backbone: str, taps: Sequence[str]) -> int:
    """Pixels of input per feature cell (the shallowest tap's stride)."""
    return BACKBONES[backbone].strides[taps[0]]


def learnable_stage(backbone: str, taps: Sequence[str], proj_dim: int | None) -> str | None:
    """The stage a line's labelled defects can fine-tune: the first tap of an EfficientNet-Lite
    (it sets the grid, so the learned copy needs no resampling), when there is a stage before it
    to feed it and the features are not channel-pooled; None where that does not hold."""
    first = taps[0]
    if not backbone.startswith("efficientnet_lite") or proj_dim is not None or not first.startswith("stage"):
        return None
    return first if int(first.removeprefix("stage")) >= 2 else None


def build_patch_features(
    backbone: str,
    taps: Sequence[str],
    proj_dim: int | None = None,
    weights: Path | None = None,
    learned: bool = False,
) -> PatchFeatures:
    """The patch-feature module with pretrained weights, in eval mode.

    ``learned``: with a copy of :func:`learnable_stage` after the frozen features, starting
    from the pretrained weights (fit trains it; a bundle's ``extractor.pt`` holds its weights).
    """
    spec = BACKBONES[backbone]
    if not learned:
        return PatchFeatures(build_backbone(backbone, taps, weights), taps, proj_dim, spec.mean, spec.std).eval()
    stage = learnable_stage(backbone, taps, proj_dim)
    if stage is None:
        raise ValueError(f"{backbone} with taps {','.join(taps)}: no stage to learn from defects")
    before = f"stage{int(stage.removeprefix('stage')) - 1}"
    net = build_backbone(backbone, (before, *taps), weights)
    blocks = net.stage_blocks(stage)  # type: ignore[operator]
    branch = nn.Sequential(*[copy.deepcopy(b) for b in blocks])
    return PatchFeatures(net, taps, proj_dim, spec.mean, spec.std, branch, before).eval()


def learned_channels(backbone: str, taps: Sequence[str]) -> int:
    """Channels the learned stage adds to the extractor's output."""
    return BACKBONES[backbone].channels[taps[0]]
