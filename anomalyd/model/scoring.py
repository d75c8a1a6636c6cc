"""The one path from a frame to a raw anomaly map and image score.

``fit`` (hold-out calibration, validation), ``score``, ``eval`` and the daemon's
:class:`~anomalyd.model.inspector.Inspector` all score through a
:class:`Scorer` built from the same :class:`~anomalyd.model.manifest.ModelSpec`:
crop to the bundle's ROI, resize to its input size (area weights, on the CPU or
the GPU), extract, compare with the memory (global or position-aware), map, and
reduce to an image score. What fit calibrated on is what runs on the line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch

from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.head import Head
from anomalyd.model.images import resize_for_model
from anomalyd.model.manifest import ModelSpec, Roi
from anomalyd.model.ports import Extractor, Searcher


def area_matrix(src: int, dst: int) -> np.ndarray:
    """[dst, src] weights of OpenCV's INTER_AREA resize along one axis.

    INTER_AREA is linear and separable, so resizing the rows of an identity
    matrix yields exactly the weights it applies.
    """
    eye = np.eye(src, dtype=np.float32)
    return np.ascontiguousarray(cv2.resize(eye, (dst, src), interpolation=cv2.INTER_AREA).T)


class Preprocessor:
    """HxWx3 uint8 RGB frame → ``[1, 3, H, W]`` float 0..255 on the device, ROI applied."""

    def __init__(self, input_size: tuple[int, int], roi: Roi | None, device: torch.device) -> None:
        self.input_size = input_size
        self.roi = roi
        self.device = device
        self._resamplers: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._pinned: dict[tuple[Any, str], tuple[torch.Tensor, Any]] = {}

    def region(self, frame_shape: tuple[int, ...]) -> Roi:
        """The inspected area of a frame of this shape; a ROI that does not fit is an error."""
        if self.roi is None:
            return 0, 0, int(frame_shape[1]), int(frame_shape[0])
        x, y, w, h = self.roi
        if x + w > frame_shape[1] or y + h > frame_shape[0]:
            raise ValueError(f"ROI {self.roi} does not fit a {frame_shape[1]}x{frame_shape[0]} frame")
        return self.roi

    def __call__(self, frame: np.ndarray) -> tuple[torch.Tensor, Roi]:
        roi = self.region(frame.shape)
        x, y, w, h = roi
        if self.device.type == "cuda":
            # The frame crosses to the GPU once; crop and resize happen there, with
            # OpenCV's area weights so GPU and CPU see the same model input.
            t = self._to_device(frame)[y : y + h, x : x + w]
            t = t.permute(2, 0, 1).float()
            if (h, w) != self.input_size:
                rows, cols = self._resample(h, w)
                t = torch.round(rows @ t @ cols).clamp_(0, 255)
            return t.unsqueeze(0), roi
        small = resize_for_model(frame[y : y + h, x : x + w], self.input_size)
        return torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1))).unsqueeze(0).float(), roi

    def _to_device(self, frame: np.ndarray) -> torch.Tensor:
        """The frame on the GPU through a pinned staging buffer (a truly asynchronous copy, not a
        pageable one that the driver stages itself); the buffer is reused once its last copy is done."""
        key = (frame.shape, frame.dtype.str)
        staged = self._pinned.get(key)
        if staged is None:
            buffer = torch.empty(frame.shape, dtype=torch.from_numpy(frame[:0]).dtype, pin_memory=True)
            staged = self._pinned[key] = (buffer, torch.cuda.Event())
        buffer, copied = staged
        copied.synchronize()  # the previous frame's copy out of this buffer has finished
        buffer.numpy()[...] = frame
        on_device = buffer.to(self.device, non_blocking=True)
        copied.record(torch.cuda.current_stream(self.device))
        return on_device

    def batch(self, frames: list[np.ndarray]) -> torch.Tensor:
        """Several frames as one ``[B, 3, H, W]`` batch (fit and calibration)."""
        return torch.cat([self(f)[0] for f in frames])

    def _resample(self, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Matrices R_y [H, h] and R_x^T [w, W] with ``R_y @ img @ R_x^T`` = cv2's INTER_AREA resize."""
        key = (h, w)
        if key not in self._resamplers:
            out_h, out_w = self.input_size
            self._resamplers[key] = (
                torch.from_numpy(area_matrix(h, out_h)).to(self.device),
                torch.from_numpy(area_matrix(w, out_w).T.copy()).to(self.device),
            )
        return self._resamplers[key]


class Scorer:
    """Frame(s) → raw anomaly maps and raw image scores, by one model spec."""

    def __init__(
        self,
        spec: ModelSpec,
        extractor: Extractor,
        searcher: Searcher,
        roi: Roi | None = None,
        head: Head | None = None,
        projection: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> None:
        self.spec = spec
        self.head = head  # learned from labelled defects: its cell score replaces the distance
        # The searcher's bank is in these coordinates (bundle.search_projection): queries are projected to match.
        self._projection = (
            None
            if projection is None
            else (
                torch.from_numpy(projection[0]).to(extractor.device),
                torch.from_numpy(projection[1]).to(extractor.device),
            )
        )
        self.extractor = extractor
        self.searcher = searcher
        self.device = extractor.device
        self.preprocess = Preprocessor(spec.input_size, roi if roi is not None else spec.roi, self.device)
        self.mapper = AnomalyMapper(spec.feature_grid, spec.input_size, spec.map.sigma, str(self.device))
        gh, gw = spec.feature_grid
        h, w = spec.input_size
        # top_k counts feature cells; the map is at input resolution, so k cells = k·(pixels per cell) pixels.
        self._top_pixels = max(1, round(spec.map.top_k * (h * w) / (gh * gw)))

    def search(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` patch features → ``[B, h·w]`` distances to the memory, on the engine's device."""
        # The memory holds the frozen features; a learned stage's channels after them are the head's alone.
        c = self.spec.feature_dim
        b = features.shape[0]
        queries = features[:, :c].permute(0, 2, 3, 1).reshape(-1, c)
        if self._projection is not None:
            mean, basis = self._projection
            queries = (queries.to(mean.dtype) - mean) @ basis
        return self.searcher.search(queries).to(self.device).reshape(b, -1)

    def cell_scores(self, features: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` → ``[B, h·w]``: the distance to the memory, or the head's score of it and the features."""
        distances = self.search(features)
        if self.head is None:
            return distances
        return self.head.score_cells(features, distances).to(self.device)

    def distances(self, batch: torch.Tensor) -> torch.Tensor:
        """``[B, 3, H, W]`` → ``[B, h·w]`` cell scores (patch distances to the memory, or the head's)."""
        return self.cell_scores(self.extractor.extract(batch))

    def maps(self, distances: torch.Tensor) -> torch.Tensor:
        """``[B, h·w]`` → ``[B, H, W]`` raw anomaly maps at the input size."""
        return self.mapper(distances)

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        """``[B, H, W]`` → ``[B]`` raw image scores, as the manifest's ``map.image_score`` says."""
        flat = maps.reshape(maps.shape[0], -1)
        if self.spec.map.image_score == "top_k" and self._top_pixels > 1:
            return flat.topk(min(self._top_pixels, flat.shape[1]), dim=1).values.mean(1)
        return flat.amax(dim=1)

    def run(
        self, frames: list[np.ndarray], mark: Callable[[], None] = lambda: None
    ) -> tuple[torch.Tensor, torch.Tensor, Roi]:
        """The one scoring sequence: frames → raw maps ``[B, H, W]``, raw image scores ``[B]`` and the ROI.

        ``mark`` is called before each stage and after the last (preprocess, extract,
        search, map): the Inspector times the stages with it, fit and eval do not.
        """
        mark()
        if len(frames) == 1:
            batch, roi = self.preprocess(frames[0])
        else:
            batch, roi = self.preprocess.batch(frames), self.preprocess.region(frames[0].shape)
        mark()
        features = self.extractor.extract(batch)
        mark()
        cells = self.cell_scores(features)
        mark()
        maps = self.maps(cells)
        return maps, self.image_scores(maps), roi

    def score_frames(self, frames: list[np.ndarray]) -> np.ndarray:
        """Raw image scores of whole frames (fit's calibration and validation)."""
        with torch.inference_mode():
            return self.run(frames)[1].cpu().numpy()
