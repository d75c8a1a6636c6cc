"""OpenVINO extractor: the bundle's extractor.onnx on Intel's CPU runtime (and Intel GPUs).

The runtime anomalib and Frigate deploy on Intel machines. It reads the same checked
ONNX bytes ONNX Runtime does (``bundle.blob``, never the file a second time), so both
see one network; FP32 by default: measured here, its features equal ONNX Runtime's
to rounding, while BF16 moved them by about 2.5 % (docs/accuracy.md), which a bundle's
threshold was not calibrated for. ``auto`` takes it only where it measures faster than
ONNX Runtime on this machine and bundle (``auto_engine``).
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any, Literal

from anomalyd.engines.base import EngineError, EngineHooks, EngineSettings, register_extractor
from anomalyd.settings import setting

if TYPE_CHECKING:
    import torch

    from anomalyd.model.bundle import Bundle


class OpenVinoEngineConfig(EngineSettings):
    type: Literal["openvino"] = "openvino"
    device: str = setting("CPU", "Device", "OpenVINO device: CPU, or GPU for Intel graphics.", min_length=1)
    precision: Literal["f32", "bf16"] = setting(
        "f32",
        "Inference precision",
        "f32: features as ONNX Runtime computes them; bf16 (CPUs with AMX or AVX-512 BF16) is faster but moves "
        "the features: calibrate the bundle's threshold again before using it on a line.",
    )


@register_extractor(OpenVinoEngineConfig)
class OpenVinoExtractor:
    name = "openvino"

    @staticmethod
    def unavailable(config: OpenVinoEngineConfig) -> str | None:
        try:
            import openvino
        except ImportError:
            return "openvino is not installed (pip install 'anomalyd[openvino]')"
        devices = openvino.Core().available_devices
        if not any(d == config.device or d.startswith(config.device + ".") for d in devices):
            return f"OpenVINO device {config.device!r} not present (present: {', '.join(devices) or 'none'})"
        return None

    def __init__(self, bundle: Bundle, config: OpenVinoEngineConfig, hooks: EngineHooks = EngineHooks()) -> None:
        import numpy as np
        import openvino
        import torch

        from anomalyd.model.names import EXTRACTOR_ONNX

        reason = self.unavailable(config)
        if reason:
            raise EngineError(f"openvino engine: {reason}")
        core = openvino.Core()
        properties: dict[str, Any] = {
            "PERFORMANCE_HINT": "LATENCY",  # one frame at a time, as the line delivers them
            "INFERENCE_PRECISION_HINT": config.precision,
        }
        if config.device == "CPU":
            properties["INFERENCE_NUM_THREADS"] = config.threads or (os.cpu_count() or 1)
        try:
            # The weights are inside the ONNX file: an empty weights tensor says so.
            model = core.read_model(bundle.blob(EXTRACTOR_ONNX), openvino.Tensor(np.empty(0, np.uint8)))
            self._compiled = core.compile_model(model, config.device, properties)
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses of its own per failure
            raise EngineError(f"openvino could not load {bundle.file(EXTRACTOR_ONNX)}: {exc}") from exc
        self._request = self._compiled.create_infer_request()
        # One infer request is not to be used by two threads at once (an inspection and a warm-up).
        self._lock = threading.Lock()
        self.name = f"openvino-{config.device.lower()}" + ("-bf16" if config.precision == "bf16" else "")
        self.device = torch.device("cpu")  # the features come back in host memory whatever runs them

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        with self._lock:
            self._request.infer({0: array})
            # The output tensor is the request's buffer, overwritten by the next frame: copy it out.
            features = np.array(self._request.get_output_tensor(0).data, copy=True)
        return torch.from_numpy(features)

    def close(self) -> None:
        del self._request, self._compiled
