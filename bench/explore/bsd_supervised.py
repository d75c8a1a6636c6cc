"""Exploration (issue 14): would labelled pits unblock BSData? A cell classifier, cross-validated by camera view.

    python bench/explore/bsd_supervised.py

The product learns from good parts only. This asks what labelled examples would
add: a logistic regression on the same patch features (plus the product's
nearest-neighbour distance) is trained on the pit cells (from the masks) and the
other cells of the test frames of 12 of BSData's 15 camera views, and scores the
frames of the other 3 views (5 folds, so no surface is seen in training and
scoring). Image score: the highest cell. It prints image AUROC and escapes at
2 % false rejects (the oracle of `oracle.py`) beside the product's score on the
same features. Nothing here is used by the daemon.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import torch
from bsd_scores import cached_features  # bench/explore/bsd_scores.py (the script's folder is on sys.path)
from oracle import escape_at_fr, threshold_at_fr
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from anomalyd.evaluation.metrics import auroc
from anomalyd.model.coreset import greedy_coreset
from anomalyd.model.nearest import nearest_distances
from anomalyd.training.fit import FitSettings


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--negatives", type=int, default=40000, help="non-pit cells sampled per fold")
    args = p.parse_args()
    torch.set_num_threads(2)
    data = args.data
    rows = {r["path"]: r for r in csv.DictReader((data / "split.csv").open())}
    train = sorted((data / "train" / "good").glob("*.jpg"))
    test = sorted((data / "test").rglob("*.jpg"))
    settings = FitSettings(backbone="efficientnet_lite0", taps=("stage3", "stage5"), input_size=(224, 544))
    cache = Path("var/explore")
    tag = "efficientnet_lite0_stage3+stage5_224x544"
    ftr = cached_features(settings, train, cache / f"{tag}_train.npy").numpy()
    fte = cached_features(settings, test, cache / f"{tag}_test.npy").numpy()
    c, gh, gw = fte.shape[1:]
    flat = ftr.transpose(0, 2, 3, 1).reshape(-1, c)
    bank = torch.from_numpy(np.ascontiguousarray(flat[greedy_coreset(flat, round(len(flat) * 0.01), 64, 0)]))
    cells = fte.transpose(0, 2, 3, 1).reshape(len(test), gh * gw, c)
    dist = nearest_distances(torch.from_numpy(cells.reshape(-1, c)), bank).numpy().reshape(len(test), gh * gw)

    def rel(f: Path) -> str:
        return str(f.relative_to(data))

    labels = np.array([t.parent.name != "good" for t in test])
    small = labels & np.array([float(rows[rel(t)]["mask_pixels"] or 0) < 300 for t in test])
    views = np.array([rows[rel(t)]["position_angle"] for t in test])
    on_pit = np.zeros((len(test), gh * gw), bool)
    for i in np.flatnonzero(labels):
        mask = Image.open(data / "ground_truth" / "pitting" / f"{test[i].stem}_mask.png").convert("L")
        on_pit[i] = (np.asarray(mask.resize((gw, gh), Image.Resampling.BOX)) > 0).ravel()
    x = np.concatenate([cells, dist[..., None]], -1)
    rng = np.random.default_rng(0)
    order = sorted(set(views))
    rng.shuffle(order)
    supervised = np.zeros(len(test))
    for k in range(5):
        held = np.isin(views, order[k::5])
        pit_cells = x[~held & labels][on_pit[~held & labels]]
        others = x[~held][~on_pit[~held]]
        others = others[rng.choice(len(others), min(len(others), args.negatives), replace=False)]
        xt = np.concatenate([pit_cells, others])
        yt = np.r_[np.ones(len(pit_cells)), np.zeros(len(others))]
        scale = StandardScaler().fit(xt)
        clf = LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000).fit(scale.transform(xt), yt)
        for i in np.flatnonzero(held):
            supervised[i] = clf.decision_function(scale.transform(x[i])).max()
    for name, s in (("good parts only (nearest distance, max)", dist.max(1)), ("with labelled pits", supervised)):
        threshold = threshold_at_fr(s[~labels])
        print(
            f"{name}: AUROC {auroc(labels, s):.3f}, escapes@2%FR {escape_at_fr(labels, s):.1%}, "
            f"pits < 300 px let through {np.mean(s[small] < threshold):.0%}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
