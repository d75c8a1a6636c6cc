"""The heatmap overlay is anchored at the threshold: quiet below it, red and outlined above."""

from __future__ import annotations

import numpy as np

from anomalyd.overlay import overlay_heatmap


def test_below_the_threshold_is_quiet_and_above_is_red_and_outlined() -> None:
    frame = np.full((300, 400, 3), 128, np.uint8)
    amap = np.zeros((300, 400), np.float32)
    amap[:, :200] = 0.9  # just under the threshold of 1.0
    amap[100:160, 280:340] = 1.6  # a defect over it
    out = overlay_heatmap(frame, amap, threshold=1.0, score=1.6, label="NG")
    quiet = out[150, 100].astype(int)
    assert np.abs(quiet - 128).max() <= 40  # a tint, not an alarm
    red = out[130, 310].astype(int)
    assert red[0] > 180 and red[1] < 90 and red[2] < 90
    # The outline: the border of the region is drawn (yellow), its inside is not.
    assert tuple(out[100, 310]) == (255, 230, 0) or tuple(out[101, 310]) == (255, 230, 0)
    # The caption and the legend are written on the image (top left, bottom right change).
    assert not np.array_equal(out[5:30, 5:200], np.broadcast_to(out[5, 5], (25, 195, 3)))
    assert (out[-40:, -100:] != 128).any()


def test_a_quiet_part_shows_no_red() -> None:
    frame = np.full((200, 200, 3), 128, np.uint8)
    out = overlay_heatmap(frame, np.full((50, 50), 0.5, np.float32), threshold=1.1)
    body = out[40:140, 40:140].astype(int)
    assert (body[..., 0] - body[..., 2] < 10).all()  # never redder than blue
