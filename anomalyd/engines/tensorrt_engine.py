"""TensorRT extractor: a plan built from the bundle's ONNX, run with the I/O-tensor API (TensorRT 8.5–10).

Plans are cached in the bundle under ``engines/`` (see ``plan_cache``): named by
the ONNX checksum, GPU identity, TensorRT version and precision, so a bundle
refitted, moved to another GPU or TensorRT release builds a fresh plan instead
of loading a wrong one; a plan that fails to deserialize is set aside and rebuilt.
Buffers are torch CUDA tensors: one CUDA context serves TensorRT, the search and
the anomaly map, and nothing is copied to the host.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from anomalyd.engines import cuda_info
from anomalyd.engines.base import EngineError, EngineHooks, EngineSettings, register_extractor, resolve_device
from anomalyd.engines.plan_cache import (
    announce_build,
    gpu_identity,
    plan_file,
    read_timing_cache,
    set_aside,
    timing_cache_file,
    write_atomically,
)
from anomalyd.log import get_logger
from anomalyd.model.names import EXTRACTOR_ONNX, INPUT_NAME, OUTPUT_NAME
from anomalyd.settings import setting

if TYPE_CHECKING:
    import torch

    from anomalyd.model.bundle import Bundle

log = get_logger(__name__)
MAX_BATCH = 8


class TensorRtEngineConfig(EngineSettings):
    type: Literal["tensorrt"] = "tensorrt"
    device: str = setting("cuda", "Device", "CUDA device, e.g. cuda or cuda:1.")
    fp16: bool = setting(True, "FP16", "Build the plan in FP16 where the GPU has fast FP16.")
    workspace_mb: int = setting(1024, "Workspace", "Builder workspace limit.", "MiB", ge=16, le=1_000_000)


def _trt() -> Any:
    try:
        import tensorrt
    except ImportError as exc:
        raise EngineError("tensorrt is not installed (make venv CUDA=12 or CUDA=13: docs/deployment.md)") from exc
    return tensorrt


def _major(trt: Any) -> int:
    return int(str(trt.__version__).split(".")[0])


def check_version(trt: Any, fp16: bool) -> None:
    """TensorRT 8.5 to 10 are supported; 11 only in FP32 (it has no FP16 builder flag)."""
    major = _major(trt)
    if major < 8 or (major == 8 and int(str(trt.__version__).split(".")[1]) < 5):
        raise EngineError(f"TensorRT {trt.__version__} is too old: 8.5 or newer is needed (JetPack 5.1+)")
    if fp16 and not hasattr(trt.BuilderFlag, "FP16"):
        raise EngineError(
            f"TensorRT {trt.__version__} builds strongly typed networks only (no FP16 flag): "
            "set engine.fp16: false, or install tensorrt>=10,<11 (the tested range)"
        )


def plan_path(bundle: Bundle, device: torch.device, fp16: bool) -> Path:
    """Where the plan for this exact ONNX file, GPU, TensorRT version and precision is cached."""
    trt = _trt()
    onnx_sha = bundle.spec.files[EXTRACTOR_ONNX]
    return plan_file(bundle.path / "engines", onnx_sha, gpu_identity(device), str(trt.__version__), fp16)


def build_plan(
    bundle: Bundle,
    device: torch.device,
    fp16: bool = True,
    workspace_mb: int = 1024,
    on_long_build: Callable[[float], None] = lambda seconds: None,
) -> Path:
    """Build (or reuse) the plan for ``device``; returns its path. Builds on ``device`` itself."""
    import torch

    trt = _trt()
    check_version(trt, fp16)
    target = plan_path(bundle, device, fp16)
    if target.is_file():
        return target
    announce_build(on_long_build)
    log.info("tensorrt.plan_building", plan=str(target), device=str(device))
    with torch.cuda.device(device):
        serialized, cache = _build(trt, bundle, device, fp16, workspace_mb)
    write_atomically(target, serialized)
    if cache is not None:
        write_atomically(timing_cache_file(target.parent, gpu_identity(device), str(trt.__version__)), cache)
    log.info("tensorrt.plan_built", plan=str(target))
    return target


def attach_timing_cache(config: Any, cache_path: Path) -> None:
    """Give the builder config the cache at ``cache_path``; a foreign or damaged one is set aside.

    ``config`` is TensorRT's ``IBuilderConfig`` (the only calls: ``create_timing_cache``,
    ``set_timing_cache``): ``set_timing_cache`` returns False for a cache from another
    GPU or version, and the build then goes on with a fresh, empty cache.
    """
    try:
        cache = config.create_timing_cache(read_timing_cache(cache_path))
        accepted = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
    except Exception as exc:  # a damaged file can make TensorRT raise instead of returning None/False
        log.warning("tensorrt.timing_cache_error", file=str(cache_path), error=str(exc))
        accepted = False
    if not accepted:
        if cache_path.is_file():
            set_aside(cache_path, "TensorRT refused it (another GPU or version, or damaged)")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=True)


def _made(factory: Any, what: str, *args: Any) -> Any:
    """``trt.Builder(logger)`` / ``trt.Runtime(logger)``, or an EngineError a person can act on.

    Without a usable GPU or driver TensorRT's factories raise ``TypeError: … factory
    function returned nullptr`` (or return None): a start-up fault, not a crash loop.
    """
    try:
        made = factory(*args)
    except (TypeError, RuntimeError) as exc:
        made, why = None, str(exc)
    else:
        why = "returned nothing"
    if made is None:
        raise EngineError(
            f"TensorRT could not create its {what} ({why}); {cuda_info.describe()}: is the NVIDIA driver loaded "
            "and the GPU visible (nvidia-smi), and does the TensorRT build match the driver's CUDA? "
            "engine: onnxruntime runs without it"
        )
    return made


def _build(trt: Any, bundle: Bundle, device: torch.device, fp16: bool, workspace_mb: int) -> tuple[bytes, bytes | None]:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = _made(trt.Builder, "builder", logger)
    # TensorRT 8.x (JetPack 5, 6.0) needs the explicit-batch flag; from 10 it is the only mode.
    flags = 0 if _major(trt) >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    onnx_path = bundle.file(EXTRACTOR_ONNX)
    # The verified bytes read at load, not the file again (a promote may have moved the link).
    if not parser.parse(bundle.blob(EXTRACTOR_ONNX)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    # platform_has_fast_fp16 is deprecated in TensorRT 10; where it is gone, trust the flag.
    # TensorRT 10 allows TF32 by default: an "fp32" plan would run its matrix products with 10-bit
    # mantissas, outside the 2e-3 acceptance tolerance. FP32 means FP32 (also the FP32 layers of an FP16 plan).
    if hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)
    if fp16 and getattr(builder, "platform_has_fast_fp16", True):
        config.set_flag(trt.BuilderFlag.FP16)
    elif fp16:
        log.info("tensorrt.fp16_skipped", reason="platform has no fast FP16")
    h, w = bundle.input_size
    profile = builder.create_optimization_profile()
    profile.set_shape(INPUT_NAME, (1, 3, h, w), (1, 3, h, w), (MAX_BATCH, 3, h, w))
    config.add_optimization_profile(profile)
    attach_timing_cache(config, timing_cache_file(bundle.path / "engines", gpu_identity(device), str(trt.__version__)))
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"TensorRT failed to build a plan from {onnx_path} (see the log above)")
    timing = config.get_timing_cache()
    return bytes(serialized), (bytes(timing.serialize()) if timing is not None else None)


@register_extractor(TensorRtEngineConfig)
class TensorRtExtractor:
    name = "tensorrt"

    @staticmethod
    def unavailable(config: TensorRtEngineConfig) -> str | None:
        import torch

        try:
            import tensorrt  # noqa: F401
        except ImportError:
            return "tensorrt is not installed"
        too_new = cuda_info.mismatch(cuda_info.tensorrt_cuda(), "TensorRT")
        if too_new:
            return too_new
        if not torch.cuda.is_available():
            return cuda_info.mismatch(cuda_info.torch_cuda_major(), "torch") or (
                f"no CUDA GPU visible to torch ({cuda_info.describe()})"
            )
        return None

    def __init__(self, bundle: Bundle, config: TensorRtEngineConfig, hooks: EngineHooks = EngineHooks()) -> None:
        import torch

        trt = _trt()
        self.device = resolve_device(config.device)  # always with an index: cuda:N
        if self.device.type != "cuda":
            raise EngineError("the tensorrt engine needs a CUDA device")
        self._runtime = _made(trt.Runtime, "runtime", trt.Logger(trt.Logger.WARNING))
        with torch.cuda.device(self.device):
            plan = build_plan(bundle, self.device, config.fp16, config.workspace_mb, hooks.on_long_build)
            self._engine = self._deserialize(plan)
            if self._engine is None:  # a damaged plan (a crash of an old version, a bad disk): rebuild once
                set_aside(plan, "TensorRT could not deserialize it")
                plan = build_plan(bundle, self.device, config.fp16, config.workspace_mb, hooks.on_long_build)
                self._engine = self._deserialize(plan)
            if self._engine is None:
                raise EngineError(f"{plan}: TensorRT could not deserialize a freshly built plan")
            self._context = self._engine.create_execution_context()
            self._stream = torch.cuda.Stream(self.device)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        if INPUT_NAME not in names or OUTPUT_NAME not in names:
            raise EngineError(f"{plan}: expected tensors {INPUT_NAME}/{OUTPUT_NAME}, found {names}")
        for tensor in (INPUT_NAME, OUTPUT_NAME):
            dtype = self._engine.get_tensor_dtype(tensor)
            if dtype != trt.DataType.FLOAT:
                raise EngineError(f"{plan}: tensor {tensor} is {dtype}, expected FLOAT (fp32 I/O)")
        self.name = f"tensorrt-{'fp16' if config.fp16 else 'fp32'}"

    def _deserialize(self, plan: Path) -> Any:
        try:
            return self._runtime.deserialize_cuda_engine(plan.read_bytes())
        except Exception as exc:  # some versions raise instead of returning None
            log.warning("tensorrt.deserialize_failed", plan=str(plan), error=str(exc))
            return None

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        x = images.to(self.device, dtype=torch.float32).contiguous()
        if x.shape[0] > MAX_BATCH:
            return torch.cat([self.extract(chunk) for chunk in x.split(MAX_BATCH)])
        if not self._context.set_input_shape(INPUT_NAME, tuple(x.shape)):
            raise EngineError(f"TensorRT refused input shape {tuple(x.shape)} (profile: 1..{MAX_BATCH} images)")
        out_shape = tuple(self._context.get_tensor_shape(OUTPUT_NAME))
        if any(d < 0 for d in out_shape):
            raise EngineError(f"TensorRT output shape unresolved: {out_shape}")
        out = torch.empty(out_shape, device=self.device, dtype=torch.float32)
        if not (
            self._context.set_tensor_address(INPUT_NAME, x.data_ptr())
            and self._context.set_tensor_address(OUTPUT_NAME, out.data_ptr())
        ):
            raise EngineError("TensorRT refused a tensor address")
        # TensorRT runs in the current CUDA context: with device cuda:N, N must be current for the call,
        # whichever device the calling thread had (a second GPU, a thread that never chose one).
        with torch.cuda.device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self._stream.wait_stream(caller)  # the input is ready on the caller's stream
            if not self._context.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("TensorRT execution failed")
            caller.wait_stream(self._stream)
        # The buffers belong to the caller's stream from here: keep them alive until used there.
        x.record_stream(self._stream)
        out.record_stream(self._stream)
        return out

    def close(self) -> None:
        # Explicit order: context before engine before runtime (not __del__).
        self._context = None
        self._engine = None
        self._runtime = None
