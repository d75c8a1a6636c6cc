"""Exploration (issue 14): the best case for BSData's small pits, each frame against its own surface.

    python bench/explore/bsd_same_surface.py --input-size 448x1088 --taps stage2,stage3 --radius 1,2

BSData is 15 fixed camera views of one ball screw, photographed over weeks. This
compares every patch of a test frame only with the training frames *of the same
view* (`split.csv`), at the same place ±r cells, at near-native resolution with
shallow taps (4 input pixels per cell at stride 4): the most a position-aware,
per-view memory can see. It prints image AUROC and the escapes at 2 % false
rejects (the oracle of `oracle.py`), and, for the pits under 300 pixels, in how
many frames the map's hottest spot is on the pit at all.
Nothing here is used by the daemon; features are cached under var/explore/.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bsd_scores import cached_features  # bench/explore/bsd_scores.py (the script's folder is on sys.path)
from oracle import escape_at_fr
from PIL import Image

from anomalyd.evaluation.metrics import auroc
from anomalyd.training.fit import FitSettings


def local_min(q: torch.Tensor, refs: torch.Tensor, r: int) -> torch.Tensor:
    """[h, w]: distance of each cell of q [C,h,w] to the nearest ref [J,C,h,w] cell within ±r cells."""
    h, w = q.shape[-2:]
    best = torch.full((h, w), float("inf"))
    pad = F.pad(refs, (r, r, r, r), mode="replicate")
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            d = ((pad[:, :, dy : dy + h, dx : dx + w] - q[None]) ** 2).sum(1).amin(0)
            best = torch.minimum(best, d)
    return best.sqrt()


def blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    k = int(4 * sigma) | 1
    g = torch.exp(-((torch.arange(k) - k // 2) ** 2) / (2 * sigma * sigma))
    g = g / g.sum()
    padded = F.pad(maps[:, None], (k // 2,) * 4, mode="replicate")
    return F.conv2d(padded, g[None, None, :, None] * g[None, None, None, :])[:, 0]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--input-size", default="448x1088")
    p.add_argument("--taps", default="stage2,stage3")
    p.add_argument("--radius", default="1")
    args = p.parse_args()
    torch.set_num_threads(2)
    size = tuple(int(v) for v in args.input_size.split("x"))
    taps = tuple(args.taps.split(","))
    data = args.data
    rows = {r["path"]: r for r in csv.DictReader((data / "split.csv").open())}
    train = sorted((data / "train" / "good").glob("*.jpg"))
    test = sorted((data / "test").rglob("*.jpg"))

    def rel(f: Path) -> str:
        return str(f.relative_to(data))

    labels = np.array([t.parent.name != "good" for t in test])
    area = np.array([float(rows[rel(t)]["mask_pixels"] or 0) for t in test])
    view = np.array([rows[rel(t)]["position_angle"] for t in train])
    settings = FitSettings(backbone="efficientnet_lite0", taps=taps, input_size=size)  # type: ignore[arg-type]
    tag = f"efficientnet_lite0_{'+'.join(taps)}_{args.input_size}"
    ftr = cached_features(settings, train, Path("var/explore") / f"{tag}_train.npy")
    fte = cached_features(settings, test, Path("var/explore") / f"{tag}_test.npy")
    gh, gw = ftr.shape[-2:]
    small = labels & (area < 300)
    masks = {}
    for i in np.flatnonzero(small):
        png = Image.open(data / "ground_truth" / "pitting" / f"{test[i].stem}_mask.png").convert("L")
        grid = torch.from_numpy(np.asarray(png.resize((gw, gh), Image.Resampling.BILINEAR)) > 0)[None, None].float()
        masks[i] = F.max_pool2d(grid, 5, 1, 2)[0, 0].numpy() > 0  # ±2 cells of slack for the blur
    for r in (int(v) for v in args.radius.split(",")):
        maps = torch.stack(
            [
                local_min(fte[i].float(), ftr[np.flatnonzero(view == rows[rel(t)]["position_angle"])].float(), r)
                for i, t in enumerate(test)
            ]
        )
        for sigma in (1.0, 2.0):
            m = blur(maps, sigma).numpy()
            s = m.reshape(len(test), -1).max(1)
            hottest = sum(bool(m[i][masks[i]].max() >= m[i].max()) for i in masks)
            off_pit = np.median([m[i][~masks[i]].max() for i in masks])
            print(
                f"radius {r}, blur {sigma:g} cells: AUROC {auroc(labels, s):.3f}, escapes@2%FR "
                f"{escape_at_fr(labels, s):.1%}; pits < 300 px: hottest spot on the pit in {hottest} of {len(masks)}, "
                f"median hottest spot off the pit {off_pit:.1f} (good frames' hottest: {np.median(s[~labels]):.1f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
