"""The inspection pipeline: frame → preprocess → extract → search → anomaly map → score."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from anomalyd.engines.base import Extractor, Searcher
from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.bundle import Bundle
from anomalyd.model.images import resize_for_model

STAGES = ("preprocess", "extract", "search", "map")


@dataclass(frozen=True)
class Inspection:
    """The model's answer for one frame (the verdict is the daemon's decision)."""

    score: float  # normalised: 1.0 = highest held-back good part
    raw_score: float
    anomaly_map: np.ndarray  # normalised, at the model input size
    roi: tuple[int, int, int, int]  # x, y, width, height of the inspected area in the frame
    timings_ms: dict[str, float] = field(default_factory=dict)

    def frame_map(self, frame_shape: tuple[int, ...]) -> np.ndarray:
        """The anomaly map placed onto the full frame (zero outside the ROI)."""
        x, y, w, h = self.roi
        full = np.zeros(frame_shape[:2], dtype=np.float32)
        full[y : y + h, x : x + w] = cv2.resize(self.anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)
        return full


def area_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of OpenCV's INTER_AREA resize along one axis.

    INTER_AREA is linear and separable, so resizing the rows of an identity
    matrix yields exactly the weights it applies.
    """
    eye = np.eye(src, dtype=np.float32)
    return np.ascontiguousarray(cv2.resize(eye, (dst, src), interpolation=cv2.INTER_AREA).T)


class Inspector:
    """Runs a bundle with a chosen extractor and searcher; one instance per process."""

    def __init__(
        self,
        bundle: Bundle,
        extractor: Extractor,
        searcher: Searcher,
        roi: tuple[int, int, int, int] | None = None,
    ) -> None:
        self.bundle = bundle
        self.extractor = extractor
        self.searcher = searcher
        self.roi = roi
        self.device = extractor.device
        grid = tuple(bundle.manifest["feature_grid"])
        self.mapper = AnomalyMapper(grid, bundle.input_size, bundle.map_sigma, str(self.device))  # type: ignore[arg-type]
        self.reference = bundle.reference_score
        self._resamplers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._sync: Callable[[], None] = (
            (lambda: torch.cuda.synchronize(self.device)) if self.device.type == "cuda" else (lambda: None)
        )

    @property
    def engine_name(self) -> str:
        return f"{self.extractor.name}+{self.searcher.name}"

    def _roi_for(self, frame: np.ndarray) -> tuple[int, int, int, int]:
        if self.roi is None:
            return 0, 0, frame.shape[1], frame.shape[0]
        x, y, w, h = self.roi
        if x + w > frame.shape[1] or y + h > frame.shape[0]:
            raise ValueError(f"ROI {self.roi} does not fit a {frame.shape[1]}x{frame.shape[0]} frame")
        return self.roi

    def preprocess(self, frame: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """HxWx3 uint8 RGB frame → ``[1, 3, H, W]`` float 0..255 on the engine's device."""
        roi = self._roi_for(frame)
        x, y, w, h = roi
        if self.device.type == "cuda":
            # The frame crosses to the GPU once; crop and resize happen there, with
            # OpenCV's area weights so GPU and CPU see the same model input.
            t = torch.from_numpy(frame).to(self.device, non_blocking=True)[y : y + h, x : x + w]
            t = t.permute(2, 0, 1).float()
            if (h, w) != self.bundle.input_size:
                rows, cols = self._resample(h, w)
                t = torch.round(rows @ t @ cols).clamp_(0, 255)
            return t.unsqueeze(0), roi
        small = resize_for_model(frame[y : y + h, x : x + w], self.bundle.input_size)
        return torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))).unsqueeze(0).float(), roi

    def _resample(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Matrices R_y [H, h] and R_x^T [w, W] with ``R_y @ img @ R_x^T`` = cv2's INTER_AREA resize."""
        key = (h, w)
        if key not in self._resamplers:
            out_h, out_w = self.bundle.input_size
            self._resamplers[key] = (
                torch.from_numpy(area_matrix(h, out_h)).to(self.device),
                torch.from_numpy(area_matrix(w, out_w).T.copy()).to(self.device),
            )
        return self._resamplers[key]

    def inspect(self, frame: np.ndarray) -> Inspection:
        """Score one frame; timings per stage in milliseconds."""
        times = [time.perf_counter()]

        def mark() -> None:
            self._sync()
            times.append(time.perf_counter())

        with torch.inference_mode():
            batch, roi = self.preprocess(frame)
            mark()
            features = self.extractor.extract(batch)
            mark()
            c = features.shape[1]
            distances = self.searcher.search(features.permute(0, 2, 3, 1).reshape(-1, c))
            mark()
            amap = self.mapper(distances.to(self.device).reshape(1, -1))[0] / self.reference
            score = float(amap.max())
            small_map = amap.cpu().numpy()
            mark()
        timings = {stage: (times[i + 1] - times[i]) * 1000.0 for i, stage in enumerate(STAGES)}
        timings["total"] = (times[-1] - times[0]) * 1000.0
        return Inspection(score, score * self.reference, small_map, roi, timings)

    def warm_up(self, runs: int = 2) -> None:
        """Run dummy frames so the first real part does not pay for lazy initialisation."""
        h, w = self.bundle.input_size
        frame = (
            np.zeros((h, w, 3), dtype=np.uint8)
            if self.roi is None
            else np.zeros((self.roi[1] + self.roi[3], self.roi[0] + self.roi[2], 3), dtype=np.uint8)
        )
        for _ in range(runs):
            self.inspect(frame)

    def close(self) -> None:
        self.extractor.close()
        self.searcher.close()


def open_inspector(
    bundle: Bundle, engine_config: Any, search_config: Any, roi: tuple[int, int, int, int] | None = None
) -> Inspector:
    """Build extractor and searcher from config and wrap them in an Inspector.

    The ROI the bundle was fitted with applies unless ``roi`` is given; a given
    ROI that differs from the bundle's is refused (the model would see another
    crop than it learned, and its scores would mean nothing).
    """
    from anomalyd.engines.base import EngineError
    from anomalyd.engines.select import build_extractor, build_searcher

    fitted = bundle.manifest.get("roi")
    fitted_roi = (int(fitted[0]), int(fitted[1]), int(fitted[2]), int(fitted[3])) if fitted else None
    if roi is None:
        roi = fitted_roi
    elif fitted_roi is not None and tuple(roi) != fitted_roi:
        raise EngineError(
            f"{bundle.path}: fitted with ROI x,y,w,h = {fitted_roi}, but the camera's ROI is {tuple(roi)}; "
            "set camera.roi to the bundle's (or leave it empty), or refit with --roi"
        )

    extractor = build_extractor(bundle, engine_config)
    searcher = build_searcher(bundle, search_config, extractor.device, engine_config.threads)
    return Inspector(bundle, extractor, searcher, roi)
