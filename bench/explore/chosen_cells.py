"""Exploration (issue 23): are the cells chosen for an image label on the defect?

With image labels (no masks) the head learns from a few cells of each defective frame,
chosen by distance and re-chosen by heads (``learning_cells``). BSData has masks, so the
choice can be checked: per fold of ``bench/supervised_cv.py`` (the same views, seeds and
caches; run that first), the share of chosen cells on the pit (its mask's cells and the
ring around them), the frames with at least one, and where the pit's best cell ranks
among the frame's unsure cells by distance and by the last re-choosing heads, for pits
of at least and under 300 px. Nothing here is used by the daemon.

    python bench/explore/chosen_cells.py --folds 0,1,2,3,4 [--labels 20] [--cross-fit 0] [--no-bags]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from bsd_frames import test_frames  # bench/explore (the script's folder is on sys.path)

from anomalyd.training.fit import FitSettings, split_holdout
from anomalyd.training.head_training import HeadSettings, learning_cells, near_defect


def first_hit_rank(scores: np.ndarray, allowed: np.ndarray, on_pit: np.ndarray) -> np.ndarray:
    """Per frame, the rank (1 = highest) of its best-ranked cell on the pit among the allowed cells."""
    ranked = np.argsort(-np.where(allowed, scores, -np.inf), axis=1)
    hits = np.take_along_axis(on_pit & allowed, ranked, axis=1)
    return np.where(hits.any(1), hits.argmax(1) + 1, hits.shape[1] + 1)


def report(title: str, frames: dict[str, np.ndarray], unsure_cells: int) -> None:
    """One line per pit size: the chosen cells' precision, frames hit, and the pit's best cell's rank."""
    small = frames["small"]
    print(f"{title} ({small.sum()} pits < 300 px)")
    for name, sel in (("pits >= 300 px", ~small), ("pits < 300 px", small)):
        if sel.any():
            print(
                f"  {name}: chosen cells on the pit {frames['precision'][sel].mean():.2f}, "
                f"frames with one {frames['hit'][sel].mean():.2f}, "
                f"pit among the unsure cells {(frames['distance'][sel] <= unsure_cells).mean():.2f}, "
                f"its median rank by distance {np.median(frames['distance'][sel]):.0f}, "
                f"by the re-choosing heads {np.median(frames['head'][sel]):.0f}",
                flush=True,
            )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--input-size", default="448x1088")
    p.add_argument("--coreset", type=float, default=0.001)
    p.add_argument("--pca", type=int, default=16)
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--labels", default="all", help="labelled defective images a fold (as --curve N:image)")
    p.add_argument("--cross-fit", type=int, default=HeadSettings().cross_fit)
    p.add_argument("--bags", action=argparse.BooleanOptionalAction, default=None, help="default: as fit decides")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(2)
    h, w = (int(v) for v in args.input_size.split("x"))
    settings = FitSettings(input_size=(h, w), coreset_ratio=args.coreset)
    tag = f"efficientnet_lite0_{'+'.join(settings.taps)}_{h}x{w}"
    cache = Path("var/explore")
    data = args.data
    good_files = sorted((data / "train" / "good").glob("*.jpg"))
    bsd = test_frames(data)
    labels, views, area = bsd.labels, bsd.views, bsd.area
    fte, ftr = np.load(cache / f"{tag}_test.npy"), np.load(cache / f"{tag}_train.npy")
    n, c, gh, gw = fte.shape
    te_cells = fte.transpose(0, 2, 3, 1).reshape(n, gh * gw, c).astype(np.float32)
    index = {f: i for i, f in enumerate(good_files)}
    _bank, holdout = split_holdout(good_files, 0.2, settings.seed)
    hg = ftr[[index[f] for f in holdout[: len(holdout) // 2]]]
    hg_cells = hg.transpose(0, 2, 3, 1).reshape(len(hg), gh * gw, c).astype(np.float32)
    with np.load(cache / f"{tag}_dist_{args.coreset:g}_pca{args.pca}.npz", allow_pickle=False) as z:
        te_dist, hg_dist = z["te"], z["hg"]
    with np.load(cache / f"{tag}_dist_{args.coreset:g}.npz", allow_pickle=False) as z:
        te_full, hg_full = z["te"], z["hg"]  # image labels' unsure cells are ranked in all features, as fit does
    pits = bsd.pit_cells((gh, gw))
    order = sorted(set(views))
    np.random.default_rng(0).shuffle(order)  # the folds of bench/supervised_cv.py
    every: dict[str, list[np.ndarray]] = {}
    for k in (int(v) for v in args.folds.split(",")):
        held = np.isin(views, order[k::5])
        train_idx = np.flatnonzero(~held & labels)
        if args.labels != "all":
            train_idx = np.random.default_rng(k).choice(train_idx, min(int(args.labels), len(train_idx)), False)
        neg_idx = np.flatnonzero(~held & ~labels)
        cells = np.concatenate([te_cells[train_idx], te_cells[neg_idx], hg_cells])
        dist = np.concatenate([te_dist[train_idx], te_dist[neg_idx], hg_dist])
        full = np.concatenate([te_full[train_idx], te_full[neg_idx], hg_full])
        defective = np.r_[np.ones(len(train_idx), bool), np.zeros(len(neg_idx) + len(hg_cells), bool)]
        hs = replace(HeadSettings(), cross_fit=args.cross_fit)
        if args.bags is not None:
            hs = replace(hs, bags=args.bags, bags_min_images=1)
        seed = k + 100 * args.seed  # as bench/supervised_cv.py seeds the fold's head
        chosen = learning_cells(cells, dist, None, defective, hs, (gh, gw), seed, unsure_dist=full)
        rows_ = chosen.unmasked  # the labelled frames, first in ``cells``
        on_pit = near_defect(pits[train_idx], (gh, gw), hs.ring)
        pos, unsure = chosen.positive[rows_], chosen.unsure[rows_]
        small = area[train_idx] < 300
        precision = (pos & on_pit).sum(1) / np.maximum(pos.sum(1), 1)
        hit = (pos & on_pit).any(1)
        by_distance = first_hit_rank(full[rows_], unsure, on_pit)
        by_head = (
            by_distance if chosen.rechoice_scores is None else first_hit_rank(chosen.rechoice_scores, unsure, on_pit)
        )
        frames = {"precision": precision, "hit": hit, "distance": by_distance, "head": by_head, "small": small}
        report(f"fold {k}: {len(rows_)} frames", frames, hs.unsure_cells)
        for key, v in frames.items():
            every.setdefault(key, []).append(v)
    report("all folds", {key: np.concatenate(v) for key, v in every.items()}, hs.unsure_cells)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
