"""Fit a PatchCore model on good images (and a head on labelled defects) and write a bundle."""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from anomalyd import __version__
from anomalyd.engines.base import Searcher, resolve_device
from anomalyd.engines.search import LocalSearcher, TorchSearcher
from anomalyd.model import bundle as bundle_io
from anomalyd.model.backbones import BACKBONES
from anomalyd.model.calibrate import calibration, suggest_thresholds
from anomalyd.model.coreset import pca_projection
from anomalyd.model.features import build_patch_features, feature_dim, feature_stride, learned_channels
from anomalyd.model.images import list_images
from anomalyd.model.manifest import ModelSpec
from anomalyd.model.scoring import Scorer
from anomalyd.training.defects import Defect, learn_head, mask_area
from anomalyd.training.extraction import OnnxFitExtractor, extract_features, model_input_size, onnx_bytes, score_files
from anomalyd.training.memory import build_memory
from anomalyd.training.settings import FitSettings, ProgressFactory, no_progress


def split_holdout(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, holdout): a seeded random share held back for calibration (at least 1)."""
    if len(files) < 2:
        raise ValueError(f"fit needs at least 2 good images, found {len(files)}")
    shuffled = files[:]
    random.Random(seed).shuffle(shuffled)
    n_hold = min(max(1, round(len(files) * fraction)), len(files) - 1)
    return sorted(shuffled[n_hold:]), sorted(shuffled[:n_hold])


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
    progress: ProgressFactory = no_progress,
    defects: Sequence[Defect] = (),
) -> dict[str, object]:
    """Fit on the images in ``good_dir`` and write a verified bundle to ``out_dir``.

    With ``defects`` (labelled defective images) a supervised head is learned as
    well; the good images held back are then split: half are the head's good
    examples, half calibrate the score (never images the head has seen).
    """
    started = time.perf_counter()
    stages: dict[str, float] = {}  # seconds per stage, in the manifest: where a slow fit spends its time
    mark = [started]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        stages[stage] = round(stages.get(stage, 0.0) + now - mark[0], 2)
        mark[0] = now

    torch.manual_seed(settings.seed)
    folders = [good_dir] if isinstance(good_dir, Path) else list(good_dir)
    files = sorted({f for folder in folders for f in list_images(folder)})
    sources = [{"folder": str(f), "images": len(list_images(f)), "taught": _taught(f)} for f in folders]
    if defects and settings.smallest_defect_px is None and settings.input_size is None:
        areas = [a for a in (mask_area(d) for d in defects) if a]
        if areas:  # the 10th percentile: one speck of a mask does not force the frame's full size
            settings = replace(settings, smallest_defect_px=float(np.percentile(areas, 10)))
    fraction = settings.holdout_fraction * (2 if defects else 1)
    train, holdout = split_holdout(files, fraction, settings.seed)
    head_good: list[Path] = []
    if defects:
        if len(holdout) < 2:
            raise ValueError("learning from defects needs at least 2 good images held back; give more good images")
        head_good, holdout = holdout[: len(holdout) // 2], holdout[len(holdout) // 2 :]
    h, w = model_input_size(files, settings)
    if h % 32 or w % 32:
        raise ValueError(f"input size {h}x{w}: height and width must be multiples of 32")
    settings = replace(settings, input_size=(h, w))
    model = build_patch_features(settings.backbone, settings.taps, settings.proj_dim, settings.weights)
    # The ONNX export first: the bundle's file, and what fit's CPU work runs on (OnnxFitExtractor).
    onnx = onnx_bytes(model, (h, w))
    network = OnnxFitExtractor(onnx)
    lap("prepare")
    on_cpu = network if resolve_device(settings.device).type == "cpu" else None
    feats = extract_features(model, train, settings, progress("features", len(train)), on_cpu)
    lap("features")
    n, _c, gh, gw = feats.shape
    bank, memory = build_memory(feats, settings, progress)
    del feats
    lap("memory")
    spec = ModelSpec.model_validate(
        {
            "backbone": settings.backbone,
            "taps": settings.taps,
            "proj_dim": settings.proj_dim,
            "input_size": (h, w),
            "roi": settings.roi,
            "normalisation": {"mean": BACKBONES[settings.backbone].mean, "std": BACKBONES[settings.backbone].std},
            "feature_dim": feature_dim(settings.backbone, settings.taps, settings.proj_dim),
            "feature_grid": (gh, gw),
            "memory_bank_size": int(bank.shape[0]),
            "map": {"sigma": settings.sigma, "image_score": settings.image_score, "top_k": settings.top_k},
            "memory": memory,
        }
    )
    bank_np = bank.numpy()
    cpu = torch.device("cpu")
    projection: tuple[np.ndarray, np.ndarray] | None = None
    if defects and spec.memory.kind == "global" and 0 < settings.search_dims < spec.feature_dim:
        projection = pca_projection(bank_np, settings.search_dims)
        spec = ModelSpec.model_validate({**spec.model_dump(), "search_projection": settings.search_dims})
        searcher: Searcher = TorchSearcher(np.ascontiguousarray((bank_np - projection[0]) @ projection[1]), cpu)
    elif spec.memory.kind == "local":
        searcher = LocalSearcher(bank_np, spec, cpu)
    else:
        searcher = TorchSearcher(bank_np, cpu)
    scorer = Scorer(spec, network, searcher, projection=projection)
    head_entry: dict[str, object] | None = None
    if defects:
        # The head learns from the distances the daemon will compute (in the projection, where there is one).
        full = bank if projection is not None else None
        head, head_entry, learned = learn_head(scorer, model, list(defects), head_good, settings, progress, full, lap)
        if learned is not None:
            lap("learned stage")
            # The bundle's network is now the one with the learned stage: exported again, and what calibrates.
            model = learned
            learned_entry = {
                "stage": settings.taps[0],
                "channels": learned_channels(settings.backbone, settings.taps),
                "steps": settings.learn.steps,
                "masked_images": head_entry["masked_images"],
            }
            spec = ModelSpec.model_validate({**spec.model_dump(), "learned": learned_entry})
            onnx = onnx_bytes(model, (h, w))
            network.close()
            network = OnnxFitExtractor(onnx)
            lap("learned stage")
        spec = ModelSpec.model_validate({**spec.model_dump(), "head": head_entry})
        scorer = Scorer(spec, network, searcher, head=head, projection=projection)
    holdout_raw = score_files(scorer, holdout, settings.batch_size, progress("calibrate", len(holdout)))
    calib = calibration(holdout_raw, [str(f) for f in holdout])
    lap("calibrate")
    thresholds: dict[str, object]
    if val is not None:
        val_raw = score_files(scorer, val[0], settings.batch_size, progress("validate", len(val[0])))
        thresholds = suggest_thresholds(holdout_raw, val_raw, val[1], supervised=scorer.head is not None)
    else:
        thresholds = suggest_thresholds(holdout_raw, supervised=scorer.head is not None)

    lap("validate")
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / bundle_io.MEMORY_BANK, bank_np, allow_pickle=False)
    if scorer.head is not None:
        (out_dir / bundle_io.HEAD).write_bytes(scorer.head.to_bytes())
    if projection is not None:
        np.savez(out_dir / bundle_io.PROJECTION, mean=projection[0], basis=projection[1])
    torch.save(model.state_dict(), out_dir / bundle_io.EXTRACTOR_WEIGHTS)
    (out_dir / bundle_io.EXTRACTOR_ONNX).write_bytes(onnx)
    normalisation = spec.normalisation.model_dump()
    manifest = {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "anomalyd_version": __version__,
        **spec.model_dump(mode="json", exclude={"normalisation", "head", "search_projection", "learned"}),
        **({"head": head_entry} if head_entry is not None else {}),
        **({"learned": spec.learned.model_dump(mode="json")} if spec.learned is not None else {}),
        **({"search_projection": spec.search_projection} if spec.search_projection else {}),
        "normalisation": {**normalisation, "input_range": "0..255 float, RGB"},
        "feature_stride": feature_stride(settings.backbone, settings.taps),
        "coreset_ratio": settings.coreset_ratio if spec.memory.kind == "global" else None,
        "coreset_projection": settings.coreset_projection,
        "training_images": len(train),
        "training_sources": sources,
        "training_patches": int(n * gh * gw),
        "calibration": calib,
        "thresholds": thresholds,
        "fit_seconds": round(time.perf_counter() - started, 2),
        "fit_stages_s": {**stages, "write": round(time.perf_counter() - mark[0], 2)},
        "fit_device": resolve_device(settings.device).type,
        "seed": settings.seed,
    }
    return bundle_io.write_manifest(out_dir, manifest)
