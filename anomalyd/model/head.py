"""A supervised head: scores, per feature cell, how much it looks like the line's labelled defects.

The memory bank knows good parts only; on small, faint defects (BSData's pits)
its distance cannot tell a pit from a droplet. The head is a small per-cell MLP
on the same patch features plus the cell's distance to the memory, trained on
labelled defective images (``anomalyd.training.head_training``). Its output
replaces the distance as the cell's score before the anomaly map, so the map,
the image score, the calibration and the threshold all go through the one
scoring path. Weights are plain float32 arrays (``head.npz``, no pickle).
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F

ARRAYS = ("mean", "std", "w1", "b1", "w2", "b2")
# The cell score is softplus(logit + 8): about logit + 8 wherever good parts fall (logits down to about -6),
# so the calibration's ratio to the highest held-back good part and its robust spread stay linear, not
# exponential as softplus(logit) would be for the very negative logits of good cells.
LOGIT_SHIFT = 8.0


def mlp_logits(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """The head's network on ``[M, D]`` inputs (in ``ARRAYS`` order): standardise, (Linear → ReLU →) Linear."""
    z = (x - mean) / std
    if w1.numel():
        z = torch.relu(z @ w1 + b1)
    return z @ w2 + b2


def neighbourhood(features: torch.Tensor, context: int) -> torch.Tensor:
    """``[B, C, h, w]`` → the mean over each cell's (2·context+1)² neighbours (fewer at the border)."""
    size = 2 * context + 1
    return F.avg_pool2d(features, size, stride=1, padding=context, count_include_pad=False)


def cell_inputs(
    cells: np.ndarray, dist: np.ndarray, use_distance: bool, context: int = 0, grid: tuple[int, int] | None = None
) -> np.ndarray:
    """``[N, h·w, C]`` features and ``[N, h·w]`` distances → ``[M, C(·2)(+1)]`` float32 head inputs."""
    c = cells.shape[-1]
    x = cells.reshape(-1, c).astype(np.float32, copy=False)
    if context:
        assert grid is not None, "the neighbourhood needs the feature grid"
        n = int(np.prod(cells.shape[:-1])) // (grid[0] * grid[1])
        pooled = [
            neighbourhood(torch.from_numpy(np.ascontiguousarray(cells.reshape(n, *grid, c)[i : i + 16]))
                          .permute(0, 3, 1, 2).float(), context).permute(0, 2, 3, 1).reshape(-1, c).numpy()
            for i in range(0, n, 16)
        ]  # fmt: skip
        x = np.concatenate([x, np.concatenate(pooled)], axis=1)
    if use_distance:
        x = np.concatenate([x, dist.reshape(-1, 1).astype(np.float32)], axis=1)
    return np.ascontiguousarray(x)


class Head:
    """Standardise, (Linear → ReLU →) Linear; the cell score is softplus(logit + 8) (positive, monotone)."""

    def __init__(
        self,
        arrays: dict[str, np.ndarray],
        use_distance: bool,
        device: torch.device | str = "cpu",
        context: int = 0,
        first_channel: int = 0,
    ) -> None:
        self.use_distance = use_distance
        self.context = context
        self.first_channel = first_channel  # the extractor's channels before it are not the head's (HeadSpec)
        self.device = torch.device(device)
        self.t = {
            k: torch.from_numpy(np.ascontiguousarray(arrays[k], dtype=np.float32)).to(self.device) for k in ARRAYS
        }

    @property
    def input_dim(self) -> int:
        return int(self.t["mean"].shape[0])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return mlp_logits(x.to(self.device, torch.float32), *(self.t[k] for k in ARRAYS))

    def cell_scores(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return F.softplus(self._logits(x) + LOGIT_SHIFT)

    def score_cells(self, features: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` features and ``[B, h·w]`` distances → ``[B, h·w]`` cell scores."""
        b = features.shape[0]
        features = features[:, self.first_channel :].to(self.device, torch.float32)
        if self.context:
            features = torch.cat([features, neighbourhood(features, self.context)], dim=1)
        x = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
        if self.use_distance:
            x = torch.cat([x, distances.reshape(-1, 1).to(self.device, torch.float32)], dim=1)
        return self.cell_scores(x).reshape(b, -1)

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(out, **{k: v.cpu().numpy() for k, v in self.t.items()})  # type: ignore[arg-type]
        return out.getvalue()

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        use_distance: bool,
        device: torch.device | str = "cpu",
        context: int = 0,
        first_channel: int = 0,
    ) -> Head:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in ARRAYS}
        return cls(arrays, use_distance, device, context, first_channel)


def merge_heads(heads: list[Head]) -> Head:
    """Heads on the same inputs → one head whose logit is the mean of theirs (exactly, up to rounding).

    Each head's standardisation is folded into its first layer in terms of the first head's (the
    heads learnt from the same cells, so the ratios are near 1), their hidden units side by side and
    the output weights divided by their number: an ensemble in ``head.npz``'s format.
    """
    first = heads[0]
    m0, s0 = first.t["mean"], first.t["std"]
    w1s, b1s, w2s, b2s = [], [], [], []
    for h in heads:
        m, s, w1, b1, w2, b2 = (h.t[k] for k in ARRAYS)
        scale, shift = s0 / s, (m0 - m) / s  # (x - m) / s = (x - m0) / s0 · scale + shift
        if w1.numel():
            w1s.append(scale[:, None] * w1)
            b1s.append(b1 + shift @ w1)
            w2s.append(w2 / len(heads))
            b2s.append(b2)
        else:  # linear heads: the mean of their folded weights
            w1s.append(w1)
            b1s.append(b1)
            w2s.append(scale * w2 / len(heads))
            b2s.append(b2 + shift @ w2)
    linear = not first.t["w1"].numel()
    arrays = {
        "mean": m0.cpu().numpy(),
        "std": s0.cpu().numpy(),
        "w1": torch.cat(w1s, 1).cpu().numpy() if not linear else first.t["w1"].cpu().numpy(),
        "b1": torch.cat(b1s).cpu().numpy() if not linear else first.t["b1"].cpu().numpy(),
        "w2": (torch.cat(w2s) if not linear else torch.stack(w2s).sum(0)).cpu().numpy(),
        "b2": torch.stack(b2s).mean(0).reshape(1).cpu().numpy(),
    }
    return Head(arrays, first.use_distance, context=first.context, first_channel=first.first_channel)
