"""Memory-bank search backends: faiss (CPU or GPU) and torch (chunked matmul, any device)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from anomalyd.engines.base import EngineError, register_searcher
from anomalyd.model.nearest import nearest_distances


def faiss_installed() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def faiss_has_gpu() -> bool:
    try:
        import faiss
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# faiss-gpu-cu12's wheels carry GPU code for sm_70 and sm_80 only, without PTX (their README: compute
# capability 7.0-8.9). On Hopper or Blackwell, index_cpu_to_gpu aborts the whole process ("CUDA error
# 209 no kernel image", faiss-wheels #151): no try can catch an abort, so it is never attempted there.
FAISS_GPU_CAPABILITIES = ((7, 0), (8, 9))


def faiss_gpu_supports(capability: tuple[int, int]) -> bool:
    """Whether the faiss-gpu wheels have kernels for a GPU of this compute capability."""
    low, high = FAISS_GPU_CAPABILITIES
    return low <= tuple(capability) <= high


def device_capability(device: torch.device) -> tuple[int, int]:
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


# Batches of at least this many queries take faiss's GEMM path (see FaissSearcher).
BLAS_FROM_QUERIES = 20


@register_searcher("faiss")
class FaissSearcher:
    """Exact L2 search with ``IndexFlatL2``; on the GPU where faiss was built with CUDA."""

    def __init__(self, bank: np.ndarray, device: torch.device, threads: int = 0) -> None:
        try:
            import faiss
        except ImportError as exc:
            raise EngineError(
                "faiss is not installed (pip install 'anomalyd[faiss-cpu]', or [faiss-gpu] on a CUDA box)"
            ) from exc
        if threads:
            faiss.omp_set_num_threads(threads)
        # faiss 1.15's default (128,000) leaves frames of up to ~800 queries on a
        # non-GEMM path that measured 2-3x slower on 2 cores (784 queries x 6,302 rows:
        # 23.7 against 8.5 ms; bench/search_crossover.py). 20, faiss's classic
        # default, puts every frame on the GEMM path. The setting is process-wide; it
        # changes speed and float round-off, as torch's GEMM search has.
        faiss.cvar.distance_compute_blas_threshold = BLAS_FROM_QUERIES
        index: Any = faiss.IndexFlatL2(bank.shape[1])
        index.add(np.ascontiguousarray(bank, dtype=np.float32))
        self.device = device
        if device.type == "cuda":
            if not faiss_has_gpu():
                raise EngineError("faiss on cuda asked for, but the installed faiss has no GPU support")
            capability = device_capability(device)
            if not faiss_gpu_supports(capability):
                raise EngineError(
                    f"faiss on {device}: compute capability {capability[0]}.{capability[1]} has no kernels in the "
                    "faiss-gpu wheels (7.0-8.9); use search.type: torch (or auto, which takes it)"
                )
            import faiss.contrib.torch_utils

            with torch.cuda.device(device):
                self._resources = faiss.StandardGpuResources()
                index = faiss.index_cpu_to_gpu(self._resources, device.index or 0, index)
            self.name = "faiss-gpu"
        else:
            self.name = "faiss-cpu"
        self.index = index

    def search(self, features: torch.Tensor) -> torch.Tensor:
        # faiss answers a query with no finite distance (a NaN/inf feature, or a bank
        # row gone bad) with label -1 and FLT_MAX: a huge but *finite* score that would
        # be judged as an ordinary NG. Such a query is NaN here, so the Inspector fails
        # the part as a model error (code 3), as the torch search does.
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):
                d2, labels = self.index.search(features.to(self.device, torch.float32).contiguous(), 1)
            dist = d2[:, 0].clamp_min(0).sqrt()
            return torch.where(labels[:, 0] < 0, torch.full_like(dist, float("nan")), dist)
        d2, labels = self.index.search(np.ascontiguousarray(features.cpu().numpy(), dtype=np.float32), 1)
        dist = np.sqrt(np.maximum(d2[:, 0], 0.0))
        dist[labels[:, 0] < 0] = np.nan
        return torch.from_numpy(dist)

    def close(self) -> None:
        self.index = None


@register_searcher("torch")
class TorchSearcher:
    """Exact nearest neighbour by chunked GEMM; the bank stays on the device."""

    def __init__(self, bank: np.ndarray, device: torch.device, threads: int = 0) -> None:
        if device.type == "cpu" and threads:
            torch.set_num_threads(threads)
        self.device = device
        self.bank = torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)).to(device)
        self.bank_sq = (self.bank * self.bank).sum(1)
        self.name = f"torch-{device.type}"

    def search(self, features: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return nearest_distances(features.to(self.device, torch.float32), self.bank, self.bank_sq)

    def close(self) -> None:
        del self.bank, self.bank_sq
