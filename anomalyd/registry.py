"""Backends register themselves under the ``type`` key that the YAML names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


class Registry:
    """A name → backend class table, filled by a decorator in each backend's module."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Any] = {}

    def register(self, key: str) -> Callable[[T], T]:
        def deco(cls: T) -> T:
            self._entries[key] = cls
            return cls

        return deco

    def __getitem__(self, key: str) -> Any:
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"no {self.kind} backend {key!r}; known: {', '.join(self._entries)}") from None

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)
