"""The two engine interfaces, the settings every extractor engine shares, and their registries.

An extractor engine is one module ``anomalyd/engines/<name>_engine.py``: its settings class
(an ``EngineSettings`` with ``type: Literal[KEY]``) and its class, registered with
``@register_extractor(Settings)``; the class has ``unavailable(config) -> str | None`` (why
it cannot run here) and is built as ``cls(bundle, config, hooks)``. The registry finds the module
itself; the module imports torch and its runtime inside its functions, so that reading a
config file never loads them. A searcher is built as ``cls(bank, device, threads)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from anomalyd.errors import AnomalydError
from anomalyd.model.ports import Extractor, Searcher
from anomalyd.registry import Registry
from anomalyd.settings import BackendSettings, setting

if TYPE_CHECKING:
    import torch

__all__ = [
    "EXTRACTORS",
    "SEARCHERS",
    "EngineError",
    "EngineHooks",
    "EngineSettings",
    "Extractor",
    "Searcher",
    "register_extractor",
    "register_searcher",
    "resolve_device",
]


class EngineError(AnomalydError):
    """An engine or search backend cannot be used; the message says why."""


@dataclass(frozen=True)
class EngineHooks:
    """What an engine may tell its owner while it is being built (passed to every extractor class)."""

    # A TensorRT plan build takes minutes on a Jetson: the daemon extends systemd's start timeout by this long.
    on_long_build: Callable[[float], None] = lambda seconds: None


class EngineSettings(BackendSettings):
    """What every extractor engine's settings have."""

    threads: int = setting(0, "CPU threads", "Threads for CPU work (0: all cores).", ge=0, le=256)


EXTRACTORS: Registry[Any] = Registry("extractor engine", "anomalyd.engines", suffix="_engine")
# The searchers live in search.py; search.type (auto, faiss, torch) names them.
SEARCHERS: dict[str, Any] = {}
register_extractor = EXTRACTORS.register


def register_searcher(key: str) -> Any:
    def deco(cls: Any) -> Any:
        SEARCHERS[key] = cls
        return cls

    return deco


def resolve_device(name: str) -> torch.device:
    """``auto`` → cuda when torch sees a GPU, else cpu; a CUDA device always with its index.

    ``torch.cuda.set_device``, faiss and CUDA-graph capture need the index: a bare
    ``cuda`` would mean "whatever device is current", which is not always ours.
    """
    import torch

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
