"""``engine: auto``: the first extractor that can run here, and on the CPU the faster one measured.

Order: TensorRT, then torch on CUDA (with a CUDA graph: 3.8 → 1.6 ms a frame on an H200,
docs/accuracy.md), then the CPU. On the CPU, ONNX Runtime; where OpenVINO is installed as
well, both are timed on this bundle's input size and OpenVINO is taken only if it is at
least ``MARGIN`` faster (measured on this project's 2-core AMD VM: equal in FP32, so ONNX
Runtime stays). The two are timed in turns, frame by frame, so that load from elsewhere during the
measurement (another service starting, a test beside it) falls on both alike: timed one after the
other, a second of load had once picked OpenVINO at 1.5× ONNX Runtime's real time for good.
The measurement is kept per network shape (backbone, taps, input size),
CPU and runtime versions (``$ANOMALYD_CACHE_DIR``, else ``~/.cache/anomalyd``): a restart,
or a reload of a bundle of the same shape (a promotion), does not time again; only a
reload to a new shape times once (about 20 frames, in the reload's background thread).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import statistics
import time
from typing import TYPE_CHECKING, Any, Literal

from anomalyd.engines.base import EXTRACTORS, EngineError, EngineHooks, EngineSettings, Extractor, register_extractor
from anomalyd.log import get_logger

if TYPE_CHECKING:
    from anomalyd.model.bundle import Bundle

log = get_logger(__name__)
MARGIN = 0.05  # OpenVINO must be this much faster than ONNX Runtime to be taken
WARMUP, RUNS = 2, 9  # runs of each, in turns


class AutoEngineConfig(EngineSettings):
    type: Literal["auto"] = "auto"


def _candidates(config: AutoEngineConfig) -> list[Any]:
    from anomalyd.engines.onnxruntime_engine import OnnxRuntimeEngineConfig
    from anomalyd.engines.tensorrt_engine import TensorRtEngineConfig
    from anomalyd.engines.torch_engine import TorchEngineConfig

    return [
        TensorRtEngineConfig(threads=config.threads),
        TorchEngineConfig(device="cuda", threads=config.threads, cuda_graph=True),
        OnnxRuntimeEngineConfig(threads=config.threads),
    ]


def _build(bundle: Bundle, candidate: Any, hooks: EngineHooks = EngineHooks()) -> tuple[Extractor | None, str | None]:
    """The candidate's extractor, or why not (any failure of one is a reason to try the next)."""
    cls = EXTRACTORS[candidate.type]
    reason = cls.unavailable(candidate)
    if reason is not None:
        return None, reason
    try:
        return cls(bundle, candidate, hooks), None
    except Exception as exc:
        reason = str(exc) if isinstance(exc, EngineError) else f"{type(exc).__name__}: {exc}"
        log.warning("engine.candidate_failed", engine=candidate.type, error=reason)
        return None, reason


def time_side_by_side(extractors: dict[str, Extractor], input_size: tuple[int, int]) -> dict[str, float]:
    """Median milliseconds of one frame through each of ``extractors``, timed in turns (A B A B …).

    In turns, not one after the other: a burst of load from elsewhere then slows both alike instead of
    whichever happened to be timed during it.
    """
    import torch

    frame = torch.rand(1, 3, *input_size) * 255.0
    for _ in range(WARMUP):
        for extractor in extractors.values():
            extractor.extract(frame)
    times: dict[str, list[float]] = {name: [] for name in extractors}
    for _ in range(RUNS):
        for name, extractor in extractors.items():
            start = time.perf_counter()
            extractor.extract(frame)
            times[name].append((time.perf_counter() - start) * 1000.0)
    return {name: statistics.median(t) for name, t in times.items()}


def faster(measured_ms: dict[str, float], margin: float = MARGIN) -> str:
    """ONNX Runtime unless OpenVINO measured at least ``margin`` faster."""
    if "openvino" in measured_ms and measured_ms["openvino"] < (1.0 - margin) * measured_ms["onnxruntime"]:
        return "openvino"
    return "onnxruntime"


def _measurement_key(bundle: Bundle, threads: int) -> str:
    import onnxruntime
    import openvino

    spec = bundle.spec
    parts = [
        # The network's shape, not its weights: a promoted bundle of the same backbone and input size runs
        # at the same speed, so its reload does not time again on cores that are inspecting parts.
        f"{spec.backbone} {'+'.join(spec.taps)} {spec.proj_dim} {spec.input_size}",
        platform.machine(),  # not platform.processor(): it runs `uname -p` in a subprocess
        _cpu_name(),
        f"ort {onnxruntime.__version__}",
        f"ov {openvino.__version__}",
        f"threads {threads}",
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_choice(bundle: Bundle, config: AutoEngineConfig, ort: Extractor) -> Extractor:
    """ONNX Runtime, or OpenVINO where it is installed and measures faster on this bundle."""
    from anomalyd.engines.openvino_engine import OpenVinoEngineConfig
    from anomalyd.engines.search import probe_cache_dir

    candidate = OpenVinoEngineConfig(threads=config.threads)
    if EXTRACTORS["openvino"].unavailable(candidate) is not None:
        return ort
    cache_dir = probe_cache_dir()
    cache = cache_dir / f"cpu-engine-{_measurement_key(bundle, config.threads)}.json" if cache_dir else None
    measured: dict[str, float] | None = None
    if cache is not None and cache.is_file():
        try:
            measured = {str(k): float(v) for k, v in json.loads(cache.read_text(encoding="utf-8")).items()}
        except (OSError, ValueError, AttributeError):
            measured = None  # unreadable: measure again
    ov: Extractor | None = None  # built once: the one timed is the one used
    if measured is None or "onnxruntime" not in measured:
        ov, reason = _build(bundle, candidate)
        timed = {"onnxruntime": ort} if ov is None else {"onnxruntime": ort, "openvino": ov}
        measured = time_side_by_side(timed, bundle.input_size)
        if ov is None:
            log.info("engine.openvino_not_measured", reason=reason)
        if cache is not None:
            with contextlib.suppress(OSError):  # not kept: measured again next start
                cache.write_text(json.dumps(measured), encoding="utf-8")
    choice = faster(measured)
    log.info("engine.cpu_measured", ms=measured, chosen=choice, margin=MARGIN)
    if choice == "onnxruntime":
        if ov is not None:
            ov.close()
        return ort
    if ov is None:
        ov, reason = _build(bundle, candidate)
        if ov is None:
            log.warning("engine.openvino_failed", reason=reason, using="onnxruntime")
            return ort
    ort.close()
    return ov


@register_extractor(AutoEngineConfig)
def choose_extractor(bundle: Bundle, config: AutoEngineConfig, hooks: EngineHooks = EngineHooks()) -> Extractor:
    """The first extractor that can run here, with the reasons for those skipped logged."""
    skipped: dict[str, str] = {}
    for candidate in _candidates(config):
        extractor, reason = _build(bundle, candidate, hooks)
        if extractor is None:
            skipped[candidate.type] = reason or "?"
            continue
        if candidate.type == "onnxruntime":
            extractor = _cpu_choice(bundle, config, extractor)
        log.info("engine.chosen", engine=extractor.name, skipped=skipped)
        return extractor
    raise EngineError(f"no extractor engine can run here: {skipped}")
