"""Patch distances → anomaly map at the model input size (upsample, Gaussian blur).

Written in torch so it runs on whatever device the engine uses: on a GPU the
distances never leave it.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """1-D Gaussian of width 2·⌊4σ+0.5⌋+1 (as anomalib), summing to 1."""
    radius = int(4.0 * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma * sigma))
    return k / k.sum()


class AnomalyMapper:
    """Turns ``[B, h·w]`` patch distances into ``[B, H, W]`` maps."""

    def __init__(self, grid: tuple[int, int], input_size: tuple[int, int], sigma: float, device: str = "cpu"):
        self.grid = grid
        self.input_size = input_size
        k = gaussian_kernel(sigma)
        self._k_np = k.numpy()
        k = k.to(device)
        self.kx = k.view(1, 1, 1, -1)
        self.ky = k.view(1, 1, -1, 1)
        self.pad = k.numel() // 2

    def __call__(self, distances: torch.Tensor) -> torch.Tensor:
        b = distances.shape[0]
        m = distances.reshape(b, 1, *self.grid).float()
        m = F.interpolate(m, size=self.input_size, mode="bilinear", align_corners=False)
        if self.pad and m.device.type == "cpu" and m.shape[-1] > self.pad and m.shape[-2] > self.pad:
            # The same separable blur with OpenCV on the CPU (torch's "reflect" is BORDER_REFLECT_101): 33 ms
            # → 2 ms at 448x1120 on 2 cores, equal to float rounding (5e-7 of the map's range).
            k = self._k_np
            out = np.stack([cv2.sepFilter2D(x, -1, k, k, borderType=cv2.BORDER_REFLECT_101) for x in m[:, 0].numpy()])
            return torch.from_numpy(out)
        if self.pad:
            p = self.pad
            m = F.conv2d(F.pad(m, (p, p, 0, 0), mode="reflect"), self.kx)
            m = F.conv2d(F.pad(m, (0, 0, p, p), mode="reflect"), self.ky)
        return m[:, 0]
