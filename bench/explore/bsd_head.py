"""Exploration (issue 23): which supervised head, on which inputs, at which resolution, for BSData's pits?

    python bench/explore/bsd_head.py [--input-size 448x1088] [--hidden 64]

Cached Lite0 stage3+stage5 features (var/explore/). The memory bank is a coreset
of train/good; the head learns from the cells of the test frames of 12 of the 15
camera views (pit cells from the masks against every other cell, good frames'
cells included) and scores the frames of the other 3 views (5 folds by
``position_angle``: no surface in both). Prints image AUROC, escapes at 2 % false
rejects (threshold on the scored good frames, an oracle) and small-pit escapes
for: the good-parts-only distance, a logistic regression and an MLP on
[features, distance], and the MLP on features alone. Nothing here is used by the daemon.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np
import torch
from bsd_scores import cached_features  # bench/explore/bsd_scores.py (the script's folder is on sys.path)
from oracle import escape_at_fr, threshold_at_fr
from PIL import Image

from anomalyd.evaluation.metrics import auroc
from anomalyd.model.coreset import greedy_coreset
from anomalyd.model.head import cell_inputs
from anomalyd.model.nearest import nearest_distances
from anomalyd.training.fit import FitSettings
from anomalyd.training.head_training import HeadSettings, train_head


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--input-size", default="448x1088")
    p.add_argument("--coreset", type=float, default=0.005)
    p.add_argument("--hidden", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(2)
    h, w = (int(v) for v in args.input_size.split("x"))
    data = args.data
    rows = {r["path"]: r for r in csv.DictReader((data / "split.csv").open())}
    train = sorted((data / "train" / "good").glob("*.jpg"))
    test = sorted((data / "test").rglob("*.jpg"))
    settings = FitSettings(backbone="efficientnet_lite0", taps=("stage3", "stage5"), input_size=(h, w))
    tag = f"efficientnet_lite0_stage3+stage5_{h}x{w}"
    cache = Path("var/explore")
    started = time.perf_counter()
    ftr = cached_features(settings, train, cache / f"{tag}_train.npy").numpy()
    fte = cached_features(settings, test, cache / f"{tag}_test.npy").numpy()
    print(f"features {time.perf_counter() - started:.0f} s; grid {fte.shape[2:]}, C={fte.shape[1]}")
    c, gh, gw = fte.shape[1:]
    flat = ftr.transpose(0, 2, 3, 1).reshape(-1, c)
    started = time.perf_counter()
    bank = torch.from_numpy(np.ascontiguousarray(flat[greedy_coreset(flat, round(len(flat) * args.coreset), 64, 0)]))
    cells = np.ascontiguousarray(fte.transpose(0, 2, 3, 1).reshape(len(test), gh * gw, c))
    dist = np.concatenate([nearest_distances(torch.from_numpy(cells[i]), bank).numpy()[None] for i in range(len(test))])
    print(f"bank {len(bank)}; coreset + search {time.perf_counter() - started:.0f} s")

    def rel(f: Path) -> str:
        return str(f.relative_to(data))

    labels = np.array([t.parent.name != "good" for t in test])
    small = labels & np.array([float(rows[rel(t)]["mask_pixels"] or 0) < 300 for t in test])
    views = np.array([rows[rel(t)]["position_angle"] for t in test])
    on_pit = np.zeros((len(test), gh * gw), bool)
    for i in np.flatnonzero(labels):
        mask = Image.open(data / "ground_truth" / "pitting" / f"{test[i].stem}_mask.png").convert("L")
        on_pit[i] = (np.asarray(mask.resize((gw, gh), Image.Resampling.BOX)) > 0).ravel()
    rng = np.random.default_rng(0)
    order = sorted(set(views))
    rng.shuffle(order)
    variants = {
        "mlp(features+distance)": HeadSettings(hidden=args.hidden, use_distance=True),
        "mlp(features)": HeadSettings(hidden=args.hidden, use_distance=False),
        "linear(features+distance)": HeadSettings(hidden=0, use_distance=True),
    }
    scores = {name: np.zeros(len(test)) for name in variants}
    for k in range(5):
        held = np.isin(views, order[k::5])
        for name, hs in variants.items():
            started = time.perf_counter()
            head = train_head(cells[~held], dist[~held], on_pit[~held], labels[~held], hs, (gh, gw), seed=k)
            x = torch.from_numpy(cell_inputs(cells[held], dist[held], hs.use_distance))
            s = head.cell_scores(x).reshape(int(held.sum()), -1).max(1).values.numpy()
            scores[name][held] = s
            print(f"  fold {k} {name}: {time.perf_counter() - started:.1f} s")
    results = {"good parts only (distance, max)": dist.max(1), **scores}
    for name, s in results.items():
        threshold = threshold_at_fr(s[~labels])
        print(
            f"{name:34s} AUROC {auroc(labels, s):.3f}  escapes@2%FR {escape_at_fr(labels, s):.1%}  "
            f"pits<300px escape {np.mean(s[small] < threshold):.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
