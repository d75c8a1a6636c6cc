"""Backends register themselves, with their settings class, under the ``type`` key that the YAML names.

A backend is one module in its registry's package (a PLC link in ``anomalyd/drivers/plc/``, a
camera in ``anomalyd/drivers/camera/``, an extractor engine ``anomalyd/engines/<name>_engine.py``)
holding its settings class (``type: Literal[KEY]``) and its implementation, decorated with
``@REGISTRY.register(SettingsClass)``. The registry finds the modules itself
(``pkgutil.iter_modules``): the config unions, the CLI's choices and ``plc-layout`` come from it,
so adding a backend touches its file and its tests. A backend module keeps heavy imports
(snap7, asyncua, torch, TensorRT, OpenVINO) inside its functions: discovery imports every one.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Generic, TypeVar, Union

from pydantic import Field

B = TypeVar("B")


class Registry(Generic[B]):
    """A name → (settings class, backend) table, filled by a decorator in each backend's module."""

    def __init__(self, kind: str, package: str, suffix: str = "") -> None:
        self.kind = kind
        self.package = package
        self.suffix = suffix
        self._entries: dict[str, tuple[type[Any], B]] = {}
        self._found = False
        self._lock = threading.RLock()

    def register(self, settings: type[Any]) -> Callable[[B], B]:
        """Decorator: ``backend`` (a class or factory) is built for files whose ``type`` is the settings' key."""
        key = settings.model_fields["type"].default
        if not isinstance(key, str):
            raise TypeError(f"{settings.__name__}.type needs a default (its Literal key)")

        def deco(backend: B) -> B:
            if key in self._entries and self._entries[key][1] is not backend:
                raise ValueError(f"two {self.kind} backends named {key!r}")
            self._entries[key] = (settings, backend)
            return backend

        return deco

    def discover(self) -> None:
        """Import every module of the package (those ending in ``suffix``), so each registers itself."""
        if self._found:
            return
        with self._lock:
            if self._found:
                return
            self._found = True  # a module that asks the registry while it is imported sees what is found so far
            try:
                package = importlib.import_module(self.package)
                for info in pkgutil.iter_modules(package.__path__):
                    if info.name.startswith("_") or not info.name.endswith(self.suffix):
                        continue
                    importlib.import_module(f"{self.package}.{info.name}")
            except BaseException:
                self._found = False
                raise

    def settings(self) -> list[type[Any]]:
        """The settings classes in the order the modules were found (alphabetical)."""
        self.discover()
        return [settings for settings, _ in self._entries.values()]

    def union(self) -> Any:
        """The pydantic union a config field takes: one settings class per backend, chosen by ``type``."""
        classes = tuple(self.settings())
        return Annotated[Union[classes], Field(discriminator="type")]  # noqa: UP007  (a runtime tuple)

    def settings_for(self, key: str) -> type[Any]:
        return self._entry(key)[0]

    def __getitem__(self, key: str) -> B:
        return self._entry(key)[1]

    def _entry(self, key: str) -> tuple[type[Any], B]:
        self.discover()
        try:
            return self._entries[key]
        except KeyError:
            raise KeyError(f"no {self.kind} backend {key!r}; known: {', '.join(self._entries)}") from None

    def __contains__(self, key: str) -> bool:
        self.discover()
        return key in self._entries

    def __iter__(self) -> Iterator[str]:
        self.discover()
        return iter(list(self._entries))
