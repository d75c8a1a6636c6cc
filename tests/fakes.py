"""Stand-ins for the fast layer: an inspector, a camera and an opener that run no network and touch no device.

They implement the same interfaces the daemon's parts use (``Inspector.inspect``,
``Camera``), so a specification exercises the real judge, handshake, dispatcher,
recipe book, supervisor, recorder and archive around them, in milliseconds.
A frame's content names the score the fake model gives it, so a test can tell
which frame an answer was computed from (attribution, not counts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from anomalyd.daemon.recipes import RecipeSpec
from anomalyd.drivers.camera.base import CameraDisconnected, CameraTimeout, Frame
from anomalyd.model.inspector import Inspection

SHAPE = (24, 32, 3)


def frame_for(score: float, frame_id: int) -> Frame:
    """A frame whose first pixels carry ``score`` (as float32 bytes) and ``frame_id``."""
    image = np.zeros(SHAPE, np.uint8)
    image.reshape(-1)[:4] = np.frombuffer(np.float32(score).tobytes(), np.uint8)
    image.reshape(-1)[4:8] = np.frombuffer(np.uint32(frame_id).tobytes(), np.uint8)
    return Frame(image, frame_id, time.time_ns())


def score_of(image: np.ndarray) -> float:
    return float(np.frombuffer(image.reshape(-1)[:4].tobytes(), np.float32)[0])


@dataclass
class FakeBundle:
    bundle_id: str
    path: Path
    suggested_threshold: float = 1.0
    input_size: tuple[int, int] = (SHAPE[0], SHAPE[1])
    spec: Any = field(default_factory=lambda: SimpleNamespace(calibration=SimpleNamespace(holdout_normalised=None)))


class FakeInspector:
    """The model's place in the pipeline: the score a frame carries, a flat map, fixed timings."""

    def __init__(self, bundle: FakeBundle) -> None:
        self.bundle = bundle
        self.engine_name = "fake+fake"
        self.closed = False
        self.frames_seen = 0

    def inspect(self, image: np.ndarray) -> Inspection:
        self.frames_seen += 1
        score = score_of(image)
        h, w = image.shape[:2]
        amap = np.full((h, w), score, np.float32)
        return Inspection(score, score, amap, (0, 0, w, h), {"preprocess": 1.0, "extract": 2.0, "search": 1.0})

    def close(self) -> None:
        self.closed = True


class FakeOpener:
    """RecipeBook's opener: one FakeInspector per load, named after the bundle folder; may be told to fail."""

    def __init__(self) -> None:
        self.opened: list[FakeInspector] = []
        self.refuse: dict[str, str] = {}  # bundle folder name → error
        self.delay_s = 0.0

    def __call__(self, spec: RecipeSpec) -> FakeInspector:
        if self.delay_s:
            time.sleep(self.delay_s)
        if spec.bundle.name in self.refuse:
            raise ValueError(self.refuse[spec.bundle.name])
        inspector = FakeInspector(FakeBundle(spec.bundle.name, spec.bundle))
        self.opened.append(inspector)
        return inspector


class ScriptedCamera:
    """A Camera whose grabs follow a script: a score (a frame carrying it), 'timeout', or 'lost'."""

    name = "scripted"

    def __init__(self, script: list[float | str], open_fails: int = 0) -> None:
        self.script = list(script)
        self.open_fails = open_fails  # the first N opens fail as a pulled cable would
        self.opens = 0
        self.frame_id = 0
        self.is_open = False

    def open(self) -> None:
        self.opens += 1
        if self.opens <= self.open_fails:
            raise CameraDisconnected("no device (cable pulled)")
        self.is_open = True

    def software_trigger(self) -> None:
        pass

    def grab(self, timeout_s: float) -> Frame:
        step = self.script.pop(0) if self.script else "timeout"
        if step == "timeout":
            raise CameraTimeout(f"no frame within {timeout_s} s")
        if step == "lost":
            raise CameraDisconnected("device lost")
        self.frame_id += 1
        return frame_for(float(step), self.frame_id)

    def close(self) -> None:
        self.is_open = False
