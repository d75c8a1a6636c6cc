"""What fit is told: the choices that shape a model (``FitSettings``) and how it reports progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from anomalyd.training.head_training import HeadSettings
from anomalyd.training.learn_features import LearnSettings

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


def no_progress(_label: str, _total: int) -> Callable[[int], None]:
    return lambda _n: None
