"""The two engine interfaces and their registries.

A backend module registers its class under the ``type`` key the YAML names;
adding a backend touches its own file and the import list in ``select.py``.
An extractor class has ``unavailable(config) -> str | None`` (why it cannot run
here) and is built as ``cls(bundle, config)``; a searcher as ``cls(bank, device, threads)``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from anomalyd.errors import AnomalydError
from anomalyd.registry import Registry


class EngineError(AnomalydError):
    """An engine or search backend cannot be used; the message says why."""


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


EXTRACTORS = Registry("extractor engine")
SEARCHERS = Registry("search")
register_extractor = EXTRACTORS.register
register_searcher = SEARCHERS.register


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; anything else as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
    return device
