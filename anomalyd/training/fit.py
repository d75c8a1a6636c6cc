"""Fit a PatchCore model on good images and write a bundle."""

from __future__ import annotations

import datetime as dt
import random
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomalyd import __version__
from anomalyd.engines.base import Searcher, resolve_device
from anomalyd.engines.search import LocalSearcher, TorchSearcher
from anomalyd.model import bundle as bundle_io
from anomalyd.model.backbones import BACKBONES
from anomalyd.model.calibrate import calibration, suggest_thresholds
from anomalyd.model.coreset import greedy_coreset, greedy_coreset_torch, pca_projection
from anomalyd.model.export import export_onnx
from anomalyd.model.features import (
    PatchFeatures,
    build_patch_features,
    feature_dim,
    feature_stride,
    learnable_stage,
    learned_channels,
)
from anomalyd.model.head import Head
from anomalyd.model.images import list_images, read_rgb
from anomalyd.model.manifest import ModelSpec
from anomalyd.model.nearest import nearest_distances
from anomalyd.model.scoring import Preprocessor, Scorer
from anomalyd.training.head_training import HeadSettings, cross_fit_parts, near_defect, train_head, uses_bags
from anomalyd.training.learn_features import LearnSettings, learn_stage, stage_inputs, wanted

ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclass(frozen=True)
class FitSettings:
    """Choices that shape the model; the defaults are the measured ones (docs/accuracy.md)."""

    backbone: str = "efficientnet_lite0"
    taps: tuple[str, ...] = ("stage3", "stage5")
    # None: keep the (ROI'd) frame's aspect ratio, ``short_side`` pixels on its short
    # side; a 1130x460 frame becomes 224x544 instead of being squashed to 224x224.
    input_size: tuple[int, int] | None = None
    short_side: int = 224
    max_side: int = 1024
    # The smallest defect to find (frame pixels of area): with it the input is sized so that it spans
    # a few feature cells (defect_short_side); fit --defects with masks takes it from the masks.
    smallest_defect_px: float | None = None
    proj_dim: int | None = None
    coreset_ratio: float = 0.01
    coreset_max: int = 16384
    # A few dozen training images at 1 % leave a bank of a few hundred patches, too few to cover
    # the part's ordinary variation (measured on the sample part: good parts up to 1.16 with 165 patches).
    coreset_min: int = 1024
    coreset_projection: int = 64
    holdout_fraction: float = 0.1
    sigma: float = 4.0
    image_score: str = "max"  # or "top_k": mean of the top_k hottest feature cells of the map
    top_k: int = 1
    memory: str = "global"  # or "local": position-aware, for fixtured parts
    local_radius: int = 1
    local_per_cell: int = 32
    batch_size: int = 16
    # Where fit extracts features and runs the coreset: "auto" takes CUDA when torch sees a GPU.
    device: str = "auto"
    seed: int = 0
    head: HeadSettings = field(default_factory=HeadSettings)  # used only when fit is given labelled defects
    # … and the stage learned with it (learn_features: with masks on enough defective images)
    learn: LearnSettings = field(default_factory=LearnSettings)
    # With a head, the memory is searched in the bank's first N principal components (0: all features):
    # on BSData 32 (and 48) of 152 gave the same cross-validated AUROC and escapes at a fifth of the search cost
    # (docs/accuracy.md); 16 did too there, but on the tests' small line it rejected 3 of 8 good parts, so 16
    # is BSData's documented setting, not the default. The good-parts-only model always searches all features.
    search_dims: int = 32
    weights: Path | None = None
    roi: tuple[int, int, int, int] | None = None  # x, y, width, height applied before resizing


def _no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None


def aspect_input_size(frame_hw: tuple[int, int], short_side: int = 224, max_side: int = 1024) -> tuple[int, int]:
    """Model input (height, width) with the frame's aspect ratio: short side ``short_side``, multiples of 32."""
    h, w = frame_hw
    scale = short_side / min(h, w)

    def snap(v: float) -> int:
        return int(min(max(32, round(v / 32) * 32), max_side))

    return snap(h * scale), snap(w * scale)


class OnnxFitExtractor:
    """The freshly exported network under ONNX Runtime: fit's CPU work (features, the head's inputs,
    calibration) runs what the daemon runs, and faster: a 448x1120 frame took 45 ms against 288 ms with
    torch's eager module on 2 cores (500 ms a frame in batches of 16)."""

    name = "onnxruntime-fit"

    def __init__(self, onnx: bytes, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.device = torch.device("cpu")

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        # One image a run: larger batches at these sizes only thrash the cache.
        array = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.cat([torch.from_numpy(self.session.run(None, {self.input: x[None]})[0]) for x in array])

    def close(self) -> None:
        del self.session


def _batches(items: list[Path], size: int) -> Iterable[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


CELLS_PER_DEFECT = 2.5  # a defect should span at least this many feature cells across


def defect_short_side(frame_short: int, stride: int, smallest_defect_px: float, short_side: int = 224) -> int:
    """The model input's short side so that the smallest defect spans ``CELLS_PER_DEFECT`` cells.

    A defect of area A frame pixels is about d = 2·sqrt(A/π) across; a feature cell
    covers ``stride`` input pixels, i.e. stride·frame_short/input_short frame pixels.
    Wanting d ≥ 2.5 cells gives input_short = 2.5·stride·frame_short/d, never below
    the default and never above the frame (no upsampling). BSData: pits of 300 px
    (d ≈ 20), stride 8, 460-pixel frames → 460, i.e. the frame's own resolution.
    """
    d = 2.0 * float(np.sqrt(max(smallest_defect_px, 1.0) / np.pi))
    wanted = CELLS_PER_DEFECT * stride * frame_short / d
    return int(min(frame_short, max(short_side, wanted)))


def _input_size(files: list[Path], settings: FitSettings) -> tuple[int, int]:
    if settings.input_size is not None:
        return settings.input_size
    first = read_rgb(files[0])
    hw = (settings.roi[3], settings.roi[2]) if settings.roi else (first.shape[0], first.shape[1])
    if settings.smallest_defect_px is not None:
        stride = feature_stride(settings.backbone, settings.taps)
        short = defect_short_side(min(hw), stride, settings.smallest_defect_px, settings.short_side)
        return aspect_input_size(hw, short, max(settings.max_side, max(hw) + 32))
    return aspect_input_size(hw, settings.short_side, settings.max_side)


def extract_features(
    model: nn.Module,
    files: list[Path],
    settings: FitSettings,
    progress: Callable[[int], None],
    extractor: OnnxFitExtractor | None = None,
) -> torch.Tensor:
    """[N, C, h, w] patch features of the files on the CPU, in batches (the runtime's preprocessing).

    The CPU resizes (as the CPU runtime does); the network runs on the fit device, or under ONNX Runtime
    when ``extractor`` is given (fit does so on the CPU).
    """
    device = resolve_device(settings.device)
    prepare = Preprocessor(_input_size(files, settings), settings.roi, torch.device("cpu"))
    if extractor is None:
        model.to(device)
    out = []
    with torch.inference_mode():
        for chunk in _batches(files, settings.batch_size):
            batch = prepare.batch([read_rgb(p) for p in chunk])
            out.append(extractor.extract(batch) if extractor is not None else model(batch.to(device)).cpu())
            progress(len(chunk))
    if extractor is None:
        model.to("cpu")
    return torch.cat(out)


def split_holdout(files: list[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """(train, holdout): a seeded random share held back for calibration (at least 1)."""
    if len(files) < 2:
        raise ValueError(f"fit needs at least 2 good images, found {len(files)}")
    shuffled = files[:]
    random.Random(seed).shuffle(shuffled)
    n_hold = min(max(1, round(len(files) * fraction)), len(files) - 1)
    return sorted(shuffled[n_hold:]), sorted(shuffled[:n_hold])


def score_files(scorer: Scorer, files: list[Path], batch_size: int, progress: Callable[[int], None]) -> np.ndarray:
    """Raw image scores of the files, through the runtime's scoring path."""
    out = []
    for chunk in _batches(files, batch_size):
        out.append(scorer.score_frames([read_rgb(p) for p in chunk]))
        progress(len(chunk))
    return np.concatenate(out)


def local_bank(
    feats: torch.Tensor, radius: int, per_cell: int, progress: Callable[[int], None] = lambda _n: None
) -> torch.Tensor:
    """Position-aware memory ``[cells · per_cell, C]``: per cell, ``per_cell`` training patches
    from within ``radius`` cells of it, chosen by greedy k-center (cell-major rows).

    Rows of the grid are done one at a time so memory stays at one row's candidates.
    """
    n, c, gh, gw = feats.shape
    k = 2 * radius + 1
    padded = F.pad(feats, (radius, radius, radius, radius), mode="replicate")
    rows = []
    for i in range(gh):
        band = padded[:, :, i : i + k, :]  # [n, c, k, gw + 2r]
        cand = F.unfold(band, kernel_size=k)  # [n, c·k·k, gw]
        cand = cand.reshape(n, c, k * k, gw).permute(3, 0, 2, 1).reshape(gw, n * k * k, c).contiguous()
        rows.append(_greedy_per_cell(cand, per_cell))
        progress(1)
    return torch.cat(rows).reshape(-1, c)


def _greedy_per_cell(cand: torch.Tensor, count: int) -> torch.Tensor:
    """``[P, K, C]`` candidates → ``[P, count, C]`` chosen by greedy k-center, all cells at once.

    The first centre of a cell is the candidate nearest the cell's mean (the
    most typical patch), then always the candidate farthest from those chosen.
    Fewer than ``count`` distinct candidates repeat the last choice (harmless for a minimum).
    """
    p, k, _ = cand.shape
    sq = (cand * cand).sum(-1)  # [P, K]
    mean = cand.mean(1, keepdim=True)
    current = ((cand - mean) ** 2).sum(-1).argmin(1)  # [P]
    min_d = torch.full((p, k), float("inf"))
    chosen = torch.empty(p, count, dtype=torch.long)
    index = torch.arange(p)
    for step in range(count):
        chosen[:, step] = current
        centre = cand[index, current]  # [P, C]
        d = sq - 2.0 * torch.bmm(cand, centre.unsqueeze(-1)).squeeze(-1) + (centre * centre).sum(-1, keepdim=True)
        torch.minimum(min_d, d, out=min_d)
        current = min_d.argmax(1)
    return cand[index[:, None], chosen]


def build_memory(
    feats: torch.Tensor, settings: FitSettings, progress: ProgressFactory = _no_progress
) -> tuple[torch.Tensor, dict[str, object]]:
    """The memory bank from the training features ``[N, C, h, w]``, and its manifest entry."""
    c, gh = feats.shape[1], feats.shape[2]
    if settings.memory == "local":
        bank = local_bank(feats, settings.local_radius, settings.local_per_cell, progress("local memory", gh))
        return bank, {"kind": "local", "radius": settings.local_radius, "per_cell": settings.local_per_cell}
    if settings.memory != "global":
        raise ValueError(f"memory {settings.memory!r}: global or local")
    flat = feats.permute(0, 2, 3, 1).reshape(-1, c).numpy()
    wanted = max(round(flat.shape[0] * settings.coreset_ratio), settings.coreset_min)
    count = min(settings.coreset_max, flat.shape[0], max(1, wanted))
    device = resolve_device(settings.device)
    if device.type == "cuda":
        chosen = greedy_coreset_torch(
            flat, count, settings.coreset_projection, settings.seed, str(device), progress("coreset", count)
        )
    else:
        chosen = greedy_coreset(flat, count, settings.coreset_projection, settings.seed, progress("coreset", count))
    return torch.from_numpy(np.ascontiguousarray(flat[chosen])), {"kind": "global"}


def _taught(folder: Path) -> int:
    """Images an `anomalyd teach` put in ``folder`` (its sources.jsonl), 0 for a plain folder."""
    sources = folder / "sources.jsonl"
    if not sources.is_file():
        return 0
    return sum(1 for line in sources.read_text(encoding="utf-8").splitlines() if line.strip())


@dataclass(frozen=True)
class Defect:
    """A labelled defective image: its defect type (folder name) and, optionally, its mask."""

    image: Path
    defect_type: str
    mask: Path | None = None


def mask_area(defect: Defect) -> int:
    """Defect pixels in the image's mask (0 without one)."""
    if defect.mask is None:
        return 0
    mask = cv2.imread(str(defect.mask), cv2.IMREAD_GRAYSCALE)
    return int(np.count_nonzero(mask)) if mask is not None else 0


def defect_cells(defect: Defect, grid: tuple[int, int], roi: tuple[int, int, int, int] | None) -> np.ndarray | None:
    """``[h·w]`` True on the feature cells a mask touches (None without a mask)."""
    if defect.mask is None:
        return None
    mask = cv2.imread(str(defect.mask), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{defect.mask}: not a readable mask")
    if roi is not None:
        x, y, w, h = roi
        mask = mask[y : y + h, x : x + w]
    small = cv2.resize((mask > 0).astype(np.float32), (grid[1], grid[0]), interpolation=cv2.INTER_AREA)
    return (small > 0).ravel()


def learn_head(
    scorer: Scorer,
    model: nn.Module,
    defects: list[Defect],
    good: list[Path],
    settings: FitSettings,
    progress: ProgressFactory = _no_progress,
    full_bank: torch.Tensor | None = None,
    lap: Callable[[str], None] = lambda _stage: None,
) -> tuple[Head, dict[str, object], PatchFeatures | None]:
    """The supervised head from labelled defects and good images held back from the memory, and the
    network with a learned stage where ``settings.learn`` says so (None: the frozen one stays).

    ``full_bank``: the memory in all features, where the search runs in a projection; an image-level
    label's unsure cells are then found by the distance in all features (BSData, 20 image labels, 16
    components: 44 % escapes at 2 % false rejects, against 78 % by the projection's distance).
    """
    spec = scorer.spec
    files = [d.image for d in defects] + good
    cpu_network = scorer.extractor if isinstance(scorer.extractor, OnnxFitExtractor) else None
    on_cpu = cpu_network if resolve_device(settings.device).type == "cpu" else None
    feats = extract_features(model, files, settings, progress("labelled", len(files)), on_cpu)
    with torch.inference_mode():
        dist = torch.cat([scorer.search(feats[i : i + 16]) for i in range(0, len(feats), 16)]).numpy()
    cells = feats.permute(0, 2, 3, 1).reshape(len(files), spec.cells, -1).numpy()
    defective = np.r_[np.ones(len(defects), bool), np.zeros(len(good), bool)]
    masks = [defect_cells(d, spec.feature_grid, settings.roi) for d in defects]
    # Images with a mask give defect cells; the others (image-level labels) are learnt from as train_head says.
    positive = np.zeros(dist.shape, bool)
    with_mask = np.zeros(len(files), bool)
    for i, m in enumerate(masks):
        if m is not None:
            positive[i], with_mask[i] = m, True
    masked = int(with_mask.sum())
    unsure_dist = None
    image_level = np.flatnonzero(defective & ~with_mask)  # only these images need their cells ranked …
    bags = uses_bags(settings.head, len(image_level))
    if bags:
        image_level = np.r_[image_level, np.flatnonzero(~defective)]  # … and, as bags, the good ones too
    if full_bank is not None and len(image_level):
        unsure_dist = dist.copy()
        with torch.inference_mode():
            for row in image_level.tolist():
                unsure_dist[row] = nearest_distances(torch.from_numpy(cells[row]), full_bank).numpy()
    head = train_head(
        cells, dist, positive, defective, settings.head, spec.feature_grid, settings.seed, with_mask, unsure_dist
    )
    learned = None
    lap("head")
    if wanted(settings.learn, masked) and _can_learn(settings):
        unlabelled = defective & ~with_mask
        learned, head = _learn_stage(
            head, files, cells, dist, positive, unlabelled, spec.feature_grid, settings, progress
        )
    entry = {
        "hidden": settings.head.hidden,
        "use_distance": settings.head.use_distance,
        "context": settings.head.context,
        "balance": settings.head.balance,
        "bags": bags,  # as used: see HeadSettings.bags_min_images
        "ensemble": settings.head.ensemble,
        "cross_fit": cross_fit_parts(settings.head, int((defective & ~with_mask).sum())),  # as used
        "defect_images": len(defects),
        "masked_images": masked,
        "defect_types": sorted({d.defect_type for d in defects}),
        "good_negatives": len(good),
        "first_channel": head.first_channel,
    }
    return head, entry, learned


def _can_learn(settings: FitSettings) -> bool:
    """A stage is learnt with a head on each cell and its distance; ``learn: on`` says when it cannot be."""
    reason = None
    if learnable_stage(settings.backbone, settings.taps, settings.proj_dim) is None:
        reason = f"{settings.backbone} with taps {','.join(settings.taps)} has no stage to learn"
    elif settings.head.context or not settings.head.use_distance:
        reason = "the head has a neighbourhood or no distance input"
    if reason and settings.learn.mode == "on":
        raise ValueError(f"learning a stage from the defects: {reason}")
    return reason is None


def _onnx_bytes(model: nn.Module, size: tuple[int, int]) -> bytes:
    """The module exported (and checked) as the bundle's ``extractor.onnx``."""
    with tempfile.TemporaryDirectory(prefix="anomalyd-fit-") as folder:
        export_onnx(model, size, Path(folder) / bundle_io.EXTRACTOR_ONNX)
        return (Path(folder) / bundle_io.EXTRACTOR_ONNX).read_bytes()


def _learn_stage(
    head: Head,
    files: list[Path],
    cells: np.ndarray,
    dist: np.ndarray,
    positive: np.ndarray,
    unlabelled: np.ndarray,
    grid: tuple[int, int],
    settings: FitSettings,
    progress: ProgressFactory,
) -> tuple[PatchFeatures, Head]:
    """The network with a copy of its first stage learnt from the masked defects (learn_features).

    Negatives: the good images' cells and the masked images' cells away from the defect; the
    image-labelled defective images (``unlabelled``) give neither (where their defect is, the
    masks do not say).
    """
    # Built as the frozen network was (the same weights), with the learned copy starting from them.
    model = build_patch_features(settings.backbone, settings.taps, settings.proj_dim, settings.weights, learned=True)
    negative = ~near_defect(positive, grid, settings.head.ring)
    negative[unlabelled] = False
    prepare = Preprocessor(_input_size(files, settings), settings.roi, torch.device("cpu"))
    tick = progress("learned stage input", len(files))
    maps = []
    for chunk in _batches(files, 4):
        maps.append(stage_inputs(model, prepare.batch([read_rgb(p) for p in chunk])))
        tick(len(chunk))
    tuned = learn_stage(
        settings.backbone, model, head, torch.cat(maps), cells, dist, positive, negative, grid, settings.learn,
        settings.head.balance, settings.seed, progress("learned stage", settings.learn.steps),
    )  # fmt: skip
    return model.eval(), tuned


def fit(
    good_dir: Path | Sequence[Path],
    out_dir: Path,
    settings: FitSettings = FitSettings(),
    val: tuple[list[Path], np.ndarray] | None = None,
    progress: ProgressFactory = _no_progress,
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
    h, w = _input_size(files, settings)
    if h % 32 or w % 32:
        raise ValueError(f"input size {h}x{w}: height and width must be multiples of 32")
    settings = replace(settings, input_size=(h, w))
    model = build_patch_features(settings.backbone, settings.taps, settings.proj_dim, settings.weights)
    # The ONNX export first: the bundle's file, and what fit's CPU work runs on (OnnxFitExtractor).
    onnx = _onnx_bytes(model, (h, w))
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
            onnx = _onnx_bytes(model, (h, w))
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
