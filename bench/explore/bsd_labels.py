"""Exploration (issue 14): were BSData's labelled pits already there in the "good" frames before them?

    python bench/explore/bsd_labels.py [--scores var/bsd/report/scores.csv]

For each test pit, the frame is aligned (integer shift, normalised
cross-correlation, ±12 px) with the newest earlier train/good frame of the same
camera view, and the pit's darkness is measured in both: grey level of a ring
2–6 px around the mask minus the grey level inside it. A pit whose earlier
"good" frame is at least half as dark at the same place was already there
(the data's caveat 4: labels are late). With `--scores` (an `eval --report`
scores.csv) the escapes are marked. Nothing here is used by the daemon.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage


def grey(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), np.float32)


def shift_to(ref: np.ndarray, img: np.ndarray, cy: int, cx: int, r: int = 60, s: int = 12) -> tuple[int, int]:
    """Integer (dy, dx) within ±s that best matches img to ref in a window around (cy, cx)."""
    y0, y1 = max(s, cy - r), min(ref.shape[0] - s, cy + r)
    x0, x1 = max(s, cx - r), min(ref.shape[1] - s, cx + r)
    a = ref[y0:y1, x0:x1] - ref[y0:y1, x0:x1].mean()
    best, out = -2.0, (0, 0)
    for dy in range(-s, s + 1):
        for dx in range(-s, s + 1):
            b = img[y0 + dy : y1 + dy, x0 + dx : x1 + dx]
            b = b - b.mean()
            v = float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-6))
            if v > best:
                best, out = v, (dy, dx)
    return out


def darkness(img: np.ndarray, mask: np.ndarray) -> float:
    ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
    return float(img[ring].mean() - img[mask].mean())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--scores", type=Path, help="scores.csv of `anomalyd eval --report`")
    p.add_argument("--max-area", type=int, default=1000, help="only pits smaller than this (pixels)")
    args = p.parse_args()
    data = args.data
    rows = list(csv.DictReader((data / "split.csv").open()))
    outcome = {}
    if args.scores:
        outcome = {Path(r["path"]).name: r["outcome"] for r in csv.DictReader(args.scores.open())}
    counts: dict[str, list[int]] = {}
    for r in sorted(rows, key=lambda r: int(r["mask_pixels"] or 0)):
        if not r["path"].startswith("test/pitting") or int(r["mask_pixels"]) >= args.max_area:
            continue
        name = Path(r["path"]).name
        mask = np.asarray(Image.open(data / "ground_truth" / "pitting" / f"{Path(name).stem}_mask.png").convert("L"))
        mask = mask > 0
        ys, xs = np.nonzero(mask)
        pit = grey(data / r["path"])
        earlier = [
            e
            for e in rows
            if e["position_angle"] == r["position_angle"]
            and e["path"].startswith("train/good")
            and e["timestamp"] < r["timestamp"]
        ]
        newest = max(earlier, key=lambda e: e["timestamp"])
        dy, dx = shift_to(pit, grey(data / newest["path"]), int(ys.mean()), int(xs.mean()))
        before = ndimage.shift(grey(data / newest["path"]), (-dy, -dx), order=0)
        now, then = darkness(pit, mask), darkness(before, mask)
        already = now > 0 and then >= 0.5 * now
        kind = outcome.get(name, "?")
        counts.setdefault(kind, [0, 0])
        counts[kind][0] += 1
        counts[kind][1] += int(already)
        flag = "  ALREADY THERE" if already else ""
        print(
            f"{name}: {r['mask_pixels']:>4} px, {kind:7s} darker than its ring by {now:5.1f} grey levels; "
            f"in the newest earlier good frame ({newest['timestamp']}) {then:5.1f}{flag}"
        )
    for kind, (n, seen) in counts.items():
        print(f"{kind}: {n} pits under {args.max_area} px, {seen} already visible in the newest earlier good frame")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
