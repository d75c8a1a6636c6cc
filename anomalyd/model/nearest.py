"""Exact nearest-neighbour distance by chunked matrix products (any torch device)."""

from __future__ import annotations

import torch


def nearest_distances(
    queries: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor | None = None, chunk: int = 8192
) -> torch.Tensor:
    """L2 distance from each row of ``queries`` [Q, C] to its nearest row of ``bank`` [M, C].

    Written as ‖q‖² − 2 q·b + ‖b‖² (one GEMM per chunk) so memory stays bounded
    at ``chunk`` × M and the work is in BLAS / cuBLAS.
    """
    if bank_sq is None:
        bank_sq = (bank * bank).sum(1)
    out = torch.empty(queries.shape[0], device=queries.device, dtype=torch.float32)
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].to(bank.dtype)
        d2 = torch.addmm(bank_sq.unsqueeze(0), q, bank.T, alpha=-2.0)
        best = d2.min(dim=1).values.float() + (q.float() * q.float()).sum(1)
        out[start : start + chunk] = best.clamp_min_(0.0).sqrt_()
    return out
