"""torch extractor: the bundle's weights in our own module, on the CPU or CUDA.

On CUDA it runs in FP16 and channels-last where asked, and can replay a captured
CUDA graph (fixed batch of 1) to cut launch overhead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from anomalyd.engines import cuda_info
from anomalyd.engines.base import EngineError, EngineHooks, EngineSettings, register_extractor, resolve_device
from anomalyd.settings import setting

if TYPE_CHECKING:
    import torch

    from anomalyd.model.bundle import Bundle
    from anomalyd.model.features import PatchFeatures


class TorchEngineConfig(EngineSettings):
    type: Literal["torch"] = "torch"
    device: str = setting("auto", "Device", "torch device: auto (cuda if present), cpu, cuda, cuda:1.")
    fp16: bool = setting(True, "FP16", "Half precision on CUDA (ignored on the CPU).")
    channels_last: bool = setting(True, "Channels last", "NHWC memory layout on CUDA (faster convolutions).")
    cuda_graph: bool = setting(False, "CUDA graph", "Capture the extractor as a CUDA graph (fixed batch of 1).")


def load_bundle_module(bundle: Bundle) -> PatchFeatures:
    """The patch-feature module with the bundle's own weights (strict)."""
    from anomalyd.model.features import build_patch_features

    spec = bundle.spec
    module = build_patch_features(spec.backbone, spec.taps, spec.proj_dim, learned=spec.learned is not None)
    try:
        module.load_state_dict(bundle.extractor_state(), strict=True)
    except RuntimeError as exc:
        raise EngineError(f"{bundle.path}: extractor weights do not fit {spec.backbone}: {exc}") from exc
    return module.eval()


@register_extractor(TorchEngineConfig)
class TorchExtractor:
    name = "torch"

    @staticmethod
    def unavailable(config: TorchEngineConfig) -> str | None:
        import torch

        if config.device.startswith("cuda") and not torch.cuda.is_available():
            return cuda_info.mismatch(cuda_info.torch_cuda_major(), "torch") or (
                f"this torch build sees no CUDA GPU ({cuda_info.describe()})"
            )
        return None

    def __init__(self, bundle: Bundle, config: TorchEngineConfig, hooks: EngineHooks = EngineHooks()) -> None:
        import torch

        self.device = resolve_device(config.device)
        if self.device.type == "cpu" and config.threads:
            torch.set_num_threads(config.threads)
        module = load_bundle_module(bundle).to(self.device)
        on_cuda = self.device.type == "cuda"
        self.dtype = torch.float16 if (on_cuda and config.fp16) else torch.float32
        self.memory_format = torch.channels_last if (on_cuda and config.channels_last) else torch.contiguous_format
        self.module = module.to(dtype=self.dtype).to(memory_format=self.memory_format)  # type: ignore[call-overload]
        self.name = f"torch-{self.device.type}" + ("-fp16" if self.dtype == torch.float16 else "")
        self._graph: torch.cuda.CUDAGraph | None = None
        if on_cuda and config.cuda_graph:
            self._capture(bundle.input_size)

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, dtype=self.dtype, memory_format=self.memory_format, non_blocking=True)
        return self.module(x).float()

    def _capture(self, input_size: tuple[int, int]) -> None:
        import torch

        # Capture on our device, not whatever device is current (cuda:1 on a two-GPU box).
        with torch.cuda.device(self.device):
            self._capture_here(input_size)

    def _capture_here(self, input_size: tuple[int, int]) -> None:
        import torch

        self._static_in = torch.zeros(1, 3, *input_size, device=self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream before capture, as CUDA graphs require
                self._run(self._static_in)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self._graph = torch.cuda.CUDAGraph()
        # thread_local: a recipe reload captures in a background thread while the loop thread goes on
        # inspecting (synchronising, copying); in the default "global" mode those calls from another thread
        # invalidate the capture and fail both the part and the recipe load.
        with torch.inference_mode(), torch.cuda.graph(self._graph, stream=stream, capture_error_mode="thread_local"):
            self._static_out = self._run(self._static_in)
        self.name += "-graph"

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.inference_mode():
            if self._graph is not None and images.shape[0] == 1:
                with torch.cuda.device(self.device):
                    self._static_in.copy_(images, non_blocking=True)
                    self._graph.replay()
                    # A copy: the next replay overwrites _static_out, the caller's result must not change.
                    return self._static_out.clone()
            return self._run(images)

    def close(self) -> None:
        import torch

        self._graph = None
        del self.module
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
