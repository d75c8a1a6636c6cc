"""Search backends side by side on the CPU: torch's chunked GEMM against faiss IndexFlatL2 (a benchmark).

    python bench/search_crossover.py [--threads 2]

For bank and frame sizes around ours (bottle: 784 queries x 1,474 rows; BSData:
1,904 x 6,302; feature width 152), prints the p50 / p99 ms of one frame's search with
torch, with faiss as anomalyd sets it up (`distance_compute_blas_threshold` 20: the
GEMM path for every frame), and with faiss's own default (128,000 in faiss 1.15, which
leaves smaller frames on a slower path).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from anomalyd.engines.search import BLAS_FROM_QUERIES, FaissSearcher, TorchSearcher

SIZES = [(196, 1474), (784, 1474), (784, 6302), (1904, 1474), (1904, 6302), (3000, 10000)]


def timed(search, feats: torch.Tensor, runs: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    for _ in range(5):
        search(feats)
    ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        search(feats)
        ms.append((time.perf_counter() - t0) * 1e3)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def main() -> int:
    import faiss

    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=40)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    cpu = torch.device("cpu")
    faiss_default = faiss.cvar.distance_compute_blas_threshold  # before FaissSearcher changes it
    print(
        f"faiss {faiss.__version__} (its GEMM threshold: {faiss_default} queries), torch {torch.__version__}, "
        f"{args.threads} threads; p50 / p99 ms"
    )
    print("| queries | bank rows | torch | faiss (anomalyd) | faiss (its default) |\n|---|---|---|---|---|")
    for q, b in SIZES:
        bank = rng.standard_normal((b, 152)).astype(np.float32)
        feats = torch.from_numpy(rng.standard_normal((q, 152)).astype(np.float32))
        torch_s = TorchSearcher(bank, cpu, args.threads)
        faiss_s = FaissSearcher(bank, cpu, args.threads)  # sets the GEMM threshold
        ours = timed(faiss_s.search, feats, args.runs)
        faiss.cvar.distance_compute_blas_threshold = faiss_default
        default = timed(faiss_s.search, feats, args.runs)
        faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES
        t = timed(torch_s.search, feats, args.runs)
        cells = [f"{a:.1f} / {z:.1f}" for a, z in (t, ours, default)]
        print(f"| {q} | {b} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
