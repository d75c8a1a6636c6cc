"""A camera that replays image files: for the demo, the tests and commissioning.

A first-class backend of the Camera interface: software trigger or a frame rate,
sequential or shuffled order, an optional sensor size, and fault injection
(timeouts, dropped frames, wrong-size frames, grabs that hang, a lamp change) for reliability drills.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from anomalyd.drivers.camera.base import (
    BadFrame,
    CameraError,
    CameraSettings,
    CameraTimeout,
    Frame,
    check_roi,
    register_camera,
)
from anomalyd.model.images import IMAGE_SUFFIXES, list_images, read_rgb
from anomalyd.settings import ConfigPath, Roi, Section, setting


class CameraFaults(Section):
    timeout_every: int = setting(
        0, "Timeout every N", "Simulate a grab timeout every N frames (0: never).", ge=0, le=1_000_000_000
    )
    drop_every: int = setting(
        0, "Drop every N", "Silently skip a frame every N frames (0: never).", ge=0, le=1_000_000_000
    )
    wrong_size_every: int = setting(
        0, "Wrong size every N", "Deliver a half-size frame every N (0: never).", ge=0, le=1_000_000_000
    )
    hang_every: int = setting(
        0, "Hang every N", "Every N frames the driver hangs for hang_ms, ignoring the timeout (0: never).", ge=0
    )
    lamp_after: int = setting(
        0,
        "Lamp change after N",
        "After N frames every frame is scaled by lamp_gain (0: never).",
        ge=0,
        le=1_000_000_000,
    )
    lamp_gain: float = setting(
        1.5, "Lamp gain", "Brightness factor after lamp_after (a new, brighter lamp).", gt=0, le=4
    )
    hang_ms: float = setting(300.0, "Hang", "How long a hanging grab blocks before it delivers.", "ms", ge=0, le=60000)


class SimulatedCameraConfig(CameraSettings):
    type: Literal["simulated"] = "simulated"
    source: ConfigPath = setting(
        Path("sample"), "Image source", "Folder of images or an MVTec-layout data set (test/* is replayed)."
    )
    order: Literal["sequential", "shuffle"] = setting("sequential", "Order", "Replay order of the images.")
    seed: int = setting(0, "Shuffle seed", "Seed of the shuffled order.", ge=0, le=2**32 - 1)
    fps: float = setting(0.0, "Frame rate", "Frames per second in free run (0: as fast as asked).", "Hz", ge=0, le=1000)
    sensor_size: tuple[int, int] | None = setting(
        None, "Sensor size", "Resize every image to [width, height] as a real sensor would deliver.", "px"
    )
    faults: CameraFaults = setting(CameraFaults(), "Fault injection", "Simulated faults for drills and tests.")
    roi: Roi | None = setting(None, "Region of interest", "Crop applied before the model.")


_CACHE_LIMIT = 512  # decoded frames kept in memory; larger sets are read per grab


def replay_files(source: Path) -> list[Path]:
    """Images to replay: an MVTec-layout set's test/*, else the folder's images, else its subfolders'."""
    if not source.is_dir():
        raise CameraError(f"simulated camera source {source} is not a folder")
    root = source / "test" if (source / "test").is_dir() else source
    files = list_images(root)
    if not files:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            files += list_images(sub)
    if not files:
        raise CameraError(f"simulated camera source {source} has no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


@register_camera(SimulatedCameraConfig)
class SimulatedCamera:
    def __init__(self, config: SimulatedCameraConfig) -> None:
        self.config = config
        self.name = f"simulated:{config.source}"
        self.files: list[Path] = []
        self._cache: dict[Path, np.ndarray] = {}
        self._position = 0
        self._grabs = 0
        self._frame_id = 0
        self._triggered = threading.Event()
        self._next_due = 0.0
        self._open = False

    def open(self) -> None:
        files = replay_files(self.config.source)
        if self.config.order == "shuffle":
            random.Random(self.config.seed).shuffle(files)
        # A file no decoder recognises is a set-up fault: name it now, not mid-shift.
        unreadable = [f for f in files if not cv2.haveImageReader(str(f))]
        if unreadable:
            raise CameraError(
                f"simulated camera source: {unreadable[0]} is not a readable image"
                + (f" (and {len(unreadable) - 1} more)" if len(unreadable) > 1 else "")
            )
        self.files = files
        try:
            first = self._load(files[0])
        except ValueError as exc:
            raise CameraError(f"simulated camera source: {exc}") from None
        check_roi(self.config.roi, first.shape[1], first.shape[0])
        self._position = 0
        self._next_due = time.monotonic()
        self._open = True

    def _load(self, path: Path) -> np.ndarray:
        image = self._cache.get(path)
        if image is None:
            image = read_rgb(path)  # ValueError for a file that is unreadable after all
            if self.config.sensor_size:
                w, h = self.config.sensor_size
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            if len(self._cache) < _CACHE_LIMIT:
                self._cache[path] = image
        return image

    def software_trigger(self) -> None:
        self._triggered.set()

    def _every(self, n: int) -> bool:
        return n > 0 and self._grabs % n == 0

    def grab(self, timeout_s: float) -> Frame:
        if not self._open:
            raise CameraError(f"{self.name} is not open")
        self._grabs += 1
        faults = self.config.faults
        if self._every(faults.timeout_every):
            self._triggered.clear()
            time.sleep(timeout_s)
            raise CameraTimeout(f"{self.name}: simulated timeout (every {faults.timeout_every} frames)")
        self._wait_for_exposure(timeout_s)
        if self._every(faults.hang_every):
            time.sleep(faults.hang_ms / 1000.0)  # a producer that blocks past its timeout (seen in the field)
        if self._every(faults.drop_every):
            self._position += 1  # the frame that would have come is lost
        path = self.files[self._position % len(self.files)]
        self._position += 1
        self._frame_id += 1
        try:
            image = self._load(path)
        except ValueError as exc:
            raise BadFrame(f"{self.name}: frame {self._frame_id}: {exc}") from None
        if self._every(faults.wrong_size_every):
            image = cv2.resize(image, (image.shape[1] // 2, image.shape[0] // 2))
        if faults.lamp_after and self._grabs > faults.lamp_after:  # a new lamp: every frame brighter
            image = cv2.convertScaleAbs(image, alpha=faults.lamp_gain)
        return Frame(image, self._frame_id, time.time_ns(), str(path))

    def _wait_for_exposure(self, timeout_s: float) -> None:
        """Software trigger: the frame comes once triggered. Otherwise at the configured rate."""
        if self._triggered.is_set():
            self._triggered.clear()
            return
        if self.config.fps > 0:
            now = time.monotonic()
            wait = self._next_due - now
            if wait > timeout_s:
                time.sleep(timeout_s)
                raise CameraTimeout(f"{self.name}: no frame within {timeout_s * 1000:.0f} ms")
            if wait > 0:
                time.sleep(wait)
            self._next_due = max(self._next_due, now) + 1.0 / self.config.fps

    def close(self) -> None:
        self._open = False
        self._cache.clear()
