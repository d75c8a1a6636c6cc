"""ONNX Runtime extractor: the bundle's extractor.onnx on the CPU (or a GPU provider)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Literal

from anomalyd.engines.base import EngineError, EngineHooks, EngineSettings, register_extractor
from anomalyd.settings import setting

if TYPE_CHECKING:
    import torch

    from anomalyd.model.bundle import Bundle


class OnnxRuntimeEngineConfig(EngineSettings):
    type: Literal["onnxruntime"] = "onnxruntime"
    providers: list[str] = setting(
        ["CPUExecutionProvider"], "Execution providers", "ONNX Runtime providers in order of preference."
    )


@register_extractor(OnnxRuntimeEngineConfig)
class OnnxRuntimeExtractor:
    name = "onnxruntime"

    @staticmethod
    def unavailable(config: OnnxRuntimeEngineConfig) -> str | None:
        try:
            import onnxruntime
        except ImportError:
            return "onnxruntime is not installed"
        missing = [p for p in config.providers if p not in onnxruntime.get_available_providers()]
        return f"execution providers not available: {', '.join(missing)}" if missing else None

    def __init__(self, bundle: Bundle, config: OnnxRuntimeEngineConfig, hooks: EngineHooks = EngineHooks()) -> None:
        import onnxruntime as ort
        import torch

        from anomalyd.model.names import EXTRACTOR_ONNX

        reason = self.unavailable(config)
        if reason:
            raise EngineError(f"onnxruntime engine: {reason}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = config.threads or (os.cpu_count() or 1)
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle ORT threads must not spin: on a small edge CPU they would steal the
        # cores that the search and the PLC thread need between inferences.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(bundle.blob(EXTRACTOR_ONNX), options, providers=list(config.providers))
        except Exception as exc:  # ORT raises its own exception types per failure
            raise EngineError(f"onnxruntime could not load {bundle.file(EXTRACTOR_ONNX)}: {exc}") from exc
        self.providers = self.session.get_providers()
        self.device = torch.device("cpu")

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        import numpy as np
        import torch

        from anomalyd.model.names import INPUT_NAME

        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        (features,) = self.session.run(None, {INPUT_NAME: array})
        return torch.from_numpy(features)

    def close(self) -> None:
        del self.session
