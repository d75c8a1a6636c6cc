"""The Camera interface, the Frame it delivers, its errors and the backend registry."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from anomalyd.errors import AnomalydError
from anomalyd.registry import Registry


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


CAMERAS = Registry("camera")
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
    from anomalyd.drivers.camera import harvesters, simulated  # noqa: F401  (registers the backends)

    return CAMERAS[config.type](config)  # type: ignore[no-any-return]
