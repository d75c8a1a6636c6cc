"""anomalyd against anomalib's PatchCore, side by side, in one run (a benchmark, not a test).

    python bench/peer_anomalib.py [--data ../shared/data/mvtec_bottle] [--peer-python .venv-peer/bin/python]

Each side runs in its own process (so peak RSS is its own) on the same CPU
threads and the same images: fit on train/good, then per-frame latency at batch
1 with the full frame in (decode excluded; each side's own preprocessing
included), then image AUROC on test/. anomalib runs its defaults (PatchcoreModel,
layers 2+3, 10 % coreset, 9 neighbours, 256×256 resize) with `wide_resnet50_2`
and `resnet18`. Its backbones have RANDOM weights: hub weights cannot be
downloaded here. Timing does not depend on the weights; its AUROC does, so it is
marked not comparable and anomalib's published figure is quoted beside it.
`make bench-peer` creates the peer environment (torch 2.14.1 + torchvision 0.29.1 + anomalib).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PUBLISHED = {"wide_resnet50_2": "1.000 (PatchCore paper, MVTec AD bottle, ImageNet weights)", "resnet18": "n/a"}


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})


def _train(data: Path, limit: int, work: Path) -> Path:
    """The first ``limit`` good images (both sides fit on exactly these), as a folder of links."""
    folder = work / f"train_{limit or 'all'}"
    folder.mkdir(parents=True, exist_ok=True)
    for p in _images(data / "train" / "good")[: limit or None]:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    return folder


def _test_set(data: Path) -> tuple[list[Path], list[int]]:
    files, labels = [], []
    for sub in sorted((data / "test").iterdir()):
        for p in _images(sub):
            files.append(p)
            labels.append(int(sub.name != "good"))
    return files, labels


def _auroc(labels: list[int], scores: list[float]) -> float:
    import numpy as np

    lab, s = np.asarray(labels), np.asarray(scores)
    pos, neg = s[lab == 1], s[lab == 0]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _latency(run: Any, frames: list[Any], runs: int, warmup: int) -> dict[str, float]:
    import numpy as np

    for f in frames[:warmup]:
        run(f)
    times = []
    for i in range(runs):
        t = time.perf_counter()
        run(frames[i % len(frames)])
        times.append((time.perf_counter() - t) * 1000)
    return {
        "p50": round(float(np.percentile(times, 50)), 2),
        "p99": round(float(np.percentile(times, 99)), 2),
        "n": runs,
    }


# ------------------------------------------------------------------ anomalib side
def side_anomalib(data: Path, backbone: str, runs: int, threads: int, train_dir: Path) -> dict[str, Any]:
    import torch
    from anomalib.models import Patchcore
    from anomalib.models.image.patchcore.torch_model import PatchcoreModel
    from torchvision.io import ImageReadMode, decode_image

    torch.set_num_threads(threads)
    pre = Patchcore.configure_pre_processor().transform

    def load(p: Path) -> torch.Tensor:  # anomalib reads images as float in 0..1
        return decode_image(str(p), mode=ImageReadMode.RGB).float().div(255.0)

    model = PatchcoreModel(layers=["layer2", "layer3"], backbone=backbone, pre_trained=False, num_neighbors=9)
    train = _images(train_dir)
    t0 = time.perf_counter()
    model.train()
    with torch.no_grad():
        for i in range(0, len(train), 32):  # anomalib's default train batch size
            batch = torch.stack([pre(load(p)) for p in train[i : i + 32]])
            model(batch)
    model.subsample_embedding(sampling_ratio=0.1)
    fit_s = time.perf_counter() - t0
    model.eval()

    def run(frame: torch.Tensor) -> float:
        with torch.no_grad():
            return float(model(pre(frame).unsqueeze(0)).pred_score)

    files, labels = _test_set(data)
    frames = [load(p) for p in files]
    latency = _latency(run, [frames[i] for i in range(0, len(frames), 3)], runs, warmup=3)
    scores = [run(f) for f in frames]
    return {
        "name": f"anomalib PatchCore {backbone} (random weights)",
        "fit_s": round(fit_s, 1),
        "latency_ms": latency,
        "memory_bank": list(model.memory_bank.shape),
        "image_auroc": round(_auroc(labels, scores), 4),
        "auroc_comparable": False,
        "published_auroc": PUBLISHED[backbone],
    }


# ------------------------------------------------------------------ anomalyd side
def side_anomalyd(data: Path, runs: int, threads: int, work: Path, train_dir: Path) -> dict[str, Any]:
    import anomalyd  # noqa: F401  (sets the OpenMP wait policy first)

    # isort: split
    import torch

    from anomalyd.config import SearchConfig
    from anomalyd.engines.auto_engine import AutoEngineConfig
    from anomalyd.engines.select import open_inspector
    from anomalyd.model.bundle import load_bundle
    from anomalyd.model.images import read_rgb
    from anomalyd.training.fit import fit

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    manifest = fit(train_dir, work / "bundle")
    fit_s = time.perf_counter() - t0
    inspector = open_inspector(load_bundle(work / "bundle"), AutoEngineConfig(threads=threads), SearchConfig())
    files, labels = _test_set(data)
    frames = [read_rgb(p) for p in files]
    latency = _latency(
        lambda f: inspector.inspect(f).score, [frames[i] for i in range(0, len(frames), 3)], runs, warmup=5
    )
    scores = [inspector.inspect(f).score for f in frames]
    return {
        "name": f"anomalyd default ({inspector.engine_name}, EfficientNet-Lite0 ImageNet)",
        "fit_s": round(fit_s, 1),
        "latency_ms": latency,
        "memory_bank": [manifest["memory_bank_size"], manifest["feature_dim"]],
        "image_auroc": round(_auroc(labels, scores), 4),
        "auroc_comparable": True,
    }


# ------------------------------------------------------------------ orchestration
def run_side(python: str, args: list[str], threads: int) -> dict[str, Any]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    out = subprocess.run([python, __file__, *args], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/mvtec_bottle"))
    parser.add_argument("--peer-python", default=".venv-peer/bin/python")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--runs", type=int, default=100, help="timed frames for anomalyd")
    parser.add_argument("--peer-runs", type=int, default=28, help="timed frames per anomalib model (slow)")
    parser.add_argument("--out", type=Path, default=Path("var/peer"))
    parser.add_argument(
        "--train-limit",
        type=int,
        default=60,
        help="fit both sides on the first N good images (0: all; anomalib's 10 %% coreset on all 209 bottle "
        "images takes about an hour per model on 2 cores)",
    )
    parser.add_argument("--side", choices=["anomalib", "anomalyd"], help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="wide_resnet50_2", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:
        work = args.out / "anomalyd_side"
        work.mkdir(parents=True, exist_ok=True)
        train_dir = _train(args.data, args.train_limit, args.out)
        if args.side == "anomalib":
            result = side_anomalib(args.data, args.backbone, args.peer_runs, args.threads, train_dir)
        else:
            result = side_anomalyd(args.data, args.runs, args.threads, work, train_dir)
        result["train_images"] = len(_images(train_dir))
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        print(json.dumps(result))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    common = [
        "--data",
        str(args.data),
        "--threads",
        str(args.threads),
        "--out",
        str(args.out),
        "--runs",
        str(args.runs),
        "--peer-runs",
        str(args.peer_runs),
        "--train-limit",
        str(args.train_limit),
    ]
    ours = run_side(sys.executable, ["--side", "anomalyd", *common], args.threads)
    peers = {
        bb: run_side(args.peer_python, ["--side", "anomalib", "--backbone", bb, *common], args.threads)
        for bb in ("wide_resnet50_2", "resnet18")
    }
    rows = ["| figure | anomalyd | anomalib WRN50 | ratio | anomalib resnet18 | ratio |", "|---|---|---|---|---|---|"]

    def fig(name: str, get: Any, fmt: str = "{:.1f}") -> None:
        a = get(ours)
        w, r = get(peers["wide_resnet50_2"]), get(peers["resnet18"])
        rows.append(f"| {name} | {fmt.format(a)} | {fmt.format(w)} | {a / w:.3f} | {fmt.format(r)} | {a / r:.3f} |")

    fig("fit, s", lambda d: d["fit_s"])
    fig("latency p50, ms", lambda d: d["latency_ms"]["p50"])
    fig("latency p99, ms", lambda d: d["latency_ms"]["p99"])
    fig("peak RSS, MiB", lambda d: d["peak_rss_mib"], "{:.0f}")
    fig("memory bank, floats", lambda d: d["memory_bank"][0] * d["memory_bank"][1], "{:,.0f}")
    rows.append(
        f"| image AUROC | {ours['image_auroc']:.3f} | {peers['wide_resnet50_2']['image_auroc']:.3f} "
        f"(random weights; published {PUBLISHED['wide_resnet50_2']}) | not comparable | "
        f"{peers['resnet18']['image_auroc']:.3f} (random weights) | not comparable |"
    )
    table = "\n".join(rows) + "\n"
    note = (
        f"\nSame machine, same run, {args.threads} CPU threads, {args.data.name}, fit on the same "
        f"{ours['train_images']} good images; timed frames: anomalyd "
        f"{ours['latency_ms']['n']}, anomalib {peers['resnet18']['latency_ms']['n']} per model (so its p99 is "
        "close to its maximum). Memory banks: anomalyd "
        f"{ours['memory_bank']}, anomalib WRN50 {peers['wide_resnet50_2']['memory_bank']}, resnet18 "
        f"{peers['resnet18']['memory_bank']}.\n"
    )
    print(table + note)
    (args.out / "peer.json").write_text(json.dumps({"anomalyd": ours, "anomalib": peers}, indent=2) + "\n")
    (args.out / "peer.md").write_text(table + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
