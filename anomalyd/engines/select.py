"""Choose and build the extractor and searcher that the config names (or ``auto``)."""

from __future__ import annotations

import platform
from typing import Any

import numpy as np
import torch

from anomalyd.config import (
    AutoEngineConfig,
    EngineConfig,
    OnnxRuntimeEngineConfig,
    SearchConfig,
    TensorRtEngineConfig,
    TorchEngineConfig,
)
from anomalyd.engines import onnxruntime_engine, search, tensorrt_engine, torch_engine  # noqa: F401  (registers)
from anomalyd.engines.base import EXTRACTORS, SEARCHERS, EngineError, Extractor, Searcher, resolve_device
from anomalyd.log import get_logger
from anomalyd.model.bundle import Bundle
from anomalyd.model.scoring import LocalSearcher

log = get_logger(__name__)


def _auto_candidates(config: AutoEngineConfig) -> list[Any]:
    """TensorRT, then torch on CUDA, then ONNX Runtime on the CPU."""
    return [
        TensorRtEngineConfig(threads=config.threads),
        # The CUDA graph measured 3.8 → 1.6 ms per frame on an H200 (docs/accuracy.md): worth it by default.
        TorchEngineConfig(device="cuda", threads=config.threads, cuda_graph=True),
        OnnxRuntimeEngineConfig(threads=config.threads),
    ]


def build_extractor(bundle: Bundle, config: EngineConfig) -> Extractor:
    """The configured extractor; with ``auto`` the first that can run here, with the reasons logged."""
    if not isinstance(config, AutoEngineConfig):
        cls = EXTRACTORS[config.type]
        reason = cls.unavailable(config)
        if reason:
            raise EngineError(f"engine {config.type!r} cannot run here: {reason}")
        return cls(bundle, config)  # type: ignore[no-any-return]
    skipped: dict[str, str] = {}
    for candidate in _auto_candidates(config):
        cls = EXTRACTORS[candidate.type]
        reason = cls.unavailable(candidate)
        if reason is None:
            try:
                extractor: Extractor = cls(bundle, candidate)
            except Exception as exc:  # any failure of one candidate is a reason to try the next
                reason = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
                log.warning("engine.candidate_failed", engine=candidate.type, error=reason)
            else:
                log.info("engine.chosen", engine=extractor.name, skipped=skipped)
                return extractor
        skipped[candidate.type] = reason
    raise EngineError(f"no extractor engine can run here: {skipped}")


def build_searcher(bundle: Bundle, config: SearchConfig, extractor_device: torch.device, threads: int = 0) -> Searcher:
    """The configured searcher; with ``auto``: faiss where it is installed (on a GPU: built with CUDA), else torch.

    On the CPU faiss ``IndexFlatL2`` on its GEMM path measured faster than torch's
    chunked GEMM at every bank and frame size tried (2 cores, search p50: bottle 2.5
    vs 3.8 ms, BSData 22 vs 37 ms; ``bench/search_crossover.py``, ``bench/latency.py``),
    so ``auto`` takes it when the ``faiss-cpu`` extra is installed. On CUDA without a
    GPU build of faiss, torch.
    """
    bank = bundle.memory_bank()
    projection = bundle.search_projection()
    if projection is not None:  # the bank in the coordinates the Scorer projects its queries to
        bank = np.ascontiguousarray((bank - projection[0]) @ projection[1], dtype=np.float32)
    device = extractor_device if config.device == "auto" else resolve_device(config.device)
    if bundle.spec.memory.kind == "local":
        # A position-aware bank is searched cell by cell (one batched GEMM); faiss has no such index.
        if config.type == "faiss":
            raise EngineError(
                f"{bundle.path}: a position-aware (local) memory is searched by torch; set search.type: auto"
            )
        local = LocalSearcher(bank, bundle.spec, device)
        log.info("search.chosen", search=local.name, bank=int(bank.shape[0]))
        return local
    if config.type != "auto":
        return SEARCHERS[config.type](bank, device, threads)  # type: ignore[no-any-return]
    if device.type == "cuda":
        # faiss-gpu only where it is known to run on this GPU: an abort cannot be caught (search.faiss_gpu_usable).
        usable, why = search.faiss_gpu_usable(device) if search.faiss_has_gpu() else (False, "no GPU faiss")
        choice = "faiss" if usable else "torch"
        if not usable:
            log.info("search.faiss_gpu_not_used", reason=why, machine=platform.machine(), using="torch on cuda")
    else:
        choice = "faiss" if search.faiss_installed() else "torch"
    searcher: Searcher = SEARCHERS[choice](bank, device, threads)
    log.info("search.chosen", search=searcher.name, bank=int(bank.shape[0]))
    return searcher
