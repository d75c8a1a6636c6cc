"""Choose and build the extractor and searcher that the config names (or ``auto``)."""

from __future__ import annotations

import platform

import numpy as np
import torch

from anomalyd.config import EngineConfig, SearchConfig
from anomalyd.engines import search
from anomalyd.engines.base import EXTRACTORS, SEARCHERS, EngineError, EngineHooks, Extractor, Searcher, resolve_device
from anomalyd.engines.search import LocalSearcher
from anomalyd.log import get_logger
from anomalyd.model.bundle import Bundle
from anomalyd.model.inspector import Inspector
from anomalyd.model.manifest import Roi

log = get_logger(__name__)


def build_extractor(bundle: Bundle, config: EngineConfig, hooks: EngineHooks = EngineHooks()) -> Extractor:
    """The configured extractor (``auto``: the first that can run here, auto_engine)."""
    backend = EXTRACTORS[config.type]
    unavailable = getattr(backend, "unavailable", None)
    reason = unavailable(config) if unavailable is not None else None
    if reason:
        raise EngineError(f"engine {config.type!r} cannot run here: {reason}")
    return backend(bundle, config, hooks)  # type: ignore[no-any-return]


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


def open_inspector(
    bundle: Bundle,
    engine_config: EngineConfig,
    search_config: SearchConfig,
    roi: Roi | None = None,
    hooks: EngineHooks = EngineHooks(),
) -> Inspector:
    """Build extractor and searcher from config and wrap them in an Inspector.

    The ROI the bundle was fitted with applies unless ``roi`` is given; a given
    ROI that differs from the bundle's is refused (the model would see another
    crop than it learned, and its scores would mean nothing).
    """
    fitted_roi = bundle.spec.roi
    if roi is None:
        roi = fitted_roi
    elif fitted_roi is not None and tuple(roi) != fitted_roi:
        raise EngineError(
            f"{bundle.path}: fitted with ROI x,y,w,h = {fitted_roi}, but the camera's ROI is {tuple(roi)}; "
            "set camera.roi to the bundle's (or leave it empty), or refit with --roi"
        )

    extractor = build_extractor(bundle, engine_config, hooks)
    searcher = build_searcher(bundle, search_config, extractor.device, engine_config.threads)
    return Inspector(bundle, extractor, searcher, roi)
