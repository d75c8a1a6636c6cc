"""Heatmap overlays a person can read: the colour scale is anchored at the threshold.

Below the threshold the map is quiet (a faint blue tint that fades to nothing);
at and above it the pixels turn unmistakably red, more opaque the further above,
and the region over the threshold is outlined. A legend (0, threshold, 2×) and
the score with its verdict are written on the image. The same overlay is used
by the reject archive, ``anomalyd score --out``, the reports and the operator page.
"""

from __future__ import annotations

import cv2
import numpy as np

from anomalyd.decision import Label, fails

_RED = np.array([230, 20, 20], dtype=np.float32)
_QUIET = np.array([40, 90, 200], dtype=np.float32)
_OUTLINE = (255, 230, 0)


def overlay_heatmap(
    frame: np.ndarray,
    anomaly_map: np.ndarray,
    threshold: float,
    score: float | None = None,
    label: str | None = None,
) -> np.ndarray:
    """RGB frame with the map over it: quiet below ``threshold``, red and outlined above."""
    h, w = frame.shape[:2]
    if anomaly_map.shape[:2] != (h, w):
        anomaly_map = cv2.resize(anomaly_map, (w, h), interpolation=cv2.INTER_LINEAR)
    rel = np.nan_to_num(anomaly_map.astype(np.float32) / max(threshold, 1e-6), nan=2.0, posinf=2.0, neginf=0.0)
    out = frame.astype(np.float32)
    # Below the threshold: at most a 25 % blue tint, growing with the value (context, not alarm).
    quiet = np.clip(rel, 0.0, 1.0)[..., None] * 0.25 * (rel < 1.0)[..., None]
    # At and above: 55 % red at the threshold, 85 % at twice the threshold.
    loud = np.where(rel >= 1.0, np.clip(0.55 + 0.3 * (rel - 1.0), 0.55, 0.85), 0.0)[..., None]
    out = out * (1 - quiet - loud) + _QUIET * quiet + _RED * loud
    image = np.ascontiguousarray(np.clip(out, 0, 255).astype(np.uint8))
    over = (rel >= 1.0).astype(np.uint8)
    if over.any():
        contours, _ = cv2.findContours(over, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(image, contours, -1, _OUTLINE, max(1, round(min(h, w) / 300)))
    _legend(image, threshold)
    if score is not None:
        _caption(image, score, threshold, label)
    return image


def _legend(image: np.ndarray, threshold: float) -> None:
    """A colour bar bottom right: 0 … threshold quiet, threshold … 2× red."""
    h, w = image.shape[:2]
    bar_w, bar_h = max(60, w // 5), max(8, h // 60)
    x0, y0 = w - bar_w - 10, h - bar_h - max(18, h // 25)
    if x0 < 0 or y0 < 0:
        return
    ramp = np.linspace(0.0, 2.0, bar_w, dtype=np.float32)
    colours = np.where(
        (ramp < 1.0)[:, None], 255 * (1 - 0.25 * ramp[:, None]) + _QUIET * 0.25 * ramp[:, None], _RED
    ).astype(np.uint8)
    image[y0 : y0 + bar_h, x0 : x0 + bar_w] = colours[None, :, :]
    cv2.rectangle(image, (x0, y0), (x0 + bar_w - 1, y0 + bar_h - 1), (0, 0, 0), 1)
    scale = max(0.35, min(h, w) / 900)
    for value, xpos in ((0.0, x0), (threshold, x0 + bar_w // 2), (2 * threshold, x0 + bar_w - 1)):
        cv2.line(image, (xpos, y0 + bar_h), (xpos, y0 + bar_h + 4), (0, 0, 0), 1)
        _text(image, f"{value:.2f}", (max(0, xpos - 12), y0 + bar_h + int(16 * scale) + 4), scale)


def _caption(image: np.ndarray, score: float, threshold: float, label: str | None) -> None:
    h, w = image.shape[:2]
    scale = max(0.45, min(h, w) / 600)
    verdict = label or str(Label.NG if fails(score, threshold) else Label.OK)
    _text(image, f"{verdict} {score:.3f} (threshold {threshold:.3f})", (8, int(28 * scale) + 4), scale)


def _text(image: np.ndarray, text: str, org: tuple[int, int], scale: float) -> None:
    """White text on a dark box: readable on any part."""
    thick = max(1, round(scale * 1.5))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
    x, y = org
    x0, y0, x1, y1 = max(0, x - 3), max(0, y - th - 3), min(image.shape[1], x + tw + 3), min(image.shape[0], y + base)
    image[y0:y1, x0:x1] = (image[y0:y1, x0:x1] * 0.35).astype(image.dtype)
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), thick, cv2.LINE_AA)


def write_rgb(path: str, image: np.ndarray) -> None:
    """Write an RGB image (PNG/JPEG by suffix)."""
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """An RGB image as JPEG bytes (for the operator page)."""
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return bytes(buf)
