"""Exploration (issue 23): hand-made pixel cues per feature cell, as extra head inputs.

A BSData pit is a compact dark blob, about 26 grey levels darker than its ring. These
cues say how dark and compact each cell's darkest blob is against the cells around it,
in torch ops (so they would run wherever the head runs). ``bench/supervised_cv.py
--pixel-cues`` adds them to the head's inputs (not to the memory search); measured there,
they did not move the escapes (docs/accuracy.md). Nothing here is used by the daemon.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CUES = ("mean-ring", "low-ring", "low-mean", "high-mean", "std", "dog-low", "dog-high", "mean")


def gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A separable Gaussian blur of ``[B, 1, H, W]`` (replicated borders)."""
    r = int(3 * sigma + 0.5)
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = (k / k.sum()).to(x)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def pixel_cues(images: torch.Tensor, stride: int) -> torch.Tensor:
    """``[B, 3, H, W]`` 0..255 model input → ``[B, 8, H/stride, W/stride]`` cues (``CUES``) per cell."""
    g = images.float().mean(1, keepdim=True)
    mean = F.avg_pool2d(g, stride)
    std = (F.avg_pool2d(g * g, stride) - mean * mean).clamp_min(0).sqrt()
    smooth = gaussian(g, 1.5)
    low = -F.max_pool2d(-smooth, stride)  # the darkest spot of the cell
    high = F.max_pool2d(smooth, stride)
    ring = F.avg_pool2d(mean, 5, stride=1, padding=2, count_include_pad=False)  # the 5×5 cells around
    dog = smooth - gaussian(g, 6.0)  # blob-sized detail
    dog_low, dog_high = -F.max_pool2d(-dog, stride), F.max_pool2d(dog, stride)
    return torch.cat([mean - ring, low - ring, low - mean, high - mean, std, dog_low, dog_high, mean], 1)
