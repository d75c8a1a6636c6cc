"""Exploration (issue 14): does position-aware memory help on BSData pitting?

    python bench/explore/bsd_position.py [--input-size 224x544] [--radius 2]

Features of the default Lite0 extractor (stages 3+5) at an aspect-preserving size.
Compares image AUROC and the escape rate at the false-reject rate of 2 % for:
  (global PatchCore with the default coreset is `anomalyd eval`'s number, in the README)
  local-r      nearest among training patches within r cells of the same place
  same-view    nearest among training images taken at the same position/angle (split.csv)
Prints a table; nothing here is used by the daemon.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from oracle import escape_at_fr  # bench/explore/oracle.py (the script's folder is on sys.path)

from anomalyd.evaluation.metrics import auroc
from anomalyd.model.features import build_patch_features
from anomalyd.training.extraction import extract_features
from anomalyd.training.fit import FitSettings


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--input-size", default="224x544")
    p.add_argument("--radius", type=int, default=2)
    args = p.parse_args()
    h, w = (int(v) for v in args.input_size.split("x"))
    rows = list(csv.DictReader((args.data / "split.csv").open()))
    view = {Path(r["path"]).name: r["position_angle"] for r in rows}
    train = sorted((args.data / "train" / "good").glob("*.jpg"))
    test = sorted((args.data / "test").rglob("*.jpg"))
    labels = np.array([p.parent.name != "good" for p in test])
    settings = FitSettings(input_size=(h, w))
    model = build_patch_features(settings.backbone, settings.taps)
    torch.set_num_threads(2)
    ftr = extract_features(model, train, settings, lambda n: None)  # [N, C, gh, gw]
    fte = extract_features(model, test, settings, lambda n: None)
    n, c, gh, gw = ftr.shape
    print(f"features {gh}x{gw}, {n} train, {len(test)} test", file=sys.stderr)
    results: dict[str, np.ndarray] = {}

    def nn_min(q: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = (q * q).sum(1, keepdim=True) - 2 * q @ b.T + (b * b).sum(1)[None]
        return d.clamp_min(0).min(1).values.sqrt()

    local_scores: list[float] = []
    view_scores: list[float] = []
    r = args.radius
    # Local: for each cell, the training patches in its (2r+1)^2 neighbourhood, all images.
    pad = F.pad(ftr, (r, r, r, r), mode="replicate")  # [N, C, gh+2r, gw+2r]
    for i, q in enumerate(fte):
        qf = q.permute(1, 2, 0).reshape(-1, c)
        # local
        best = torch.full((gh, gw), float("inf"))
        for dy in range(2 * r + 1):
            for dx in range(2 * r + 1):
                shifted = pad[:, :, dy : dy + gh, dx : dx + gw]  # [N, C, gh, gw]
                d = ((shifted - q[None]) ** 2).sum(1).min(0).values  # [gh, gw]
                best = torch.minimum(best, d)
        local_scores.append(float(best.clamp_min(0).sqrt().max()))
        same = [j for j, t in enumerate(train) if view.get(t.name) == view.get(test[i].name)]
        if same:
            vb = ftr[same].permute(0, 2, 3, 1).reshape(-1, c)
            view_scores.append(float(nn_min(qf, vb).max()))
        else:
            view_scores.append(float("inf"))  # no image of this view: as unusual as it gets
    results[f"local r={r}"] = np.array(local_scores)
    results["same view (position/angle)"] = np.array(view_scores)
    print(f"| BSData pitting {h}x{w} | image AUROC | escapes at 2 % false rejects |")
    print("|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {auroc(labels, s):.3f} | {escape_at_fr(labels, s):.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
