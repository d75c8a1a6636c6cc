"""The learned stage (``fit --defects --masks``'s ``learn_features``), cross-validated by camera view.

    python bench/learned_stage_cv.py [--stage3-lr 1e-3] [--steps 500] [--labels N] [--image-labels]
        [--seed S] [--json FILE]

The same protocol as ``bench/supervised_cv.py --pca 16 --coreset 0.001 --curve all`` (5 folds by
camera view, all labelled pits of the 12 training views with their masks, the threshold from the
calibration hold-out as fit suggests), through the product's code: per fold the head is learnt as
``train_head`` learns it on the frozen features (the "frozen" row, which reproduces supervised_cv),
then ``learn_stage`` trains a copy of Lite0's stage 3 with it, as fit does when it has masks on at
least 50 defective images, and the held-out frames are scored by the bundle's ``Head`` on the
extractor's 192 channels (the frozen 152, then the learned 40). Stage 5 and the distance to the
memory stay the frozen network's.

``--stage3-lr 0`` trains the head alone the same way (the control: what the extra training does
without a learned feature); ``--image-labels``: no masks, stage 3 then learns from the cells the
image-label head chose (fit does not do this: it was worse). Prints, per variant, the same
figures as supervised_cv. It reads the feature and distance caches that ``bench/supervised_cv.py
--input-size 448x1088 --pca 16 --coreset 0.001 --curve all,all:image`` leaves in var/explore (run
that first).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent / "explore"))
from bsd_scores import cached_features  # the cache the explorations share
from oracle import escape_at_fr, threshold_at_fr  # the operating points the explorations report

from anomalyd.evaluation.metrics import auroc
from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.calibrate import calibration, suggest_thresholds
from anomalyd.model.features import PatchFeatures, build_patch_features
from anomalyd.model.head import Head, cell_inputs
from anomalyd.model.images import read_rgb
from anomalyd.model.scoring import Preprocessor
from anomalyd.training.defects import Defect, defect_cells
from anomalyd.training.fit import FitSettings, split_holdout
from anomalyd.training.head_training import HeadSettings, image_level_cells, near_defect, top_cells, train_head
from anomalyd.training.learn_features import LearnSettings, learn_stage, stage_inputs


def stage2_maps(files: list[Path], size: tuple[int, int], cache: Path) -> torch.Tensor:
    """``[N, 24, h/4, w/4]`` float16: the learned stage's input, the frozen network to stage 2 (cached)."""
    if cache.is_file():
        return torch.from_numpy(np.load(cache, allow_pickle=False))
    model = build_patch_features("efficientnet_lite0", ("stage3", "stage5"), learned=True)
    prepare = Preprocessor(size, None, torch.device("cpu"))
    maps = torch.cat([stage_inputs(model, prepare.batch([read_rgb(f) for f in files[i : i + 4]]))
                      for i in range(0, len(files), 4)])  # fmt: skip
    np.save(cache, maps.numpy(), allow_pickle=False)
    return maps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    learn = LearnSettings()  # fit's
    p.add_argument("--stage3-lr", default=f"{learn.lr:g}", help="comma-separated: one variant each (0: the head alone)")
    p.add_argument("--head-lr", type=float, default=learn.head_lr)
    p.add_argument("--steps", type=int, default=learn.steps)
    p.add_argument("--batch", type=int, default=learn.batch, help="crops per step (half on pits)")
    p.add_argument("--window", type=int, default=learn.window, help="cells scored per crop side")
    p.add_argument("--crop", type=int, default=learn.crop, help="stage-2 pixels a crop side (at least the window's)")
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

    def image_scores(
        head: Head, model: PatchFeatures | None, s2: torch.Tensor, cells: np.ndarray, dist: np.ndarray
    ) -> np.ndarray:
        """Through the bundle's head: on the frozen features, or on them and the learned stage's (192 channels)."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(s2), 4):
                feats = torch.from_numpy(cells[i : i + 4]).reshape(-1, gh, gw, c).permute(0, 3, 1, 2)
                if model is not None:
                    assert model.learned is not None
                    learned = model.learned(s2[i : i + 4].float())
                    feats = torch.cat([feats, F.avg_pool2d(learned, 3, 1, 1, count_include_pad=False)], 1)
                cell = head.score_cells(feats, torch.from_numpy(dist[i : i + 4]))
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
        x_s2 = torch.cat([s2_te[train_idx], s2_te[neg_idx], s2_hg])
        negative = ~near_defect(positive, (gh, gw), hs.ring) & ~unsure
        for name, lr in variants.items():
            model, tuned = None, head
            if lr is not None:
                tuned_started = time.perf_counter()
                model = build_patch_features("efficientnet_lite0", ("stage3", "stage5"), learned=True)
                crop = max(args.crop, 2 * (args.window + 8))  # the window and the 4 cells each side it reads
                chosen_settings = replace(
                    learn, steps=args.steps, batch=args.batch, lr=lr, head_lr=args.head_lr, window=args.window,
                    crop=crop,
                )  # fmt: skip
                tuned = learn_stage("efficientnet_lite0", model, head, x_s2, x_cells, x_dist, positive, negative,
                                    (gh, gw), chosen_settings, hs.balance, k + 100 * args.seed)  # fmt: skip
                print(f"  fold {k} {name}: trained in {time.perf_counter() - tuned_started:.0f} s", file=sys.stderr)
            ca_raw = image_scores(tuned, model, s2_ca, ca_cells, ca_dist)
            reference = float(calibration(ca_raw)["reference_raw"])  # type: ignore[arg-type]
            thr = float(suggest_thresholds(ca_raw, supervised=True)["suggested_image"])  # type: ignore[arg-type]
            raw = image_scores(tuned, model, s2_te[held], te_cells[held], te_dist[held])
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


if __name__ == "__main__":
    raise SystemExit(main())
