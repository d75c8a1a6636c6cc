"""Fit's feature extraction: the model input's size, the exported network under ONNX Runtime, and
the features and scores of image files, preprocessed as the runtime does."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomalyd.engines.base import resolve_device
from anomalyd.model import bundle as bundle_io
from anomalyd.model.export import export_onnx
from anomalyd.model.features import feature_stride
from anomalyd.model.images import read_rgb
from anomalyd.model.scoring import Preprocessor, Scorer
from anomalyd.training.settings import FitSettings


def aspect_input_size(frame_hw: tuple[int, int], short_side: int = 224, max_side: int = 1024) -> tuple[int, int]:
    """Model input (height, width) with the frame's aspect ratio: short side ``short_side``, multiples of 32."""
    h, w = frame_hw
    scale = short_side / min(h, w)

    def snap(v: float) -> int:
        return int(min(max(32, round(v / 32) * 32), max_side))

    return snap(h * scale), snap(w * scale)


class OnnxFitExtractor:
    """The freshly exported network under ONNX Runtime: fit's CPU work (features, the head's inputs,
    calibration) runs what the daemon runs, and faster: a 448x1120 frame took 45 ms against 288 ms with
    torch's eager module on 2 cores (500 ms a frame in batches of 16)."""

    name = "onnxruntime-fit"

    def __init__(self, onnx: bytes, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.device = torch.device("cpu")

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        # One image a run: larger batches at these sizes only thrash the cache.
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.cat([torch.from_numpy(self.session.run(None, {self.input: x[None]})[0]) for x in array])

    def close(self) -> None:
        del self.session


def batches(items: list[Path], size: int) -> Iterable[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


CELLS_PER_DEFECT = 2.5  # a defect should span at least this many feature cells across


def defect_short_side(frame_short: int, stride: int, smallest_defect_px: float, short_side: int = 224) -> int:
    """The model input's short side so that the smallest defect spans ``CELLS_PER_DEFECT`` cells.

    A defect of area A frame pixels is about d = 2·sqrt(A/π) across; a feature cell
    covers ``stride`` input pixels, i.e. stride·frame_short/input_short frame pixels.
    Wanting d ≥ 2.5 cells gives input_short = 2.5·stride·frame_short/d, never below
    the default and never above the frame (no upsampling). BSData: pits of 300 px
    (d ≈ 20), stride 8, 460-pixel frames → 460, i.e. the frame's own resolution.
    """
    d = 2.0 * float(np.sqrt(max(smallest_defect_px, 1.0) / np.pi))
    wanted = CELLS_PER_DEFECT * stride * frame_short / d
    return int(min(frame_short, max(short_side, wanted)))


def model_input_size(files: list[Path], settings: FitSettings) -> tuple[int, int]:
    if settings.input_size is not None:
        return settings.input_size
    first = read_rgb(files[0])
    hw = (settings.roi[3], settings.roi[2]) if settings.roi else (first.shape[0], first.shape[1])
    if settings.smallest_defect_px is not None:
        stride = feature_stride(settings.backbone, settings.taps)
        short = defect_short_side(min(hw), stride, settings.smallest_defect_px, settings.short_side)
        return aspect_input_size(hw, short, max(settings.max_side, max(hw) + 32))
    return aspect_input_size(hw, settings.short_side, settings.max_side)


def extract_features(
    model: nn.Module,
    files: list[Path],
    settings: FitSettings,
    progress: Callable[[int], None],
    extractor: OnnxFitExtractor | None = None,
) -> torch.Tensor:
    """[N, C, h, w] patch features of the files on the CPU, in batches (the runtime's preprocessing).

    The CPU resizes (as the CPU runtime does); the network runs on the fit device, or under ONNX Runtime
    when ``extractor`` is given (fit does so on the CPU).
    """
    device = resolve_device(settings.device)
    prepare = Preprocessor(model_input_size(files, settings), settings.roi, torch.device("cpu"))
    if extractor is None:
        model.to(device)
    out = []
    with torch.inference_mode():
        for chunk in batches(files, settings.batch_size):
            batch = prepare.batch([read_rgb(p) for p in chunk])
            out.append(extractor.extract(batch) if extractor is not None else model(batch.to(device)).cpu())
            progress(len(chunk))
    if extractor is None:
        model.to("cpu")
    return torch.cat(out)


def score_files(scorer: Scorer, files: list[Path], batch_size: int, progress: Callable[[int], None]) -> np.ndarray:
    """Raw image scores of the files, through the runtime's scoring path."""
    out = []
    for chunk in batches(files, batch_size):
        out.append(scorer.score_frames([read_rgb(p) for p in chunk]))
        progress(len(chunk))
    return np.concatenate(out)


def onnx_bytes(model: nn.Module, size: tuple[int, int]) -> bytes:
    """The module exported (and checked) as the bundle's ``extractor.onnx``."""
    with tempfile.TemporaryDirectory(prefix="anomalyd-fit-") as folder:
        export_onnx(model, size, Path(folder) / bundle_io.EXTRACTOR_ONNX)
        return (Path(folder) / bundle_io.EXTRACTOR_ONNX).read_bytes()
