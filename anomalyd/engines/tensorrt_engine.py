"""TensorRT extractor: a plan built from the bundle's ONNX, run with the TensorRT 10 API.

Plans are cached in the bundle under ``engines/`` with the GPU model, TensorRT
version and precision in the name, so a bundle moved to another GPU or
TensorRT release builds a fresh plan instead of failing to deserialize one.
Buffers are torch CUDA tensors: one CUDA context serves TensorRT, the search and
the anomaly map, and nothing is copied to the host.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from anomalyd.config import TensorRtEngineConfig
from anomalyd.engines.base import EngineError, register_extractor, resolve_device
from anomalyd.log import get_logger
from anomalyd.model.bundle import EXTRACTOR_ONNX, Bundle
from anomalyd.model.export import INPUT_NAME, OUTPUT_NAME

log = get_logger(__name__)
MAX_BATCH = 8


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError("tensorrt is not installed (pip install 'anomalyd[gpu]' on a CUDA machine)") from exc
    return tensorrt


def plan_path(bundle: Bundle, device: torch.device, fp16: bool) -> Path:
    """Where the plan for this exact ONNX file, GPU, TensorRT version and precision is cached.

    The ONNX file's checksum is in the name: a refit in place never reuses an old plan.
    """
    trt = _trt()
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    onnx = str(bundle.manifest["files"][EXTRACTOR_ONNX])[:12]
    return bundle.path / "engines" / f"{onnx}_{gpu}_trt{trt.__version__}_{'fp16' if fp16 else 'fp32'}.plan"


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file and rename: a crash never leaves half a plan under the real name."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def build_plan(bundle: Bundle, device: torch.device, fp16: bool = True, workspace_mb: int = 1024) -> Path:
    """Build (or reuse) the plan for this GPU; returns its path."""
    trt = _trt()
    target = plan_path(bundle, device, fp16)
    if target.is_file():
        return target
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.file(EXTRACTOR_ONNX)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    # platform_has_fast_fp16 is deprecated in TensorRT 10; where it is gone, trust the flag.
    if fp16 and getattr(builder, "platform_has_fast_fp16", True):
        config.set_flag(trt.BuilderFlag.FP16)
    elif fp16:
        log.info("tensorrt.fp16_skipped", reason="platform has no fast FP16")
    h, w = bundle.input_size
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, 3, h, w), (1, 3, h, w), (MAX_BATCH, 3, h, w))
    config.add_optimization_profile(profile)
    cache_file = target.parent / "timing.cache"
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build a plan from {onnx_path} (see the log above)")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, bytes(serialized))
    write_atomically(cache_file, bytes(config.get_timing_cache().serialize()))
    log.info("tensorrt.plan_built", plan=str(target))
    return target


@register_extractor("tensorrt")
class TensorRtExtractor:
    name = "tensorrt"

    @staticmethod
    def unavailable(config: TensorRtEngineConfig) -> str | None:
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed"
        if not torch.cuda.is_available():
            return "no CUDA GPU visible to torch"
        return None

    def __init__(self, bundle: Bundle, config: TensorRtEngineConfig) -> None:
        trt = _trt()
        self.device = resolve_device(config.device)
        if self.device.type != "cuda":
            raise EngineError("the tensorrt engine needs a CUDA device")
        torch.cuda.set_device(self.device)
        plan = build_plan(bundle, self.device, config.fp16, config.workspace_mb)
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._runtime.deserialize_cuda_engine(plan.read_bytes())
        if self._engine is None:
            raise EngineError(f"{plan}: TensorRT could not deserialize the plan; delete it to rebuild")
        self._context = self._engine.create_execution_context()
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if INPUT_NAME not in names or OUTPUT_NAME not in names:
            raise EngineError(f"{plan}: expected tensors {INPUT_NAME}/{OUTPUT_NAME}, found {names}")
        self._stream = torch.cuda.Stream(self.device)
        self.name = f"tensorrt-{'fp16' if config.fp16 else 'fp32'}"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, dtype=torch.float32).contiguous()
        self._context.set_input_shape(INPUT_NAME, tuple(x.shape))
        out_shape = tuple(self._context.get_tensor_shape(OUTPUT_NAME))
        out = torch.empty(out_shape, device=self.device, dtype=torch.float32)
        self._context.set_tensor_address(INPUT_NAME, x.data_ptr())
        self._context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        self._stream.wait_stream(torch.cuda.current_stream(self.device))
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise EngineError("TensorRT execution failed")
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return out

    def close(self) -> None:
        # Explicit order: context before engine before runtime (not __del__).
        self._context = None
        self._engine = None
        self._runtime = None
