"""Memory-bank search backends: faiss (CPU or GPU) and torch (chunked matmul, any device)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyd.engines.base import EngineError, register_searcher
from anomalyd.model.manifest import ModelSpec
from anomalyd.model.nearest import local_nearest_distances, nearest_distances


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


# Within the wheels' range faiss-gpu is still tried once in a subprocess before this process relies on it:
# an abort there (a wheel built for other GPUs, a driver it cannot use) ends only the probe.
_PROBE = (
    "import sys, numpy, faiss\n"
    "r = faiss.StandardGpuResources()\n"
    "i = faiss.IndexFlatL2(8)\n"
    "i.add(numpy.ones((4, 8), 'float32'))\n"
    "g = faiss.index_cpu_to_gpu(r, int(sys.argv[1]), i)\n"
    "d, l = g.search(numpy.ones((1, 8), 'float32'), 1)\n"
    "sys.exit(0 if l[0, 0] >= 0 else 3)\n"
)


_PROBED: dict[str, tuple[bool, str]] = {}  # this process's answers: the file and the probe are read once


def probe_cache_dir() -> Path | None:
    """Where probe results are kept: $ANOMALYD_CACHE_DIR, else ~/.cache/anomalyd (None: not kept)."""
    configured = os.environ.get("ANOMALYD_CACHE_DIR")
    folder = Path(configured) if configured else Path.home() / ".cache" / "anomalyd"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return folder


def faiss_gpu_runs(
    index: int, identity: str, cache_dir: Path | None, command: list[str] | None = None, timeout_s: float = 120.0
) -> tuple[bool, str]:
    """Whether faiss can put an index on GPU ``index`` and search it, tried in a subprocess; cached by
    ``identity`` (GPU, driver, faiss version). Returns (runs, how it was found out)."""
    if command is None and identity in _PROBED:
        return _PROBED[identity]
    cache = cache_dir / f"faiss-gpu-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json" if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            known = json.loads(cache.read_text(encoding="utf-8"))
            if known.get("identity") == identity:
                found = bool(known["runs"]), f"{known['how']} (cached in {cache})"
                if command is None:
                    _PROBED[identity] = found
                return found
        except (OSError, ValueError, KeyError):
            pass
    try:
        done = subprocess.run(
            command or [sys.executable, "-c", _PROBE, str(index)], capture_output=True, text=True, timeout=timeout_s
        )
        runs = done.returncode == 0
        how = (
            "probe passed" if runs else f"probe failed ({_exit_reason(done.returncode)}): {done.stderr.strip()[-300:]}"
        )
    except subprocess.TimeoutExpired:
        runs, how = False, f"probe hung for {timeout_s:.0f} s"
    if cache is not None:
        with contextlib.suppress(OSError):
            cache.write_text(json.dumps({"identity": identity, "runs": runs, "how": how}), encoding="utf-8")
    if command is None:
        _PROBED[identity] = (runs, how)
    return runs, how


def _exit_reason(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def faiss_gpu_usable(device: torch.device) -> tuple[bool, str]:
    """faiss-gpu on ``device``: built with CUDA, kernels for its compute capability, and a probe that ran."""
    if not faiss_has_gpu():
        return False, "the installed faiss has no GPU support"
    capability = device_capability(device)
    if not faiss_gpu_supports(capability):
        return False, (
            f"compute capability {capability[0]}.{capability[1]} has no kernels in the faiss-gpu wheels (7.0-8.9)"
        )
    import faiss

    from anomalyd.engines import cuda_info

    identity = (
        f"{torch.cuda.get_device_name(device)}|{capability}|{cuda_info.driver_version()}|"
        f"{getattr(faiss, '__version__', '?')}|{device.index or 0}"
    )
    runs, how = faiss_gpu_runs(device.index or 0, identity, probe_cache_dir())
    return runs, how


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
                "faiss is not installed (pip install 'anomalyd[faiss-cpu]', or [gpu-cu12] on a CUDA 12 machine)"
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
        self._resources: Any = None
        if device.type == "cuda":
            usable, why = faiss_gpu_usable(device)
            if not usable:
                raise EngineError(f"faiss on {device}: {why}; use search.type: torch (or auto, which takes it)")
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
        # The GPU index before its resources: StandardGpuResources holds scratch memory (hundreds of MB)
        # that a closed searcher (a replaced recipe) must give back.
        self.index = None
        self._resources = None


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


class LocalSearcher:
    """Position-aware memory: each cell against the good patches remembered for that cell.

    The bank is ``[cells · per_cell, C]`` (cell-major), built by ``fit`` from the
    training patches within ``radius`` cells of each place. A search costs
    cells × per_cell × C, less than a global bank of the same size.
    """

    def __init__(self, bank: np.ndarray, spec: ModelSpec, device: torch.device) -> None:
        cells, per_cell = spec.cells, spec.memory.per_cell
        self.device = device
        self.bank = (
            torch.from_numpy(np.ascontiguousarray(bank, dtype=np.float32)).to(device).reshape(cells, per_cell, -1)
        )
        self.bank_sq = (self.bank * self.bank).sum(-1)  # once, not per frame
        self.cells = cells
        self.name = f"local-{device.type}"

    def search(self, features: torch.Tensor) -> torch.Tensor:
        queries = features.to(self.device, torch.float32).reshape(-1, self.cells, self.bank.shape[-1])
        return torch.cat([local_nearest_distances(q, self.bank, self.bank_sq) for q in queries])

    def close(self) -> None:
        del self.bank, self.bank_sq
