"""The memory bank from the good images' features: a coreset of all patches, or per cell (local)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from anomalyd.engines.base import resolve_device
from anomalyd.model.coreset import greedy_coreset, greedy_coreset_torch
from anomalyd.training.settings import FitSettings, ProgressFactory, no_progress


def local_bank(
    feats: torch.Tensor, radius: int, per_cell: int, progress: Callable[[int], None] = lambda _n: None
) -> torch.Tensor:
    """Position-aware memory ``[cells · per_cell, C]``: per cell, ``per_cell`` training patches
    from within ``radius`` cells of it, chosen by greedy k-center (cell-major rows).

    Rows of the grid are done one at a time so memory stays at one row's candidates.
    """
    n, c, gh, gw = feats.shape
    k = 2 * radius + 1
    padded = F.pad(feats, (radius, radius, radius, radius), mode="replicate")
    rows = []
    for i in range(gh):
        band = padded[:, :, i : i + k, :]  # [n, c, k, gw + 2r]
        cand = F.unfold(band, kernel_size=k)  # [n, c·k·k, gw]
        cand = cand.reshape(n, c, k * k, gw).permute(3, 0, 2, 1).reshape(gw, n * k * k, c).contiguous()
        rows.append(_greedy_per_cell(cand, per_cell))
        progress(1)
    return torch.cat(rows).reshape(-1, c)


def _greedy_per_cell(cand: torch.Tensor, count: int) -> torch.Tensor:
    """``[P, K, C]`` candidates → ``[P, count, C]`` chosen by greedy k-center, all cells at once.

    The first centre of a cell is the candidate nearest the cell's mean (the
    most typical patch), then always the candidate farthest from those chosen.
    Fewer than ``count`` distinct candidates repeat the last choice (harmless for a minimum).
    """
    p, k, _ = cand.shape
    sq = (cand * cand).sum(-1)  # [P, K]
    mean = cand.mean(1, keepdim=True)
    current = ((cand - mean) ** 2).sum(-1).argmin(1)  # [P]
    min_d = torch.full((p, k), float("inf"))
    chosen = torch.empty(p, count, dtype=torch.long)
    index = torch.arange(p)
    for step in range(count):
        chosen[:, step] = current
        centre = cand[index, current]  # [P, C]
        d = sq - 2.0 * torch.bmm(cand, centre.unsqueeze(-1)).squeeze(-1) + (centre * centre).sum(-1, keepdim=True)
        torch.minimum(min_d, d, out=min_d)
        current = min_d.argmax(1)
    return cand[index[:, None], chosen]


def build_memory(
    feats: torch.Tensor, settings: FitSettings, progress: ProgressFactory = no_progress
) -> tuple[torch.Tensor, dict[str, object]]:
    """The memory bank from the training features ``[N, C, h, w]``, and its manifest entry."""
    c, gh = feats.shape[1], feats.shape[2]
    if settings.memory == "local":
        bank = local_bank(feats, settings.local_radius, settings.local_per_cell, progress("local memory", gh))
        return bank, {"kind": "local", "radius": settings.local_radius, "per_cell": settings.local_per_cell}
    if settings.memory != "global":
        raise ValueError(f"memory {settings.memory!r}: global or local")
    flat = feats.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    wanted = max(round(flat.shape[0] * settings.coreset_ratio), settings.coreset_min)
    count = min(settings.coreset_max, flat.shape[0], max(1, wanted))
    device = resolve_device(settings.device)
    if device.type == "cuda":
        chosen = greedy_coreset_torch(
            flat, count, settings.coreset_projection, settings.seed, str(device), progress("coreset", count)
        )
    else:
        chosen = greedy_coreset(flat, count, settings.coreset_projection, settings.seed, progress("coreset", count))
    return torch.from_numpy(np.ascontiguousarray(flat[chosen])), {"kind": "global"}
