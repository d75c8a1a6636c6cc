"""Exploration (issue 23): small defects taught from shrunk copies of the large ones image labels find.

With image labels alone the head learns the large pits (a chosen cell is on the pit in 94-100 % of
frames) but not the small ones (26-36 %): nothing in a frame tells a 20-pixel pit from a speck, by
distance or by pixel cues (``/tmp`` diagnostics, docs/accuracy.md). This makes small defects the
line has shown only large: each image-labelled frame whose farthest cell is farther from the memory
than any held-back good frame's (the defect is found for sure) gives a patch around that cell,
shrunk 2-4 times and blended into a good frame of the same camera view at the same spot, with its
position known: a small pit with a mask, made from image labels alone.

Writes ``var/explore/<tag>_shrunk.npz`` (features, distances, positives, the source frame); run
``bench/supervised_cv.py ... --shrunk var/explore/<tag>_shrunk.npz`` to learn from them. Nothing
here is used by the daemon.

    python bench/explore/shrunk_pits.py [--scales 2,3,4] [--patch 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from bsd_frames import test_frames  # bench/explore (the script's folder is on sys.path)

from anomalyd.model.coreset import pca_projection
from anomalyd.model.export import export_onnx
from anomalyd.model.features import build_patch_features
from anomalyd.model.images import read_rgb
from anomalyd.model.nearest import nearest_distances
from anomalyd.model.scoring import Preprocessor
from anomalyd.training.extraction import OnnxFitExtractor
from anomalyd.training.fit import FitSettings


def blend(target: np.ndarray, patch: np.ndarray, cy: int, cx: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """``patch`` (h×w×3 float) blended into ``target`` centred at (cy, cx): its mean moved to the target's
    there and a Gaussian window as alpha, so only its centre (the defect) shows; → image, (y0, x0, h, w)."""
    ph, pw = patch.shape[:2]
    y0 = int(np.clip(cy - ph // 2, 0, target.shape[0] - ph))
    x0 = int(np.clip(cx - pw // 2, 0, target.shape[1] - pw))
    region = target[y0 : y0 + ph, x0 : x0 + pw].astype(np.float32)
    yy, xx = np.mgrid[:ph, :pw]
    alpha = np.exp(-(((yy - (ph - 1) / 2) ** 2 + (xx - (pw - 1) / 2) ** 2) / (2 * (max(ph, pw) / 4) ** 2)))[..., None]
    shifted = patch + (region.mean((0, 1)) - patch.mean((0, 1)))
    out = target.astype(np.float32).copy()
    out[y0 : y0 + ph, x0 : x0 + pw] = alpha * shifted + (1 - alpha) * region
    return np.clip(out, 0, 255).astype(np.uint8), (y0, x0, ph, pw)


def main() -> int:
    import cv2

    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--input-size", default="448x1088")
    p.add_argument("--coreset", type=float, default=0.001)
    p.add_argument("--pca", type=int, default=16)
    p.add_argument("--scales", default="2,3,4")
    p.add_argument("--patch", type=int, default=64, help="frame pixels around the farthest cell")
    p.add_argument("--per-scale", type=int, default=1, help="good frames each shrunk copy goes into")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(2)
    h, w = (int(v) for v in args.input_size.split("x"))
    settings = FitSettings(input_size=(h, w), coreset_ratio=args.coreset)
    tag = f"efficientnet_lite0_{'+'.join(settings.taps)}_{h}x{w}"
    cache = Path("var/explore")
    data = args.data
    bsd = test_frames(data)
    test, views, labels = bsd.files, bsd.views, bsd.labels
    with np.load(cache / f"{tag}_dist_{args.coreset:g}.npz", allow_pickle=False) as z:
        te_full, hg_full = z["te"], z["hg"]  # distances in all features, as image labels are ranked
    bank = np.load(cache / f"{tag}_bank_{args.coreset:g}.npy", allow_pickle=False)
    mean, basis = pca_projection(bank, args.pca)
    gh, gw = h // 8, w // 8  # Lite0 stage 3 + 5: stride 8
    assert te_full.shape[1] == gh * gw
    sure = hg_full.max()  # no held-back good frame has a cell this far from the memory
    rng = np.random.default_rng(0)
    images: list[np.ndarray] = []
    positive: list[np.ndarray] = []
    source: list[int] = []
    for i in np.flatnonzero(labels & (te_full.max(1) > sure)).tolist():
        frame = read_rgb(test[i])
        fh, fw = frame.shape[:2]
        r, c = divmod(int(te_full[i].argmax()), gw)
        cy, cx = int((r + 0.5) * fh / gh), int((c + 0.5) * fw / gw)
        half = args.patch // 2
        y0, x0 = int(np.clip(cy - half, 0, fh - args.patch)), int(np.clip(cx - half, 0, fw - args.patch))
        patch = frame[y0 : y0 + args.patch, x0 : x0 + args.patch].astype(np.float32)
        good = np.flatnonzero(~labels & (views == views[i]))
        if not len(good):
            continue
        for s in (float(v) for v in args.scales.split(",")):
            size = max(4, round(args.patch / s))
            small = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
            for g in rng.choice(good, min(args.per_scale, len(good)), replace=False).tolist():
                made, (py, px, ph, pw) = blend(read_rgb(test[g]), small, cy, cx)
                images.append(made)
                # The defect's cells: those under the window's centre half (where alpha is above about 0.6).
                pos = np.zeros((gh, gw), bool)
                ys = slice(int((py + ph / 4) * gh / fh), int(np.ceil((py + 3 * ph / 4) * gh / fh)))
                xs = slice(int((px + pw / 4) * gw / fw), int(np.ceil((px + 3 * pw / 4) * gw / fw)))
                pos[ys, xs] = True
                positive.append(pos.ravel())
                source.append(i)
    print(f"{len(set(source))} of {labels.sum()} pitted frames sure (farthest cell > {sure:.3f}), "
          f"{len(images)} shrunk copies", file=sys.stderr)  # fmt: skip
    model = build_patch_features(settings.backbone, settings.taps)
    with tempfile.TemporaryDirectory() as folder:
        export_onnx(model, (h, w), Path(folder) / "extractor.onnx")
        network = OnnxFitExtractor((Path(folder) / "extractor.onnx").read_bytes())
    prepare = Preprocessor((h, w), None, torch.device("cpu"))
    feats = torch.cat([network.extract(prepare.batch(images[k : k + 8])) for k in range(0, len(images), 8)])
    cells = feats.permute(0, 2, 3, 1).reshape(len(images), gh * gw, -1).float()
    bank_t, mean_t, basis_t = torch.from_numpy(bank), torch.from_numpy(mean), torch.from_numpy(basis)
    search = (bank_t - mean_t) @ basis_t
    dist = np.stack([nearest_distances((q - mean_t) @ basis_t, search).numpy() for q in cells])
    full = np.stack([nearest_distances(q, bank_t).numpy() for q in cells])
    out = args.out or cache / f"{tag}_shrunk.npz"
    np.savez(out, cells=cells.numpy().astype(np.float16), dist=dist, full=full, positive=np.stack(positive),
             source=np.array(source))  # fmt: skip
    if images:
        cv2.imwrite(str(out.with_suffix(".jpg")), cv2.cvtColor(images[0], cv2.COLOR_RGB2BGR))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
