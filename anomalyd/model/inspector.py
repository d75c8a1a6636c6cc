"""The inspection pipeline: frame → preprocess → extract → search → anomaly map → score."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch

from anomalyd.model.bundle import Bundle, BundleError
from anomalyd.model.manifest import Roi
from anomalyd.model.ports import Extractor, Searcher
from anomalyd.model.scoring import Scorer

STAGES = ("preprocess", "extract", "search", "map")


@dataclass(frozen=True)
class Inspection:
    """The model's answer for one frame (the verdict is the daemon's decision)."""

    score: float  # normalised: 1.0 = highest held-back good part
    raw_score: float
    # The normalised map at the model input size: an array, or (on a GPU) a device tensor that is
    # copied to the host only when something asks for it (the pixel rule, the archive, the page).
    map_data: np.ndarray | torch.Tensor
    roi: Roi  # x, y, width, height of the inspected area in the frame
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def anomaly_map(self) -> np.ndarray:
        data = self.map_data
        if isinstance(data, torch.Tensor):
            data = data.float().cpu().numpy()
            object.__setattr__(self, "map_data", data)  # once; a second thread at worst copies it again
        return data

    def map_finite(self) -> bool:
        """Every map value finite, checked where the map is (one number from the GPU, not the map)."""
        data = self.map_data
        if isinstance(data, torch.Tensor):
            return bool(torch.isfinite(data).all())
        return bool(np.isfinite(data).all())

    def frame_map(self, frame_shape: tuple[int, ...]) -> np.ndarray:
        """The anomaly map placed onto the full frame (zero outside the ROI)."""
        x, y, w, h = self.roi
        full = np.zeros(frame_shape[:2], dtype=np.float32)
        full[y : y + h, x : x + w] = cv2.resize(self.anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)
        return full


class Inspector:
    """Runs a bundle with a chosen extractor and searcher; one instance per process.

    The scoring itself is :class:`~anomalyd.model.scoring.Scorer` (the path fit
    calibrated on); the Inspector adds normalisation and per-stage timings.
    """

    def __init__(
        self,
        bundle: Bundle,
        extractor: Extractor,
        searcher: Searcher,
        roi: Roi | None = None,
    ) -> None:
        self.bundle = bundle
        self.extractor = extractor
        self.searcher = searcher
        self.scorer = Scorer(
            bundle.spec, extractor, searcher, roi, bundle.head(extractor.device), bundle.search_projection()
        )
        self.roi = self.scorer.preprocess.roi
        self.device = extractor.device
        self.reference = bundle.reference_score
        self._cuda = self.device.type == "cuda"

    @property
    def engine_name(self) -> str:
        return f"{self.extractor.name}+{self.searcher.name}"

    def inspect(self, frame: np.ndarray) -> Inspection:
        """Score one frame; timings per stage in milliseconds.

        On a GPU the stages are timed with CUDA events on the caller's stream and the
        frame costs one synchronisation (reading the score), not one per stage and not
        device-wide (another thread's work, e.g. a recipe capturing its CUDA graph, is
        not waited for); the map stays on the device until asked for.
        """
        scorer = self.scorer
        started = time.perf_counter()
        events: list[Any] = []

        def mark() -> None:
            if self._cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record(torch.cuda.current_stream(self.device))
                events.append(event)
            else:
                events.append(time.perf_counter())

        with torch.inference_mode():
            maps, scores, roi = scorer.run([frame], mark)
            raw = float(scores[0])  # the one wait for the device
            mark()
            amap = maps[0] / self.reference
            small_map: np.ndarray | torch.Tensor = amap if self._cuda else amap.cpu().numpy()
        total = (time.perf_counter() - started) * 1000.0
        if self._cuda:
            events[-1].synchronize()  # done already: the score was read after the last kernel
            steps = [a.elapsed_time(b) for a, b in itertools.pairwise(events)]
            # Host work before the first event (cropping on the CPU side, the copy's setup) belongs to preprocess.
            steps[0] += max(0.0, total - sum(steps))
        else:
            steps = [(b - a) * 1000.0 for a, b in itertools.pairwise(events)]
        timings = dict(zip(STAGES, steps, strict=True))
        timings["total"] = total
        return Inspection(raw / self.reference, raw, small_map, roi, timings)

    def check_features(self, frame: np.ndarray) -> None:
        """Refuse a bundle whose manifest and bank do not match what its extractor gives.

        A manifest re-bound to another feature width would otherwise fail every
        part deep in the search with a reshape error.
        """
        with torch.inference_mode():
            batch, _ = self.scorer.preprocess(frame)
            features = self.extractor.extract(batch)
        got = (int(features.shape[1]), int(features.shape[2]), int(features.shape[3]))
        spec = self.bundle.spec
        want = (spec.extractor_dim, *spec.feature_grid)
        if got != want:
            raise BundleError(
                f"{self.bundle.path}: the extractor gives {got[0]} features on a {got[1]}x{got[2]} grid, "
                f"the manifest and memory bank say {want[0]} on {want[1]}x{want[2]}; refit the bundle"
            )

    def warm_up(self, runs: int = 2) -> None:
        """Run dummy frames so the first real part does not pay for lazy initialisation."""
        h, w = self.bundle.input_size
        frame = (
            np.zeros((h, w, 3), dtype=np.uint8)
            if self.roi is None
            else np.zeros((self.roi[1] + self.roi[3], self.roi[0] + self.roi[2], 3), dtype=np.uint8)
        )
        self.check_features(frame)
        for _ in range(runs):
            self.inspect(frame)

    def close(self) -> None:
        self.extractor.close()
        self.searcher.close()
