"""GenICam pixel formats → HxWx3 uint8 RGB, with OpenCV where it has the conversion."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np


def _mono8(data: np.ndarray, w: int, h: int) -> np.ndarray:
    return cv2.cvtColor(data[: w * h].reshape(h, w), cv2.COLOR_GRAY2RGB)


def _mono_unpacked(bits: int) -> Callable[[np.ndarray, int, int], np.ndarray]:
    def convert(data: np.ndarray, w: int, h: int) -> np.ndarray:
        pixels = data.view(np.uint8)[: w * h * 2].view("<u2").reshape(h, w)
        return cv2.cvtColor((pixels >> (bits - 8)).astype(np.uint8), cv2.COLOR_GRAY2RGB)

    return convert


def _mono12p(data: np.ndarray, w: int, h: int) -> np.ndarray:
    """GenICam Mono12p: 2 pixels in 3 bytes, LSB first."""
    b = data.view(np.uint8)[: w * h * 3 // 2].reshape(-1, 3).astype(np.uint16)
    p0 = b[:, 0] | ((b[:, 1] & 0x0F) << 8)
    p1 = (b[:, 1] >> 4) | (b[:, 2] << 4)
    pixels = np.stack([p0, p1], axis=1).reshape(h, w)
    return cv2.cvtColor((pixels >> 4).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def _mono12packed(data: np.ndarray, w: int, h: int) -> np.ndarray:
    """GigE Vision Mono12Packed: byte0 = p0[11:4], byte1 = p1[3:0]p0[3:0], byte2 = p1[11:4]."""
    b = data.view(np.uint8)[: w * h * 3 // 2].reshape(-1, 3)
    pixels = np.stack([b[:, 0], b[:, 2]], axis=1).reshape(h, w)  # the 8 most significant bits
    return cv2.cvtColor(np.ascontiguousarray(pixels), cv2.COLOR_GRAY2RGB)


def _mono10p(data: np.ndarray, w: int, h: int) -> np.ndarray:
    """GenICam Mono10p: 4 pixels in 5 bytes, LSB first."""
    b = data.view(np.uint8)[: w * h * 5 // 4].reshape(-1, 5).astype(np.uint64)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24) | (b[:, 4] << 32)
    pixels = np.stack([(word >> (10 * i)) & 0x3FF for i in range(4)], axis=1).reshape(h, w)
    return cv2.cvtColor((pixels >> 2).astype(np.uint8), cv2.COLOR_GRAY2RGB)


def _bayer(code: int) -> Callable[[np.ndarray, int, int], np.ndarray]:
    def convert(data: np.ndarray, w: int, h: int) -> np.ndarray:
        return cv2.cvtColor(data.view(np.uint8)[: w * h].reshape(h, w), code)

    return convert


def _packed(channels: int, code: int | None) -> Callable[[np.ndarray, int, int], np.ndarray]:
    def convert(data: np.ndarray, w: int, h: int) -> np.ndarray:
        image = data.view(np.uint8)[: w * h * channels].reshape(h, w, channels)
        return cv2.cvtColor(image, code) if code is not None else image.copy()

    return convert


# GenICam names the colour of the top-left pixel (BayerRG = R G / G B); OpenCV's
# RGGB-style aliases use the same convention.
CONVERTERS: dict[str, Callable[[np.ndarray, int, int], np.ndarray]] = {
    "Mono8": _mono8,
    "Mono10": _mono_unpacked(10),
    "Mono12": _mono_unpacked(12),
    "Mono16": _mono_unpacked(16),
    "Mono10p": _mono10p,
    "Mono12p": _mono12p,
    "Mono12Packed": _mono12packed,
    "BayerRG8": _bayer(cv2.COLOR_BayerRGGB2RGB),
    "BayerGB8": _bayer(cv2.COLOR_BayerGBRG2RGB),
    "BayerGR8": _bayer(cv2.COLOR_BayerGRBG2RGB),
    "BayerBG8": _bayer(cv2.COLOR_BayerBGGR2RGB),
    "RGB8": _packed(3, None),
    "BGR8": _packed(3, cv2.COLOR_BGR2RGB),
    "RGBa8": _packed(4, cv2.COLOR_RGBA2RGB),
    "BGRa8": _packed(4, cv2.COLOR_BGRA2RGB),
}


class UnsupportedPixelFormat(ValueError):
    pass


def to_rgb(data: np.ndarray, width: int, height: int, pixel_format: str) -> np.ndarray:
    """Raw buffer → HxWx3 uint8 RGB (a copy, so the driver can re-queue the buffer at once)."""
    try:
        convert = CONVERTERS[pixel_format]
    except KeyError:
        raise UnsupportedPixelFormat(
            f"pixel format {pixel_format!r} is not supported; use one of {', '.join(CONVERTERS)}"
        ) from None
    return np.ascontiguousarray(convert(np.asarray(data), width, height))
