"""Exploration (issue 14): one model per camera view (position/angle in split.csv), each with its own threshold.

    python bench/explore/bsd_per_view.py   (needs the cached features of bsd_scores.py at 224x544)

A line that inspects several places of a part runs one recipe per place; each
recipe has its own bundle and threshold. This script simulates that on BSData:
per view, a memory of that view's training patches (a random 8,000), the view's
good-score scale from two folds of its training images (each scored against a
memory of the other fold), and test scores divided by that scale. Prints image
AUROC and escapes at 2 % false rejects over all views, against the pooled
global model. Nothing here is used by the daemon.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from oracle import escape_at_fr  # bench/explore/oracle.py (the script's folder is on sys.path)

from anomalyd.evaluation.metrics import auroc
from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.nearest import nearest_distances

DATA = Path("../shared/data/bsd_pitting")
TAG = "efficientnet_lite0_stage3+stage5_224x544"
BANK = 8000


def main() -> int:
    torch.set_num_threads(2)
    gen = torch.Generator().manual_seed(0)
    rows = {Path(r["path"]).name: r["position_angle"] for r in csv.DictReader((DATA / "split.csv").open())}
    train = sorted((DATA / "train" / "good").glob("*.jpg"))
    test = sorted((DATA / "test").rglob("*.jpg"))
    labels = np.array([t.parent.name != "good" for t in test])
    ftr = torch.from_numpy(np.load(f"var/explore/{TAG}_train.npy").astype(np.float32))
    fte = torch.from_numpy(np.load(f"var/explore/{TAG}_test.npy").astype(np.float32))
    _, c, gh, gw = ftr.shape
    mapper = AnomalyMapper((gh, gw), (224, 544), 4.0)

    def patches(feats: torch.Tensor) -> torch.Tensor:
        flat = feats.permute(0, 2, 3, 1).reshape(-1, c)
        return flat[torch.randperm(flat.shape[0], generator=gen)[:BANK]]

    def score(feats: torch.Tensor, bank: torch.Tensor) -> np.ndarray:
        d = nearest_distances(feats.permute(0, 2, 3, 1).reshape(-1, c), bank).reshape(len(feats), -1)
        return mapper(d).amax(dim=(1, 2)).numpy()

    raw = np.zeros(len(test))
    by_max = np.zeros(len(test))
    by_spread = np.zeros(len(test))
    for view in sorted({rows[t.name] for t in test}):
        tr = [i for i, t in enumerate(train) if rows[t.name] == view]
        te = [i for i, t in enumerate(test) if rows[t.name] == view]
        folds = [tr[0::2], tr[1::2]]
        good = np.concatenate([score(ftr[folds[f]], patches(ftr[folds[1 - f]])) for f in (0, 1)])
        s = score(fte[te], patches(ftr[tr]))
        raw[te] = s
        by_max[te] = s / good.max()
        median = np.median(good)
        spread = 1.4826 * np.median(np.abs(good - median)) + 1e-6
        by_spread[te] = (s - median) / spread
        print(f"{view}: {len(tr)} train, {len(te)} test, good {median:.1f} ± {spread:.2f} (max {good.max():.1f})")
    for name, s in (("per view, raw", raw), ("per view / view max", by_max), ("per view, robust z", by_spread)):
        print(f"{name:24s} AUROC {auroc(labels, s):.3f}  escapes@2%FR {escape_at_fr(labels, s):.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
