"""A synthetic part for the demo and the tests: a machined washer on a belt.

We generate it rather than ship photographs so that the project carries no data
licence and the tests can draw defects exactly where masks say they are. Good
parts vary in position, rotation, lighting and sensor noise; defects are
scratches, stains and chipped edges, each with its mask (MVTec AD layout).

The part sits in a nest, so one thing is always in the same place: the ink
mark the previous station prints at 3 o'clock, after the washer has settled
(the washer still turns freely, so its notches land anywhere). A missing or a
moved mark is a defect that only a position-aware memory can see: a patch of
plain metal, or of a mark, is normal *somewhere* on every part
(``fit --memory local``).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

SIZE = 256
SURFACE_DEFECTS = ("scratch", "stain", "chip")
PLACEMENT_DEFECTS = ("missing_mark", "moved_mark")
DEFECTS = SURFACE_DEFECTS + PLACEMENT_DEFECTS
MARK_RADIUS = 0.025  # of the image size
MARK_AT = (0.24, 0.0)  # offset from the centre (x, y) as a share of the image size: 3 o'clock, on the metal


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed-metal grain: noise smeared along one direction."""
    noise = rng.normal(0.0, 1.0, (size, size)).astype(np.float32)
    grain = cv2.blur(noise, (15, 1))
    return grain / (grain.std() + 1e-6)


def good_part(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """One defect-free part as HxWx3 uint8 RGB."""
    belt = 40 + 6 * _texture(rng, size)
    image = np.dstack([belt * 0.9, belt, belt * 1.1])
    cx = size / 2 + rng.uniform(-4, 4)
    cy = size / 2 + rng.uniform(-4, 4)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r = np.hypot(xx - cx, yy - cy)
    theta = np.arctan2(yy - cy, xx - cx) - angle
    outer, inner = size * 0.40, size * 0.16
    # Six notches on the rim make rotation visible, as on a real tab washer.
    rim = outer - 6.0 * (np.cos(6 * theta) > 0.92)
    metal = (r < rim) & (r > inner)
    light = rng.uniform(0.9, 1.1)
    shade = 150 + 40 * np.cos(theta + 0.6) * (r / outer) + 8 * _texture(rng, size)
    ring = np.abs(r - (outer + inner) / 2) < 2.0  # the machined groove
    shade = np.where(ring, shade - 45, shade) * light
    for c, tint in enumerate((1.0, 0.98, 0.93)):
        image[..., c] = np.where(metal, shade * tint, image[..., c])
    _mark(image, size, MARK_AT)
    image += rng.normal(0, 2.0, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _mark_centre(size: int, at: tuple[float, float]) -> tuple[int, int]:
    return round(size / 2 + at[0] * size), round(size / 2 + at[1] * size)


def _mark(image: np.ndarray, size: int, at: tuple[float, float]) -> None:
    """The printed ink mark: a dark blue dot at a fixed place in the frame (the nest's)."""
    dot = np.zeros(image.shape[:2], dtype=np.uint8)
    cv2.circle(dot, _mark_centre(size, at), max(2, int(MARK_RADIUS * size)), 255, -1)
    image[dot > 0] = (30.0, 40.0, 90.0)


def _part_mask(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) > 90


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw a defect on a good part; returns (image, mask)."""
    out = image.copy()
    mask = np.zeros(image.shape[:2], dtype=np.uint8)
    size = image.shape[0]
    c = size / 2
    on_part = _part_mask(image)
    if kind == "scratch":
        a = rng.uniform(0, 2 * np.pi)
        r0, r1 = size * rng.uniform(0.18, 0.22), size * rng.uniform(0.33, 0.38)
        p0 = (int(c + r0 * np.cos(a)), int(c + r0 * np.sin(a)))
        a2 = a + rng.uniform(-0.5, 0.5)
        p1 = (int(c + r1 * np.cos(a2)), int(c + r1 * np.sin(a2)))
        cv2.line(mask, p0, p1, 255, 3)
        mask &= on_part.astype(np.uint8) * 255
        out[mask > 0] = np.clip(out[mask > 0].astype(int) + 70, 0, 255)
    elif kind == "stain":
        a, rad = rng.uniform(0, 2 * np.pi), size * rng.uniform(0.22, 0.32)
        centre = (int(c + rad * np.cos(a)), int(c + rad * np.sin(a)))
        axes = (int(rng.uniform(6, 12)), int(rng.uniform(4, 8)))
        cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
        mask &= on_part.astype(np.uint8) * 255
        out[mask > 0] = (out[mask > 0] * np.array([0.45, 0.35, 0.25])).astype(np.uint8)
    elif kind == "chip":
        a = rng.uniform(0, 2 * np.pi)
        rad = size * 0.39
        centre = (int(c + rad * np.cos(a)), int(c + rad * np.sin(a)))
        cv2.circle(mask, centre, int(rng.uniform(15, 20)), 255, -1)
        mask &= on_part.astype(np.uint8) * 255
        out[mask > 0] = (40, 40, 44)  # belt shows through where metal broke off
    elif kind in PLACEMENT_DEFECTS:
        # Paint the mark over with the metal around it, then (moved) print it at 9 o'clock.
        r = max(2, int(MARK_RADIUS * size)) + 2
        cx, cy = _mark_centre(size, MARK_AT)
        ring = np.zeros(image.shape[:2], dtype=np.uint8)
        cv2.circle(ring, (cx, cy), r + 3, 255, -1)
        cv2.circle(ring, (cx, cy), r, 0, -1)
        metal = np.median(image[ring > 0], axis=0)
        cv2.circle(mask, (cx, cy), r, 255, -1)
        out[mask > 0] = np.clip(metal + rng.normal(0, 2.0, (int(np.count_nonzero(mask)), 3)), 0, 255)
        if kind == "moved_mark":
            moved = (-MARK_AT[0], MARK_AT[1])
            _mark(out, size, moved)
            cv2.circle(mask, _mark_centre(size, moved), r, 255, -1)
    else:
        raise ValueError(f"unknown defect {kind!r}; known: {', '.join(DEFECTS)}")
    return out, mask


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(path), image)


def write_sample(
    root: Path,
    train: int = 40,
    test_good: int = 8,
    per_defect: int = 4,
    seed: int = 0,
    kinds: tuple[str, ...] = DEFECTS,
) -> Path:
    """Write an MVTec-layout data set of the synthetic part (defects of ``kinds``); returns ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(train):
        _write(root / "train" / "good" / f"{i:03d}.png", good_part(rng))
    for i in range(test_good):
        _write(root / "test" / "good" / f"{i:03d}.png", good_part(rng))
    for kind in kinds:
        for i in range(per_defect):
            image, mask = add_defect(good_part(rng), kind, rng)
            _write(root / "test" / kind / f"{i:03d}.png", image)
            _write(root / "ground_truth" / kind / f"{i:03d}_mask.png", mask)
    return root
