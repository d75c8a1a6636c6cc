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
    """``auto`` → cuda when torch sees a GPU, else cpu; a CUDA device always with its index.

    ``torch.cuda.set_device``, faiss and CUDA-graph capture need the index: a bare
    ``cuda`` would mean "whatever device is current", which is not always ours.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise EngineError(f"device {name!r}: {exc}") from None
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise EngineError(f"device {name!r} asked for, but this torch build sees no CUDA GPU")
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise EngineError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return torch.device("cuda", index)
