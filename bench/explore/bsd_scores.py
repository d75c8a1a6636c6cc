"""Exploration (issue 14): which features and which image score separate BSData's pits?

    python bench/explore/bsd_scores.py --backbone efficientnet_lite0 --input-size 224x544 \
        --taps stage3,stage5 [--coreset 0.01]

Extracts patch features once per setting (cached under var/explore/), builds a
coreset bank from train/good exactly as `fit` does, and prints image AUROC and
the escape rate at 2 % false rejects (threshold from test/good, an oracle: it
says what an image score *can* separate) for several image scores:
  max-sN     maximum of the map blurred with sigma N (input pixels; N=0: no blur)
  topK       mean of the K largest patch distances
Nothing here is used by the daemon.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from oracle import escape_at_fr  # bench/explore/oracle.py (the script's folder is on sys.path)

from anomalyd.evaluation.metrics import auroc
from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.coreset import greedy_coreset
from anomalyd.model.features import build_patch_features
from anomalyd.model.nearest import nearest_distances
from anomalyd.training.extraction import extract_features
from anomalyd.training.fit import FitSettings


def cached_features(settings: FitSettings, files: list[Path], cache: Path) -> torch.Tensor:
    if cache.is_file():
        return torch.from_numpy(np.load(cache).astype(np.float32))
    import tempfile

    from anomalyd.model.export import export_onnx
    from anomalyd.training.extraction import OnnxFitExtractor

    model = build_patch_features(settings.backbone, settings.taps)
    started = time.perf_counter()
    assert settings.input_size is not None
    with tempfile.TemporaryDirectory() as folder:  # fit's own CPU path: the exported network under ONNX Runtime
        export_onnx(model, settings.input_size, Path(folder) / "extractor.onnx")
        network = OnnxFitExtractor((Path(folder) / "extractor.onnx").read_bytes())
    feats = extract_features(model, files, settings, lambda n: None, network)
    print(f"  extracted {len(files)} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, feats.numpy().astype(np.float16))
    return feats


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, default=Path("../shared/data/bsd_pitting"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--taps", default="stage3,stage5")
    p.add_argument("--input-size", default="224x544")
    p.add_argument("--coreset", type=float, default=0.01)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    h, w = (int(v) for v in args.input_size.split("x"))
    torch.set_num_threads(2)
    settings = FitSettings(backbone=args.backbone, taps=tuple(args.taps.split(",")), input_size=(h, w))
    train = sorted((args.data / "train" / "good").glob("*.jpg"))
    test = sorted((args.data / "test").rglob("*.jpg"))
    labels = np.array([t.parent.name != "good" for t in test])
    tag = f"{args.backbone}_{args.taps.replace(',', '+')}_{h}x{w}"
    cache = Path("var/explore")
    ftr = cached_features(settings, train, cache / f"{tag}_train.npy")
    fte = cached_features(settings, test, cache / f"{tag}_test.npy")
    _n, c, gh, gw = ftr.shape
    flat = ftr.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    count = max(1, round(flat.shape[0] * args.coreset))
    started = time.perf_counter()
    bank = torch.from_numpy(np.ascontiguousarray(flat[greedy_coreset(flat, count, 64, 0)]))
    coreset_s = time.perf_counter() - started
    q = fte.permute(0, 2, 3, 1).reshape(-1, c)
    started = time.perf_counter()
    dist = nearest_distances(q, bank).reshape(len(test), gh, gw)
    search_s = time.perf_counter() - started
    scores: dict[str, np.ndarray] = {}
    for sigma in (0.0, 2.0, 4.0, 8.0):
        mapper = AnomalyMapper((gh, gw), (h, w), sigma)
        scores[f"max-s{sigma:g}"] = mapper(dist.reshape(len(test), -1)).amax(dim=(1, 2)).numpy()
    flat_d = dist.reshape(len(test), -1)
    for k in (3, 10, 30):
        scores[f"top{k}"] = flat_d.topk(k, dim=1).values.mean(1).numpy()
    print(f"{tag}: grid {gh}x{gw}, C={c}, bank {count}, coreset {coreset_s:.0f} s, search {search_s:.0f} s")
    out = {}
    for name, s in scores.items():
        out[name] = {"auroc": auroc(labels, s), "escapes_at_2pct_fr": escape_at_fr(labels, s)}
        print(f"  {name:8s} AUROC {out[name]['auroc']:.3f}  escapes@2%FR {out[name]['escapes_at_2pct_fr']:.1%}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"setting": tag, "results": out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
