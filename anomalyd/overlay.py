"""Heatmap overlays a person can look at (score CLI, reject archive, reports)."""

from __future__ import annotations

import cv2
import numpy as np


def overlay_heatmap(frame: np.ndarray, anomaly_map: np.ndarray, vmax: float = 2.0, alpha: float = 0.45) -> np.ndarray:
    """RGB frame with the map drawn over it in JET colours; 0 → blue, ``vmax`` and above → red."""
    if anomaly_map.shape[:2] != frame.shape[:2]:
        anomaly_map = cv2.resize(anomaly_map, (frame.shape[1], frame.shape[0]), interpolation=cv2.INTER_LINEAR)
    scaled = np.clip(anomaly_map / vmax * 255.0, 0, 255).astype(np.uint8)
    colour = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return cv2.addWeighted(frame, 1.0 - alpha, colour, alpha, 0.0)


def write_rgb(path: str, image: np.ndarray) -> None:
    """Write an RGB image (PNG/JPEG by suffix)."""
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"could not write {path}")
