"""The Camera interface, the Frame it delivers, its errors and the backend registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from anomalyd.errors import AnomalydError
from anomalyd.registry import Registry
from anomalyd.settings import BackendSettings, Roi


class CameraError(AnomalydError):
    """The camera cannot be used as configured (no device, bad node value, unsupported format)."""


class CameraTimeout(CameraError):
    """No frame arrived within the timeout."""


class BadFrame(CameraError):
    """This frame cannot be used (unreadable, wrong format); the camera itself is fine."""


class CameraDisconnected(CameraError):
    """The device was lost; the caller closes and reopens it."""


@dataclass(frozen=True)
class Frame:
    """One image from the camera, always HxWx3 uint8 RGB."""

    image: np.ndarray
    frame_id: int
    timestamp_ns: int
    source: str | None = None  # the file a simulated frame came from


class Camera(Protocol):
    name: str

    def open(self) -> None: ...

    def grab(self, timeout_s: float) -> Frame: ...

    def software_trigger(self) -> None: ...

    def close(self) -> None: ...


class CameraSettings(BackendSettings):
    """What every camera's settings have: the ``type`` that names it and the crop before the model."""

    roi: Roi | None = None


# A camera is one module of this package: its settings (a CameraSettings) and its class, built as cls(settings).
CAMERAS: Registry[Any] = Registry("camera", "anomalyd.drivers.camera")
register_camera = CAMERAS.register


def check_roi(roi: Any, width: int, height: int) -> None:
    """The ROI must lie inside the sensor; say so at open, not on the first frame."""
    if roi is None:
        return
    if roi.x + roi.width > width or roi.y + roi.height > height:
        raise CameraError(
            f"roi x={roi.x} y={roi.y} width={roi.width} height={roi.height} does not fit the "
            f"{width}x{height} sensor (x + width ≤ {width}, y + height ≤ {height})"
        )


def open_camera(config: Any) -> Camera:
    """The registered backend for ``config.type``, not yet opened."""
    return CAMERAS[config.type](config)  # type: ignore[no-any-return]
