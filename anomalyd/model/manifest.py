"""The typed manifest: what a bundle's model is, read once and passed as an object.

``fit`` builds a :class:`ModelSpec` from its settings, scores its hold-out with
it, and writes it into ``manifest.json``; the runtime, ``score`` and ``eval``
parse the same fields back (refusing a hand-edited or out-of-range value) and
hand the object to :class:`anomalyd.model.scoring.Scorer`. No module reads the
model's shape from string keys of a dict.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Roi = tuple[int, int, int, int]  # x, y, width, height in the camera frame


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)


class Normalisation(_Strict):
    mean: tuple[float, float, float]
    std: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]]


class MapSpec(_Strict):
    """Patch distances → anomaly map → image score."""

    sigma: float = Field(ge=0, le=100)
    # "max": the map's highest pixel. "top_k": the mean of the ``top_k`` highest
    # patch cells of the blurred map, which one bright pixel of noise cannot set alone.
    image_score: Literal["max", "top_k"] = "max"
    top_k: int = Field(default=1, ge=1, le=4096)


class MemorySpec(_Strict):
    """How a patch is compared with the good parts.

    ``global``: with every remembered good patch, wherever it was (PatchCore);
    parts may move and turn. ``local``: only with the good patches remembered
    within ``radius`` feature cells of the same place, ``per_cell`` of them per
    cell; for fixtured parts, where a feature that is normal elsewhere is a
    defect here (a missing or moved component).
    """

    kind: Literal["global", "local"] = "global"
    radius: int = Field(default=0, ge=0, le=16)
    per_cell: int = Field(default=0, ge=0, le=4096)


class HoldoutStats(_Strict):
    p50: float = Field(ge=0)


class Calibration(_Strict):
    reference_raw: float = Field(gt=0)
    holdout_normalised: HoldoutStats | None = None


class Thresholds(_Strict):
    suggested_image: float = Field(gt=0, le=1000)


class HeadSpec(_Strict):
    """The supervised head (``head.npz``): a per-cell MLP learned from labelled defects."""

    hidden: int = Field(ge=0, le=4096)
    use_distance: bool = True
    context: int = Field(0, ge=0, le=4)  # neighbourhood radius in cells whose mean features are an input
    balance: float | None = Field(None, ge=0, le=1)  # how defect cells were weighted (None: before it was recorded)
    defect_images: int = Field(ge=1)
    masked_images: int = Field(ge=0)
    # The head reads the extractor's channels from here on: 0 (the frozen features), or past the frozen first
    # tap when the bundle has a learned stage (then: the frozen deeper taps, then the learned stage).
    first_channel: int = Field(0, ge=0, le=65536)


class LearnedSpec(_Strict):
    """A copy of the first tap's stage, fine-tuned with the head on the labelled defects (in ``extractor.pt``
    and ``extractor.onnx``): its ``channels`` follow the frozen features in the extractor's output."""

    stage: str
    channels: int = Field(gt=0, le=65536)
    steps: int = Field(ge=0)
    masked_images: int = Field(ge=1)


class ModelSpec(_Strict):
    """Everything that decides how a frame becomes a score (calibration aside)."""

    backbone: str
    taps: tuple[str, ...]
    proj_dim: int | None = Field(default=None, gt=0)
    input_size: tuple[Annotated[int, Field(ge=32, le=8192)], Annotated[int, Field(ge=32, le=8192)]]
    roi: Roi | None = None
    normalisation: Normalisation
    feature_dim: int = Field(gt=0, le=65536)
    feature_grid: tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]
    memory_bank_size: int = Field(gt=0)
    map: MapSpec
    memory: MemorySpec = MemorySpec()
    head: HeadSpec | None = None  # None: good parts only
    learned: LearnedSpec | None = None  # None: the pretrained network only
    # The memory is searched in the bank's first N principal components (search_projection.npz); None: all.
    search_projection: int | None = Field(default=None, gt=0, le=65536)

    @property
    def extractor_dim(self) -> int:
        """Channels the extractor gives: the memory's ``feature_dim``, then the learned stage's."""
        return self.feature_dim + (self.learned.channels if self.learned is not None else 0)

    @property
    def cells(self) -> int:
        return self.feature_grid[0] * self.feature_grid[1]

    @property
    def bank_shape(self) -> tuple[int, int]:
        """Rows and columns of ``memory_bank.npy`` (a local bank is ``per_cell`` rows per cell, cell-major)."""
        return self.memory_bank_size, self.feature_dim


class Manifest(ModelSpec):
    """A fitted bundle's manifest: the model plus its calibration and thresholds."""

    calibration: Calibration
    thresholds: Thresholds
    files: dict[str, str] = {}
