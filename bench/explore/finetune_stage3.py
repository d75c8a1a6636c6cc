"""Exploration (issue 23): does a learned feature help? Lite0's stage 3 fine-tuned on the labelled pits.

    python bench/explore/finetune_stage3.py [--stage3-lr 1e-3] [--steps 500] [--labels N] [--image-labels]
        [--seed S] [--json FILE]

The same protocol as ``bench/supervised_cv.py --pca 16 --coreset 0.001 --curve all`` (5 folds by
camera view, all labelled pits of the 12 training views with their masks, the threshold from the
calibration hold-out as fit suggests), with one change: per fold, a copy of Lite0's stage 3 (its two
blocks, from stage 2's output) is trained together with the head, end to end on the cells' labels,
starting from the pretrained weights and from the head ``train_head`` learns on the frozen features.
Stage 5 (112 of the 152 channels) and the distance to the memory stay those of the frozen network,
so the cost at run time would be one more stage 3 (about 0.37 GFLOP a frame at 448x1088).

Training runs on crops of stage 2's map (32x32, the 4x4 stage-3 cells at the centre are scored, far
enough from the crop's edge that its padding does not reach them): half of each batch centred on a
labelled pit cell (each pitted frame its share, as ``HeadSettings.balance`` 1), half on a random
good cell. ``--stage3-lr 0`` trains the head alone the same way (the control: what the extra
training does without a learned feature). Prints, per variant, the same figures as supervised_cv.
It reads the feature and distance caches that ``bench/supervised_cv.py --pca 16 --coreset 0.001`` leaves
in var/explore (run that first). Nothing here is used by the daemon.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bsd_scores import cached_features
from oracle import escape_at_fr, threshold_at_fr

from anomalyd.evaluation.metrics import auroc
from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.backbones import EfficientNetLite
from anomalyd.model.calibrate import calibration, suggest_thresholds
from anomalyd.model.features import build_patch_features
from anomalyd.model.head import (
    LOGIT_SHIFT,
    HeadSettings,
    _ring,
    cell_inputs,
    defect_cell_weights,
    image_level_cells,
    top_cells,
    train_head,
)
from anomalyd.model.images import read_rgb
from anomalyd.model.scoring import Preprocessor
from anomalyd.training.fit import Defect, FitSettings, defect_cells, split_holdout

STAGE3 = (3, 4)  # Lite0's blocks of stage 3 (stage 1: block 0, stage 2: blocks 1-2)
CROP, CENTRE = 32, 4  # stage-2 pixels of a crop; stage-3 cells scored at its centre


def stage2_maps(files: list[Path], size: tuple[int, int], cache: Path) -> torch.Tensor:
    """``[N, 24, h/4, w/4]`` float16: the frozen network up to stage 2 (cached)."""
    if cache.is_file():
        return torch.from_numpy(np.load(cache, allow_pickle=False))
    model = build_patch_features("efficientnet_lite0", ("stage3", "stage5"))
    net = model.backbone
    assert isinstance(net, EfficientNetLite)
    prepare = Preprocessor(size, None, torch.device("cpu"))
    offset, scale = model.get_buffer("offset"), model.get_buffer("scale")
    out = []
    with torch.inference_mode():
        for i in range(0, len(files), 4):
            x = (prepare.batch([read_rgb(f) for f in files[i : i + 4]]) - offset) * scale
            x = torch.clamp(net._bn0(net._conv_stem(net._stem_pad(x))), 0.0, 6.0)
            for block in net._blocks[: STAGE3[0]]:
                x = block(x)
            out.append(x.half())
    maps = torch.cat(out)
    np.save(cache, maps.numpy(), allow_pickle=False)
    return maps


class Tuned(torch.nn.Module):
    """Stage 3 (trainable copy) → 3x3 mean → with the frozen stage 5 and the distance → the head's MLP."""

    def __init__(self, stage3: torch.nn.Module, arrays: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.stage3 = stage3
        self.register_buffer("mean", torch.from_numpy(arrays["mean"]))
        self.register_buffer("std", torch.from_numpy(arrays["std"]))
        self.w1 = torch.nn.Parameter(torch.from_numpy(arrays["w1"].copy()))
        self.b1 = torch.nn.Parameter(torch.from_numpy(arrays["b1"].copy()))
        self.w2 = torch.nn.Parameter(torch.from_numpy(arrays["w2"].copy()))
        self.b2 = torch.nn.Parameter(torch.from_numpy(arrays["b2"].copy()))

    def s3(self, s2: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.stage3(s2.float()), 3, stride=1, padding=1, count_include_pad=False)

    def logits(self, s3: torch.Tensor, s5: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """``[M, 40]``, ``[M, 112]``, ``[M]`` → ``[M]``."""
        x = (torch.cat([s3, s5, dist[:, None]], 1) - self.get_buffer("mean")) / self.get_buffer("std")
        return torch.relu(x @ self.w1 + self.b1) @ self.w2 + self.b2


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--stage3-lr", default="1e-3", help="comma-separated: one variant each (0: the head alone)")
    p.add_argument("--head-lr", type=float, default=3e-4)
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--batch", type=int, default=64, help="crops per step (half on pits)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--folds", default="0,1,2,3,4")
    p.add_argument("--labels", default="all", help="labelled defective images per fold (N or all), as --curve N")
    p.add_argument(
        "--image-labels",
        action="store_true",
        help="no masks: the head learns by fit's image-label rule; stage 3 then learns from the cells it chose",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    h, w = 448, 1088
    data = args.data
    rows = {r["path"]: r for r in csv.DictReader((data / "split.csv").open())}
    good_files = sorted((data / "train" / "good").glob("*.jpg"))
    test = sorted((data / "test").rglob("*.jpg"))
    settings = FitSettings(taps=("stage3", "stage5"), input_size=(h, w), coreset_ratio=0.001)
    tag = f"efficientnet_lite0_stage3+stage5_{h}x{w}"
    explore = Path("var/explore")
    fte = cached_features(settings, test, explore / f"{tag}_test.npy")  # supervised_cv's cache
    ftr = cached_features(settings, good_files, explore / f"{tag}_train.npy")
    with np.load(explore / f"{tag}_dist_0.001_pca16.npz", allow_pickle=False) as z:
        te_dist, hg_dist, ca_dist = z["te"], z["hg"], z["ca"]
    with np.load(explore / f"{tag}_dist_0.001.npz", allow_pickle=False) as z:  # in all features: the unsure cells
        te_full, hg_full = z["te"], z["hg"]
    c, gh, gw = fte.shape[1:]
    index = {f: i for i, f in enumerate(good_files)}
    _bank, holdout = split_holdout(good_files, 0.2, settings.seed)
    head_good, calib = holdout[: len(holdout) // 2], holdout[len(holdout) // 2 :]
    started = time.perf_counter()
    s2_te = stage2_maps(test, (h, w), explore / f"{tag}_stage2map_test.npy")
    s2_hg = stage2_maps(head_good, (h, w), explore / f"{tag}_stage2map_hg.npy")
    s2_ca = stage2_maps(calib, (h, w), explore / f"{tag}_stage2map_ca.npy")
    print(f"stage 2 maps {tuple(s2_te.shape)} in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    def flat(feats: torch.Tensor) -> np.ndarray:
        return feats.permute(0, 2, 3, 1).reshape(len(feats), gh * gw, c).numpy()

    te_cells = flat(fte)
    hg_cells = flat(ftr[[index[f] for f in head_good]])
    ca_cells = flat(ftr[[index[f] for f in calib]])

    def rel(f: Path) -> str:
        return str(f.relative_to(data))

    labels = np.array([t.parent.name != "good" for t in test])
    small = labels & np.array([float(rows[rel(t)]["mask_pixels"] or 0) < 300 for t in test])
    views = np.array([rows[rel(t)]["position_angle"] for t in test])
    pit_cells = np.zeros((len(test), gh * gw), bool)
    for i, t in enumerate(test):
        if labels[i]:
            found = defect_cells(Defect(t, "pitting", data / "ground_truth" / "pitting" / f"{t.stem}_mask.png"),
                                 (gh, gw), None)  # fmt: skip
            assert found is not None
            pit_cells[i] = found
    order = sorted(set(views))
    np.random.default_rng(0).shuffle(order)
    mapper = AnomalyMapper((gh, gw), (h, w), settings.sigma)
    hs = HeadSettings()
    pretrained = build_patch_features("efficientnet_lite0", ("stage3", "stage5")).backbone
    assert isinstance(pretrained, EfficientNetLite)
    stage3_init = torch.nn.Sequential(*[pretrained._blocks[i] for i in STAGE3]).eval()

    def image_scores(model: Tuned, s2: torch.Tensor, cells: np.ndarray, dist: np.ndarray) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(s2), 4):
                s3 = model.s3(s2[i : i + 4]).permute(0, 2, 3, 1).reshape(-1, 40)
                rest = torch.from_numpy(cells[i : i + 4, :, 40:]).reshape(-1, c - 40)
                lg = model.logits(s3, rest, torch.from_numpy(dist[i : i + 4]).reshape(-1))
                cell = F.softplus(lg + LOGIT_SHIFT).reshape(-1, gh * gw)
                out.append(mapper(cell).amax(dim=(1, 2)))
        return torch.cat(out).numpy()

    variants: dict[str, float | None] = {"frozen (train_head only)": None}
    variants |= {f"stage 3 lr {float(v):g}": float(v) for v in args.stage3_lr.split(",")}
    scores = {name: np.zeros(len(test)) for name in variants}
    folds = [int(k) for k in args.folds.split(",")]
    scored = np.zeros(len(test), bool)
    for k in folds:
        held = np.isin(views, order[k::5])
        scored |= held
        train_idx = np.flatnonzero(~held & labels)
        if args.labels != "all":  # the same draw as supervised_cv's learning curve
            train_idx = np.random.default_rng(k).choice(train_idx, min(int(args.labels), len(train_idx)), False)
        neg_idx = np.flatnonzero(~held & ~labels)
        # The head as supervised_cv learns it (masks, or image labels), the starting point.
        x_cells = np.concatenate([te_cells[train_idx], te_cells[neg_idx], hg_cells])
        x_dist = np.concatenate([te_dist[train_idx], te_dist[neg_idx], hg_dist])
        positive = np.zeros(x_dist.shape, bool)
        positive[: len(train_idx)] = pit_cells[train_idx]
        defective = np.r_[np.ones(len(train_idx), bool), np.zeros(len(neg_idx) + len(hg_cells), bool)]
        unsure = np.zeros(x_dist.shape, bool)
        if args.image_labels:
            # fit's rule for image labels (supervised_cv's N:image); stage 3 then learns from the cells the
            # finished head scores highest among each frame's unsure ones, and not from the unsure cells.
            x_unsure = np.concatenate([te_full[train_idx], te_full[neg_idx], hg_full])
            head = train_head(x_cells, x_dist, None, defective, hs, (gh, gw), k + 100 * args.seed, unsure_dist=x_unsure)
            n_def = len(train_idx)
            unsure[:n_def], _first = image_level_cells(x_unsure[:n_def], hs)
            inputs = cell_inputs(x_cells[:n_def], x_dist[:n_def], hs.use_distance)
            chosen = head.cell_scores(torch.from_numpy(inputs)).reshape(n_def, -1).numpy()
            positive[:n_def] = top_cells(chosen, unsure[:n_def], hs.unmasked_top)
        else:
            head = train_head(x_cells, x_dist, positive, defective, hs, (gh, gw), k + 100 * args.seed)
        arrays = {key: v.numpy() for key, v in head.t.items()}
        x_s2 = torch.cat([s2_te[train_idx], s2_te[neg_idx], s2_hg])
        negative = ~_ring(positive, (gh, gw), hs.ring) & ~unsure
        pos_flat = np.flatnonzero(positive.ravel())
        pos_weight = torch.from_numpy(defect_cell_weights(positive, hs.balance)[pos_flat])
        neg_flat = np.flatnonzero(negative.ravel())
        for name, lr in variants.items():
            model = Tuned(copy.deepcopy(stage3_init), arrays)
            if lr is not None:
                tuned_started = time.perf_counter()
                train(model, lr, args, x_s2, x_cells, x_dist, positive, negative, pos_flat, pos_weight, neg_flat,
                      (gh, gw), k + 100 * args.seed)  # fmt: skip
                print(f"  fold {k} {name}: trained in {time.perf_counter() - tuned_started:.0f} s", file=sys.stderr)
            ca_raw = image_scores(model, s2_ca, ca_cells, ca_dist)
            reference = float(calibration(ca_raw)["reference_raw"])  # type: ignore[arg-type]
            thr = float(suggest_thresholds(ca_raw, supervised=True)["suggested_image"])  # type: ignore[arg-type]
            raw = image_scores(model, s2_te[held], te_cells[held], te_dist[held])
            scores[name][held] = raw / reference / thr
            print(f"  fold {k} {name}: done", file=sys.stderr, flush=True)
    results = {}
    lab, sm = labels[scored], small[scored]
    for name, s in scores.items():
        s = s[scored]
        cut = threshold_at_fr(s[~lab])
        results[name] = {
            "image_auroc": round(auroc(lab, s), 4),
            "escapes_at_threshold": round(float(np.mean(s[lab] < 1.0)), 4),
            "false_rejects_at_threshold": round(float(np.mean(s[~lab] >= 1.0)), 4),
            "escapes_at_2pct_fr": round(escape_at_fr(lab, s), 4),
            "small_pit_escapes_at_2pct_fr": round(float(np.mean(s[sm] < cut)), 4),
        }
        print(name, json.dumps(results[name]), flush=True)
    if args.json:
        frames = {n: {rel(t): round(float(v), 4) for t, v, m in zip(test, s, scored, strict=True) if m}
                  for n, s in scores.items()}  # fmt: skip
        args.json.write_text(json.dumps({"args": vars(args) | {"data": str(data), "json": str(args.json)},
                                         "results": results, "frame_scores": frames}, indent=2) + "\n")  # fmt: skip
    return 0


def train(
    model: Tuned,
    stage3_lr: float,
    args: argparse.Namespace,
    x_s2: torch.Tensor,
    x_cells: np.ndarray,
    x_dist: np.ndarray,
    positive: np.ndarray,
    negative: np.ndarray,
    pos_flat: np.ndarray,
    pos_weight: torch.Tensor,
    neg_flat: np.ndarray,
    grid: tuple[int, int],
    seed: int,
) -> None:
    """End to end on crops: half centred on pit cells (by their weights), half on good cells."""
    gh, gw = grid
    g = torch.Generator().manual_seed(seed)
    head_params = [model.w1, model.b1, model.w2, model.b2]
    groups = [{"params": head_params, "lr": args.head_lr}]
    if stage3_lr > 0:
        groups.append({"params": list(model.stage3.parameters()), "lr": stage3_lr})
    else:
        model.stage3.requires_grad_(False)
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    model.stage3.eval()  # its batch norms keep ImageNet's statistics (crops of one line are no batch to learn them)
    half = args.batch // 2
    pad = CROP // 2
    s2 = F.pad(x_s2, (pad, pad, pad, pad))  # so that a crop at the frame's edge is the frame's own zero padding
    cells_t = torch.from_numpy(x_cells[:, :, 40:])
    dist_t = torch.from_numpy(x_dist)
    lab_pos, lab_neg = torch.from_numpy(positive), torch.from_numpy(negative)
    r0 = CROP // 4 - CENTRE // 2  # the first scored stage-3 cell of a crop
    with torch.enable_grad():
        for _step in range(args.steps):
            chosen = torch.cat([
                torch.from_numpy(pos_flat)[torch.multinomial(pos_weight, half, replacement=True, generator=g)],
                torch.from_numpy(neg_flat)[torch.randint(len(neg_flat), (half,), generator=g)],
            ])  # fmt: skip
            frame, cell = chosen // (gh * gw), chosen % (gh * gw)
            # The crop's scored 4x4 cells hold the chosen one (top-left at its centre - 2, clipped to the grid).
            ci = (cell // gw - CENTRE // 2).clamp(0, gh - CENTRE)
            cj = (cell % gw - CENTRE // 2).clamp(0, gw - CENTRE)
            crops = torch.stack([
                s2[f, :, 2 * (i - r0) + pad : 2 * (i - r0) + pad + CROP, 2 * (j - r0) + pad : 2 * (j - r0) + pad + CROP]
                for f, i, j in zip(frame.tolist(), ci.tolist(), cj.tolist(), strict=True)
            ])  # fmt: skip
            s3 = model.s3(crops)[:, :, r0 : r0 + CENTRE, r0 : r0 + CENTRE]
            rows = (ci[:, None] + torch.arange(CENTRE)[None]).repeat_interleave(CENTRE, 1)
            cols = (cj[:, None] + torch.arange(CENTRE)[None]).repeat(1, CENTRE)
            flat_cells = rows * gw + cols  # [B, 16]
            fr = frame[:, None].expand_as(flat_cells)
            lg = model.logits(
                s3.permute(0, 2, 3, 1).reshape(-1, 40),
                cells_t[fr.reshape(-1), flat_cells.reshape(-1)],
                dist_t[fr.reshape(-1), flat_cells.reshape(-1)],
            ).reshape(-1, CENTRE * CENTRE)
            is_pos = lab_pos[fr, flat_cells].float()
            is_neg = lab_neg[fr, flat_cells].float()
            loss_pos = F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg), reduction="none")
            loss_neg = F.binary_cross_entropy_with_logits(lg, torch.zeros_like(lg), reduction="none")
            loss = (loss_pos * is_pos).sum() / is_pos.sum().clamp_min(1) + (loss_neg * is_neg).sum() / is_neg.sum()
            opt.zero_grad()
            loss.backward()
            opt.step()


if __name__ == "__main__":
    raise SystemExit(main())
