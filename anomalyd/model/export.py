"""Export the patch-feature module to ONNX and check it."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from anomalyd.model.names import INPUT_NAME, OUTPUT_NAME

OPSET = 17


def export_onnx(model: nn.Module, input_size: tuple[int, int], path: Path) -> None:
    """Write ``model`` as ONNX with a dynamic batch axis, then run onnx.checker on it."""
    h, w = input_size
    example = torch.zeros(1, 3, h, w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
