"""Exploration (issue 23): does anything in a single frame rank a small pit above the specks?

An image label says a frame is defective, not where. For each pitted BSData frame this ranks
its unsure cells (the 1024 farthest from the memory in all features, as ``fit`` ranks them) by
the distance itself and by each pixel cue of ``pixel_cues.py`` (how dark, bright or compact the
cell's blob is against its ring), and reports where the pit's best cell lands (its mask's cells
and the ring around them), for pits under and over 300 px. Needs the caches of
``bench/supervised_cv.py --pca 16 --coreset 0.001 --curve all:image``. Nothing here is used by
the daemon.

    python bench/explore/unsure_ranks.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bsd_frames import test_frames
from pixel_cues import CUES, pixel_cues

from anomalyd.model.images import read_rgb
from anomalyd.model.scoring import Preprocessor
from anomalyd.training.head_training import near_defect, top_cells


def per_frame_rank(scores: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Each cell's rank among its frame's allowed cells, 0 (lowest) to 1 (highest); -inf elsewhere."""
    masked = np.where(allowed, scores, -np.inf)
    return np.argsort(np.argsort(masked, 1), 1) / masked.shape[1]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--input-size", default="448x1088")
    p.add_argument("--coreset", type=float, default=0.001)
    p.add_argument("--unsure-cells", type=int, default=1024)
    args = p.parse_args()
    torch.set_num_threads(2)
    h, w = (int(v) for v in args.input_size.split("x"))
    tag = f"efficientnet_lite0_stage3+stage5_{h}x{w}"
    data = args.data
    bsd = test_frames(data)
    test, labels, area = bsd.files, bsd.labels, bsd.area
    with np.load(Path("var/explore") / f"{tag}_dist_{args.coreset:g}.npz", allow_pickle=False) as z:
        full = z["te"]
    gh, gw = h // 8, w // 8
    prepare = Preprocessor((h, w), None, torch.device("cpu"))
    with torch.inference_mode():
        cues = torch.cat([pixel_cues(prepare.batch([read_rgb(f) for f in test[i : i + 8]]), 8)
                          for i in range(0, len(test), 8)]).reshape(len(test), len(CUES), -1).numpy()  # fmt: skip
    on_pit = near_defect(bsd.pit_cells((gh, gw)), (gh, gw), 1)
    unsure = top_cells(full, np.ones(full.shape, bool), args.unsure_cells)
    scores = {"distance": full}
    for j, name in enumerate(CUES):
        scores[f"+{name}"], scores[f"-{name}"] = cues[:, j], -cues[:, j]
    dog_low = -cues[:, CUES.index("dog-low")]
    scores["distance and -dog-low"] = per_frame_rank(full, unsure) + per_frame_rank(dog_low, unsure)
    small, large = labels & (area < 300), labels & (area >= 300)
    print(f"{small.sum()} pitted frames with pits < 300 px, {large.sum()} larger; the pit's best cell among the "
          f"{args.unsure_cells} unsure cells, ranked by:")  # fmt: skip
    for name, s in scores.items():
        ranked = np.argsort(-np.where(unsure, s, -np.inf), axis=1)
        hits = np.take_along_axis(on_pit & unsure, ranked, axis=1)
        rank = np.where(hits.any(1), hits.argmax(1) + 1, args.unsure_cells + 1)
        print(f"  {name:22s} small: top 4 {np.mean(rank[small] <= 4):.2f}, top 16 {np.mean(rank[small] <= 16):.2f}, "
              f"median {np.median(rank[small]):.0f} | large: top 4 {np.mean(rank[large] <= 4):.2f}, "
              f"median {np.median(rank[large]):.0f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
