"""Does learning from labelled defects help, on defects it never saw? Cross-validated by camera view.

    python bench/supervised_cv.py [--data ../shared/data/bsd_pitting] [--input-size 448x1088] [--json FILE]

Protocol (BSData pitting): the memory bank is fit's coreset of train/good (80 %;
10 % held back as the head's good examples, 10 % to calibrate, as ``fit
--defects`` splits them). The 15 camera views (``split.csv``, ``position_angle``)
are shuffled into 5 folds of 3; for each fold the head learns from the pitted
test frames of the other 12 views (their masks, or with ``N:image`` in ``--curve`` image
labels only) and their good test frames, and the frames of the 3 held-out views
are scored: no surface is in both. Then the threshold is the one fit would
suggest from the calibration hold-out. A **learning curve** repeats it with
0 (good parts only, today's default), 5, 10, 20, 50 and all labelled defective
images of the training views. Everything runs through the product's code (the
extractor, the coreset, ``train_head``, the scorer's head, the map, the
calibration); features are extracted once and reused across folds, so this is
``fit --defects`` per fold without re-reading 368 images five times.

Prints per setting: image AUROC; escapes and false rejects at the bundle's own
threshold; escapes at 2 % false rejects (threshold on the scored good frames, an
oracle); escapes of pits under 300 px; pixel AUROC and AUPRO on the held-out pits.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "explore"))
from bsd_scores import cached_features  # the cache the explorations share
from oracle import escape_at_fr, threshold_at_fr  # the operating points the explorations report

from anomalyd.evaluation.metrics import aupro, auroc
from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.calibrate import calibration, f1_optimal_threshold, suggest_thresholds
from anomalyd.model.coreset import greedy_coreset
from anomalyd.model.head import Head
from anomalyd.model.nearest import nearest_distances
from anomalyd.training.defects import Defect, defect_cells
from anomalyd.training.fit import FitSettings, split_holdout
from anomalyd.training.head_training import HeadSettings, train_head


def pixel_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    import cv2

    assert path is not None
    mask = np.asarray(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE))
    small = cv2.resize((mask > 0).astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
    return np.asarray(small) > 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--input-size", default="448x1088")
    p.add_argument("--coreset", type=float, default=0.002)
    p.add_argument("--taps", default="stage3,stage5", help="Lite0 taps, the first sets the grid (as fit --taps)")
    p.add_argument(
        "--curve",
        default="0,5,10,20,50,all,20:image,all:image",
        help="labelled defective images per fold: N or all; N:image = image-level labels only (no masks); "
        "N:small-masks = masks on the pits under 300 px only, image labels for the rest",
    )
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--steps", type=int, default=HeadSettings().steps)
    p.add_argument("--max-negatives", type=int, default=HeadSettings().max_negatives)
    p.add_argument("--hard-rounds", type=int, default=HeadSettings().hard_rounds)
    p.add_argument("--context", type=int, default=HeadSettings().context, help="head neighbourhood radius (cells)")
    p.add_argument(
        "--unsure-cells", type=int, default=HeadSettings().unsure_cells, help="image labels: see HeadSettings"
    )
    p.add_argument("--unmasked-top", type=int, default=HeadSettings().unmasked_top, help="image labels")
    p.add_argument("--unmasked-rounds", type=int, default=HeadSettings().unmasked_rounds, help="image labels")
    p.add_argument("--cross-fit", type=int, default=HeadSettings().cross_fit, help="image labels: see HeadSettings")
    p.add_argument("--bags", action=argparse.BooleanOptionalAction, default=HeadSettings().bags, help="image labels")
    p.add_argument(
        "--bags-min-images",
        type=int,
        default=HeadSettings().bags_min_images,
        help="image labels: bags only with at least this many defective images without a mask",
    )
    p.add_argument("--bag-images", type=int, default=HeadSettings().bag_images, help="image labels as bags")
    p.add_argument("--bag-weight", type=float, default=HeadSettings().bag_weight, help="image labels as bags")
    p.add_argument(
        "--drop-doubtful",
        action=argparse.BooleanOptionalAction,
        default=HeadSettings().drop_doubtful,
        help="image labels: see HeadSettings",
    )
    p.add_argument(
        "--defect-bags", action=argparse.BooleanOptionalAction, default=HeadSettings().defect_bags, help="image labels"
    )
    p.add_argument("--ensemble", type=int, default=HeadSettings().ensemble, help="heads from as many seeds, merged")
    p.add_argument("--lr-decay", action=argparse.BooleanOptionalAction, default=HeadSettings().lr_decay)
    p.add_argument("--balance", type=float, default=HeadSettings().balance, help="defect-cell weighting (HeadSettings)")
    p.add_argument("--sigma", type=float, help="the map's blur (default: fit's)")
    p.add_argument("--pca", type=int, default=0, help="search in the bank's first N principal components (0: all)")
    p.add_argument(
        "--unsure-projected",
        action="store_true",
        help="image labels: rank the unsure cells by the projected distance (fit ranks them in all features)",
    )
    p.add_argument(
        "--pixel-cues", action="store_true", help="add bench/explore/pixel_cues.py's cues to the head's inputs"
    )
    p.add_argument(
        "--defect-threshold",
        action="store_true",
        help="also report the threshold set between held-back labelled defects and good parts (inner split)",
    )
    p.add_argument(
        "--good-outliers",
        type=int,
        default=0,
        metavar="K",
        help="image labels (exploration): rank a pitted frame's cells by the lesser of their distance to the memory "
        "and to the K most unusual cells of each training good frame (droplets, soiling), so that what good parts "
        "also show is not taken for the defect (0: off)",
    )
    p.add_argument("--seed", type=int, default=0, help="the heads' training seeds are fold + 100 × this")
    p.add_argument(
        "--shrunk",
        type=Path,
        help="with image labels, also learn the shrunk copies of sure defects (bench/explore/shrunk_pits.py)",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    h, w = (int(v) for v in args.input_size.split("x"))
    data = args.data
    rows = {r["path"]: r for r in csv.DictReader((data / "split.csv").open())}
    good_files = sorted((data / "train" / "good").glob("*.jpg"))
    test = sorted((data / "test").rglob("*.jpg"))
    settings = FitSettings(taps=tuple(args.taps.split(",")), input_size=(h, w), coreset_ratio=args.coreset)
    if args.sigma is not None:
        from dataclasses import replace

        settings = replace(settings, sigma=args.sigma)
    tag = f"efficientnet_lite0_{'+'.join(settings.taps)}_{h}x{w}"
    ftr = cached_features(settings, good_files, Path("var/explore") / f"{tag}_train.npy")
    fte = cached_features(settings, test, Path("var/explore") / f"{tag}_test.npy")
    c, gh, gw = fte.shape[1:]
    index = {f: i for i, f in enumerate(good_files)}
    bank_files, holdout = split_holdout(good_files, 0.2, settings.seed)
    head_good, calib = holdout[: len(holdout) // 2], holdout[len(holdout) // 2 :]
    started = time.perf_counter()
    bank_cache = Path("var/explore") / f"{tag}_bank_{args.coreset:g}.npy"
    if bank_cache.is_file():
        bank = torch.from_numpy(np.load(bank_cache, allow_pickle=False))
    else:
        flat = ftr[[index[f] for f in bank_files]].permute(0, 2, 3, 1).reshape(-1, c).numpy()
        count = min(settings.coreset_max, max(round(len(flat) * args.coreset), settings.coreset_min))
        bank = torch.from_numpy(np.ascontiguousarray(flat[greedy_coreset(flat, count, 64, settings.seed)]))
        np.save(bank_cache, bank.numpy(), allow_pickle=False)
        del flat

    search_bank, project = bank, None
    if args.pca:
        from anomalyd.model.coreset import pca_projection

        mean, basis = pca_projection(bank.numpy(), args.pca)
        project = (torch.from_numpy(mean), torch.from_numpy(basis))
        search_bank = (bank - project[0]) @ project[1]

    def distances(feats: torch.Tensor, projected: bool) -> np.ndarray:
        """Each cell's distance to the bank: in the search's projection, or in all features."""
        cells = feats.permute(0, 2, 3, 1).reshape(len(feats), gh * gw, c).float()
        if projected and project is not None:
            return np.stack([nearest_distances((q - project[0]) @ project[1], search_bank).numpy() for q in cells])
        return np.stack([nearest_distances(q, bank).numpy() for q in cells])

    te_cells = fte.permute(0, 2, 3, 1).reshape(len(fte), gh * gw, c).numpy().astype(np.float32)
    hg_feats, ca_feats = ftr[[index[f] for f in head_good]], ftr[[index[f] for f in calib]]
    hg_cells = hg_feats.permute(0, 2, 3, 1).reshape(len(hg_feats), gh * gw, c).numpy().astype(np.float32)
    ca_cells = ca_feats.permute(0, 2, 3, 1).reshape(len(ca_feats), gh * gw, c).numpy().astype(np.float32)

    head_c = c  # the head's input channels: the features, and the pixel cues if asked for
    if args.pixel_cues:
        from pixel_cues import pixel_cues

        from anomalyd.model.images import read_rgb
        from anomalyd.model.scoring import Preprocessor

        prepare = Preprocessor((h, w), None, torch.device("cpu"))
        stride = h // gh

        def with_cues(cells: np.ndarray, files: list[Path]) -> np.ndarray:
            cues = torch.cat([pixel_cues(prepare.batch([read_rgb(f)]), stride) for f in files])
            return np.concatenate([cells, cues.permute(0, 2, 3, 1).reshape(len(files), gh * gw, -1).numpy()], 2)

        te_cells, hg_cells, ca_cells = (
            with_cues(te_cells, test), with_cues(hg_cells, head_good), with_cues(ca_cells, calib)
        )  # fmt: skip
        head_c = te_cells.shape[2]

    def cached_distances(projected: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Test, head-good and calibration frames' distances (cached beside the features)."""
        suffix = f"_pca{args.pca}" if projected and args.pca else ""
        cache = Path("var/explore") / f"{tag}_dist_{args.coreset:g}{suffix}.npz"
        if cache.is_file():
            with np.load(cache, allow_pickle=False) as z:
                return z["te"], z["hg"], z["ca"]
        te, hg, ca = (distances(f, projected) for f in (fte, hg_feats, ca_feats))
        np.savez(cache, te=te, hg=hg, ca=ca)
        return te, hg, ca

    te_dist, hg_dist, ca_dist = cached_distances(projected=True)
    curve = [v for v in args.curve.split(",")]
    full_dist: np.ndarray | None = None  # image labels' unsure cells are ranked in all features, as fit does
    if args.pca and not args.unsure_projected and any(v.endswith((":image", ":small-masks")) for v in curve):
        te_full, hg_full, _ca = cached_distances(projected=False)
        full_dist = np.concatenate([te_full, hg_full])
    print(f"bank {len(bank)}, distances {time.perf_counter() - started:.0f} s", file=sys.stderr)
    mapper = AnomalyMapper((gh, gw), (h, w), settings.sigma)

    def image_scores(cell_scores: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        maps = torch.cat([mapper(torch.from_numpy(cell_scores[i : i + 8])) for i in range(0, len(cell_scores), 8)])
        return maps.amax(dim=(1, 2)).numpy(), maps

    def rel(f: Path) -> str:
        return str(f.relative_to(data))

    labels = np.array([t.parent.name != "good" for t in test])
    small = labels & np.array([float(rows[rel(t)]["mask_pixels"] or 0) < 300 for t in test])
    views = np.array([rows[rel(t)]["position_angle"] for t in test])
    defects = [Defect(t, "pitting", data / "ground_truth" / "pitting" / f"{t.stem}_mask.png") for t in test]

    def cells_of(d: Defect) -> np.ndarray:
        found = defect_cells(d, (gh, gw), None)
        assert found is not None
        return found

    pit_cells = np.stack(
        [cells_of(d) if lab else np.zeros(gh * gw, bool) for d, lab in zip(defects, labels, strict=True)]
    )
    pix_masks = np.stack([pixel_mask(d.mask, (h // 4, w // 4)) if lab else np.zeros((h // 4, w // 4), bool)
                          for d, lab in zip(defects, labels, strict=True)])  # fmt: skip
    order = sorted(set(views))
    rng = np.random.default_rng(0)
    rng.shuffle(order)
    results: dict[str, dict[str, float]] = {}
    frame_scores: dict[str, dict[str, float]] = {}
    reference_set_by: dict[str, list[dict[str, object]]] = {}
    hs = HeadSettings(
        hidden=args.hidden,
        steps=args.steps,
        hard_rounds=args.hard_rounds,
        context=args.context,
        unsure_cells=args.unsure_cells,
        balance=args.balance,
        max_negatives=args.max_negatives,
        unmasked_top=args.unmasked_top,
        unmasked_rounds=args.unmasked_rounds,
        cross_fit=args.cross_fit,
        lr_decay=args.lr_decay,
        bags=args.bags,
        bags_min_images=args.bags_min_images,
        bag_images=args.bag_images,
        bag_weight=args.bag_weight,
        defect_bags=args.defect_bags,
        drop_doubtful=args.drop_doubtful,
        ensemble=args.ensemble,
    )

    def good_outlier_ranking(cells: np.ndarray, dist: np.ndarray, defective: np.ndarray) -> np.ndarray:
        """``dist`` with each defective frame's cells at the lesser of it and their distance to the good frames'
        ``--good-outliers`` farthest cells (a bank of what good parts show unusually: droplets, soiling)."""
        good = np.flatnonzero(~defective)
        top = np.argpartition(-dist[good], args.good_outliers, axis=1)[:, : args.good_outliers]
        outliers = torch.from_numpy(np.ascontiguousarray(cells[good[:, None], top].reshape(-1, cells.shape[2])))
        ranked = dist.copy()
        for i in np.flatnonzero(defective).tolist():
            to_outliers = nearest_distances(torch.from_numpy(cells[i]), outliers).numpy()
            ranked[i] = np.minimum(dist[i], to_outliers)
        return ranked

    shrunk = dict(np.load(args.shrunk, allow_pickle=False)) if args.shrunk else None

    def learn(
        train_idx: np.ndarray, neg_idx: np.ndarray, image_level: bool, seed: int, masks_on: np.ndarray | None
    ) -> Head:
        """A head from these test frames' labelled defects (masks, or image labels) and good frames;
        ``masks_on`` (the test frames given with a mask) where some frames have masks and the others not."""
        x_cells = np.concatenate([te_cells[train_idx], te_cells[neg_idx], hg_cells])
        x_dist = np.concatenate([te_dist[train_idx], te_dist[neg_idx], hg_dist])
        defective = np.r_[np.ones(len(train_idx), bool), np.zeros(len(neg_idx) + len(hg_cells), bool)]
        positive, masked = None, None
        if not image_level or masks_on is not None:
            positive = np.zeros(x_dist.shape, bool)
            positive[: len(train_idx)] = pit_cells[train_idx]
        if image_level and masks_on is not None:
            masked = np.r_[masks_on[train_idx], np.zeros(len(neg_idx) + len(hg_cells), bool)]
        x_unsure = None
        if full_dist is not None:
            x_unsure = np.concatenate([full_dist[train_idx], full_dist[neg_idx], full_dist[len(test) :]])
        if image_level and args.good_outliers:
            x_unsure = good_outlier_ranking(x_cells, x_dist if x_unsure is None else x_unsure, defective)
        if image_level and shrunk is not None:  # shrunk copies of this fold's own sure defects, with their cells
            take = np.flatnonzero(np.isin(shrunk["source"], train_idx))
            x_cells = np.concatenate([x_cells, shrunk["cells"][take].astype(np.float32)])
            x_dist = np.concatenate([x_dist, shrunk["dist"][take]])
            if x_unsure is not None:
                x_unsure = np.concatenate([x_unsure, shrunk["full"][take]])
            defective = np.r_[defective, np.ones(len(take), bool)]
            base = np.zeros((len(defective) - len(take), gh * gw), bool) if positive is None else positive
            positive = np.concatenate([base, shrunk["positive"][take]])
            masked = np.r_[np.zeros(len(base), bool) if masked is None else masked, np.ones(len(take), bool)]
        return train_head(x_cells, x_dist, positive, defective, hs, (gh, gw), seed, masked, x_unsure)

    for spec in curve:
        point, _, kind = spec.partition(":")
        image_level = kind in ("image", "small-masks")
        masks_on = small if kind == "small-masks" else None
        scores = np.zeros(len(test))
        maps = torch.zeros(len(test), h, w)
        # Each frame's fold threshold, and the good-parts-only rule's, in units of the highest held-back good part.
        fold_threshold, with_margin = np.ones(len(test)), np.ones(len(test))
        next_holdout = np.ones(len(test))  # the next-highest held-back good part, in the same units
        defect_cut = np.full(len(test), np.nan)  # --defect-threshold: the cut from held-back labelled defects
        per_fold_defects = []
        set_by: list[dict[str, object]] = []
        for k in range(5):
            held = np.isin(views, order[k::5])
            if point == "0":
                te_s, ca_s = te_dist[held], ca_dist
            else:
                train_idx = np.flatnonzero(~held & labels)
                if point != "all":
                    train_idx = np.random.default_rng(k).choice(train_idx, min(int(point), len(train_idx)), False)
                per_fold_defects.append(len(train_idx))
                neg_idx = np.flatnonzero(~held & ~labels)  # the training views' good frames (given with --good)
                head = learn(train_idx, neg_idx, image_level, k + 100 * args.seed, masks_on)

                def apply(cells: np.ndarray, dist: np.ndarray, head: Head = head) -> np.ndarray:
                    f = torch.from_numpy(cells).reshape(len(cells), gh, gw, head_c).permute(0, 3, 1, 2)
                    return head.score_cells(f, torch.from_numpy(dist)).numpy()

                if args.defect_threshold:
                    # An inner split of the training views: a head learnt on 9 of them scores the labelled
                    # defects and good frames of the other 3; the F1-optimal cut between those defects and the
                    # good frames (with the calibration hold-out), in units of the highest held-back good part,
                    # is the threshold for the head learnt on all 12.
                    inner_views = sorted(set(views[train_idx]))[k % 3 :: 4]
                    inner = np.isin(views, inner_views)
                    inner_seed = k + 50 + 100 * args.seed
                    inner_head = learn(
                        train_idx[~inner[train_idx]], neg_idx[~inner[neg_idx]], image_level, inner_seed, masks_on
                    )
                    scored = np.r_[train_idx[inner[train_idx]], neg_idx[inner[neg_idx]]]
                    inner_ca, _ = image_scores(apply(ca_cells, ca_dist, inner_head))
                    inner_raw, _ = image_scores(apply(te_cells[scored], te_dist[scored], inner_head))
                    inner_ref = float(calibration(inner_ca)["reference_raw"])  # type: ignore[arg-type]
                    cut_scores = np.r_[inner_raw, inner_ca] / inner_ref
                    cut_labels = np.r_[labels[scored], np.zeros(len(inner_ca), bool)]
                    defect_cut[held] = f1_optimal_threshold(cut_scores, cut_labels)[0]
                te_s, ca_s = apply(te_cells[held], te_dist[held]), apply(ca_cells, ca_dist)
            calib_raw, _ = image_scores(ca_s)
            # fit's calibration, named: the fold's highest held-back good part (which sets the reference unless
            # it is an outlier) and the next one's score, as fit prints them.
            calib_stats = calibration(calib_raw, [f.name for f in calib])
            reference = float(calib_stats["reference_raw"])  # type: ignore[arg-type]
            highest: dict[str, Any] = calib_stats["highest_holdout"]  # type: ignore[assignment]
            margin_rule = float(suggest_thresholds(calib_raw)["suggested_image"])  # type: ignore[arg-type]
            suggested = suggest_thresholds(calib_raw, supervised=point != "0")["suggested_image"]  # fit's rule
            thr = float(suggested)  # type: ignore[arg-type]
            raw, fold_maps = image_scores(te_s)
            set_by.append(
                {
                    "highest": highest["image"],
                    "highest_score": round(highest["score"], 3),
                    "next_score": round(highest["next_score"], 3),
                }
            )
            scores[held] = raw / reference
            maps[held] = fold_maps / reference
            fold_threshold[held], with_margin[held] = thr, margin_rule
            next_holdout[held] = highest["next_score"]
            scores[held] /= thr  # one scale for all folds: 1.0 = the fold's own threshold
            maps[held] /= thr
        ng = scores >= 1.0
        unscaled = scores * fold_threshold  # back in units of the highest held-back good part
        small_maps = torch.nn.functional.avg_pool2d(maps[:, None], 4)[:, 0].numpy()
        cut = threshold_at_fr(scores[~labels])
        name = "good parts only" if point == "0" else f"{point} labelled defective images"
        name += {"image": " (image labels, no masks)", "small-masks": " (masks on pits < 300 px only)"}.get(kind, "")
        results[name] = {
            "labelled_per_fold": float(np.mean(per_fold_defects)) if per_fold_defects else 0.0,
            "image_auroc": round(auroc(labels, scores), 4),
            "escapes_at_threshold": round(float(np.mean(~ng[labels])), 4),
            "false_rejects_at_threshold": round(float(np.mean(ng[~labels])), 4),
            # With fit's margin for good parts only (one robust spread above the highest held-back good part).
            "escapes_with_margin": round(float(np.mean(unscaled[labels] < with_margin[labels])), 4),
            "false_rejects_with_margin": round(float(np.mean(unscaled[~labels] >= with_margin[~labels])), 4),
            # Had the highest held-back good part been taken out of the good folder (fit names it).
            "escapes_at_next_holdout": round(float(np.mean(unscaled[labels] < next_holdout[labels])), 4),
            "false_rejects_at_next_holdout": round(float(np.mean(unscaled[~labels] >= next_holdout[~labels])), 4),
            **(
                {
                    "escapes_at_defect_threshold": round(float(np.mean(unscaled[labels] < defect_cut[labels])), 4),
                    "false_rejects_at_defect_threshold": round(
                        float(np.mean(unscaled[~labels] >= defect_cut[~labels])), 4
                    ),
                }
                if not np.isnan(defect_cut).any()
                else {}
            ),
            "escapes_at_2pct_fr": round(escape_at_fr(labels, scores), 4),
            "small_pit_escapes_at_2pct_fr": round(float(np.mean(scores[small] < cut)), 4),
            "pixel_auroc": round(auroc(pix_masks.ravel(), small_maps.ravel()), 4),
            "aupro": round(aupro(pix_masks[labels], small_maps[labels]), 4),
        }
        print(name, json.dumps(results[name]), flush=True)
        reference_set_by[name] = set_by
        # Each frame's score (1.0 = its fold's threshold): which pits escape, which good frames set the cut.
        frame_scores[name] = {rel(t): round(float(v), 4) for t, v in zip(test, scores, strict=True)}
    report = {
        "protocol": "BSData pitting, 5 folds by camera view (position_angle), 3 views held out per fold; "
        f"Lite0 {'+'.join(settings.taps)} at {h}x{w}{' + pixel cues' if args.pixel_cues else ''}; "
        "threshold from the calibration hold-out as fit suggests",
        "results": results,
        "frame_scores": frame_scores,
        "reference_set_by": reference_set_by,  # per fold: the highest held-back good part and the next one's score
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
