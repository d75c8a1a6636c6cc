"""Fit a PatchCore model on good images and write a bundle."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from anomalyd import __version__
from anomalyd.model import bundle as bundle_io
from anomalyd.model.anomaly_map import AnomalyMapper
from anomalyd.model.backbones import BACKBONES
from anomalyd.model.calibrate import calibration, suggest_thresholds
from anomalyd.model.coreset import greedy_coreset
from anomalyd.model.export import export_onnx
from anomalyd.model.features import build_patch_features, feature_dim, feature_stride
from anomalyd.model.images import list_images, read_rgb, resize_for_model, to_batch
from anomalyd.model.nearest import nearest_distances

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class FitSettings:
    """Choices that shape the model; the defaults are the measured ones (README)."""

    backbone: str = "efficientnet_lite0"
    taps: tuple[str, ...] = ("stage3", "stage5")
    input_size: tuple[int, int] = (224, 224)
    proj_dim: int | None = None
    coreset_ratio: float = 0.01
    coreset_max: int = 16384
    coreset_projection: int = 64
    holdout_fraction: float = 0.1
    sigma: float = 4.0
    batch_size: int = 16
    seed: int = 0
    weights: Path | None = None
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height applied before resizing


def _no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


class _Preparer:
    """Image file → model-sized uint8, with the ROI applied (the runtime does the same)."""

    def __init__(self, settings: FitSettings) -> None:
        self.settings = settings

    def __call__(self, path: Path) -> np.ndarray:
        image = read_rgb(path)
        if self.settings.roi:
            x, y, w, h = self.settings.roi
            image = image[y : y + h, x : x + w]
        return resize_for_model(image, self.settings.input_size)


def _batches(items: list[Path], size: int) -> Iterable[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def extract_features(
    model: nn.Module, files: list[Path], settings: FitSettings, progress: Callable[[int], None]
) -> torch.Tensor:
    """[N, C, h, w] patch features of the files, in batches."""
    prepare = _Preparer(settings)
    out = []
    with torch.inference_mode():
        for chunk in _batches(files, settings.batch_size):
            batch = torch.from_numpy(to_batch([prepare(p) for p in chunk]))
            out.append(model(batch))
            progress(len(chunk))
    return torch.cat(out)


def split_holdout(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, holdout): a seeded random share held back for calibration (at least 1)."""
    if len(files) < 2:
        raise ValueError(f"fit needs at least 2 good images, found {len(files)}")
    shuffled = files[:]
    random.Random(seed).shuffle(shuffled)
    n_hold = min(max(1, round(len(files) * fraction)), len(files) - 1)
    return sorted(shuffled[n_hold:]), sorted(shuffled[:n_hold])


def score_files(
    model: nn.Module, bank: torch.Tensor, files: list[Path], settings: FitSettings, progress: Callable[[int], None]
) -> np.ndarray:
    """Raw image scores (max of the blurred map) of the files."""
    feats = extract_features(model, files, settings, progress)
    b, c, h, w = feats.shape
    mapper = AnomalyMapper((h, w), settings.input_size, settings.sigma)
    dist = nearest_distances(feats.permute(0, 2, 3, 1).reshape(-1, c), bank).reshape(b, h * w)
    return mapper(dist).amax(dim=(1, 2)).numpy()


def _taught(folder: Path) -> int:
    """Images an `anomalyd teach` put in ``folder`` (its sources.jsonl), 0 for a plain folder."""
    sources = folder / "sources.jsonl"
    if not sources.is_file():
        return 0
    return sum(1 for line in sources.read_text(encoding="utf-8").splitlines() if line.strip())


def fit(
    good_dir: Path | Sequence[Path],
    out_dir: Path,
    settings: FitSettings = FitSettings(),
    val: tuple[list[Path], np.ndarray] | None = None,
    progress: ProgressFactory = _no_progress,
) -> dict[str, object]:
    """Fit on the images in ``good_dir`` and write a verified bundle to ``out_dir``."""
    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    h, w = settings.input_size
    if h % 32 or w % 32:
        raise ValueError(f"input size {h}x{w}: height and width must be multiples of 32")
    folders = [good_dir] if isinstance(good_dir, Path) else list(good_dir)
    files = sorted({f for folder in folders for f in list_images(folder)})
    sources = [{"folder": str(f), "images": len(list_images(f)), "taught": _taught(f)} for f in folders]
    train, holdout = split_holdout(files, settings.holdout_fraction, settings.seed)
    model = build_patch_features(settings.backbone, settings.taps, settings.proj_dim, settings.weights)
    feats = extract_features(model, train, settings, progress("features", len(train)))
    n, c, gh, gw = feats.shape
    flat = feats.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    count = min(settings.coreset_max, max(1, round(flat.shape[0] * settings.coreset_ratio)))
    chosen = greedy_coreset(flat, count, settings.coreset_projection, settings.seed, progress("coreset", count))
    bank = torch.from_numpy(np.ascontiguousarray(flat[chosen]))
    del flat, feats
    holdout_raw = score_files(model, bank, holdout, settings, progress("calibrate", len(holdout)))
    calib = calibration(holdout_raw)
    thresholds: dict[str, object]
    if val is not None:
        val_raw = score_files(model, bank, val[0], settings, progress("validate", len(val[0])))
        thresholds = suggest_thresholds(val_raw / calib["reference_raw"], val[1])  # type: ignore[operator]
    else:
        thresholds = suggest_thresholds()

    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / bundle_io.MEMORY_BANK, bank.numpy(), allow_pickle=False)
    torch.save(model.state_dict(), out_dir / bundle_io.EXTRACTOR_WEIGHTS)
    export_onnx(model, settings.input_size, out_dir / bundle_io.EXTRACTOR_ONNX)
    spec = BACKBONES[settings.backbone]
    manifest = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "anomalyd_version": __version__,
        "backbone": settings.backbone,
        "taps": list(settings.taps),
        "proj_dim": settings.proj_dim,
        "input_size": [h, w],
        "roi": list(settings.roi) if settings.roi else None,
        "normalisation": {"mean": list(spec.mean), "std": list(spec.std), "input_range": "0..255 float, RGB"},
        "feature_dim": feature_dim(settings.backbone, settings.taps, settings.proj_dim),
        "feature_grid": [gh, gw],
        "feature_stride": feature_stride(settings.backbone, settings.taps),
        "coreset_ratio": settings.coreset_ratio,
        "coreset_projection": settings.coreset_projection,
        "memory_bank_size": int(bank.shape[0]),
        "training_images": len(train),
        "training_sources": sources,
        "training_patches": int(n * gh * gw),
        "map": {"sigma": settings.sigma, "image_score": "max"},
        "calibration": calib,
        "thresholds": thresholds,
        "fit_seconds": round(time.perf_counter() - started, 2),
        "seed": settings.seed,
    }
    return bundle_io.write_manifest(out_dir, manifest)
