"""What the model needs from an engine: an extractor and a searcher (the engines implement them).

The model (scoring, inspection, fit's calibration) is written against these two
interfaces only, so ``anomalyd.model`` never imports ``anomalyd.engines``: engines
depend on the model, not the other way round.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


class Extractor(Protocol):
    """Batch of 0..255 float images ``[B, 3, H, W]`` → patch features ``[B, C, h, w]``."""

    name: str
    device: torch.device

    def extract(self, images: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...


class Searcher(Protocol):
    """Patch features ``[Q, C]`` → distance to the nearest memory-bank patch ``[Q]``."""

    name: str
    device: torch.device

    def search(self, features: torch.Tensor) -> torch.Tensor: ...

    def close(self) -> None: ...
