"""What every settings class is made of: documented fields, strict sections, paths relative to the file.

A backend's settings class lives in the backend's own file beside its implementation
(``type: Literal[KEY]``); ``anomalyd.config`` gathers them from the registries. So this
module, and every backend module at import time, stays free of heavy packages: validating
a file (``check-config``) imports no torch, snap7, asyncua, OpenCV, TensorRT or OpenVINO.
"""

from __future__ import annotations

import ipaddress
import typing
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field


def setting(default: Any, title: str, description: str, unit: str | None = None, **bounds: Any) -> Any:
    """A documented field: title, description, unit and bounds in one place."""
    extra: dict[str, Any] | None = {"unit": unit} if unit else None
    return Field(default, title=title, description=description, json_schema_extra=extra, **bounds)


class Section(BaseModel):
    """Base of every section: unknown keys are errors, not silently ignored."""

    # allow_inf_nan=False: `.inf` or `.nan` is never a threshold, a budget or a timeout.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BackendSettings(Section):
    """A backend's settings: the ``type`` key names the backend (each subclass narrows it to a Literal)."""

    type: str


class _FromTheFile:
    """Marks a path field: a relative path in the file is relative to the file's folder."""

    def __repr__(self) -> str:
        return "relative to the config file"


RELATIVE_TO_FILE = _FromTheFile()
# Every path setting is a ConfigPath, so the loader resolves each one without a list of them.
ConfigPath = Annotated[Path, RELATIVE_TO_FILE]


def _marked(annotation: Any) -> bool:
    if typing.get_origin(annotation) is Annotated and RELATIVE_TO_FILE in annotation.__metadata__:
        return True
    return any(_marked(arg) for arg in typing.get_args(annotation))


def _resolved(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else base / value
    if isinstance(value, list):
        return [_resolved(v, base) for v in value]
    return value


V = TypeVar("V")


def resolve_paths(value: V, base: Path) -> V:
    """A copy of ``value`` (a section, or dicts and lists of them) with every ConfigPath made absolute."""
    if isinstance(value, dict):
        return {k: resolve_paths(v, base) for k, v in value.items()}  # type: ignore[return-value]
    if isinstance(value, list | tuple) and any(isinstance(v, BaseModel) for v in value):
        return type(value)(resolve_paths(v, base) for v in value)  # type: ignore[return-value]
    if not isinstance(value, BaseModel):
        return value
    update: dict[str, Any] = {}
    for name, field in type(value).model_fields.items():
        current = getattr(value, name)
        if RELATIVE_TO_FILE in field.metadata or _marked(field.annotation):
            update[name] = _resolved(current, base)
        elif isinstance(current, BaseModel | dict | list | tuple):
            update[name] = resolve_paths(current, base)
    return value.model_copy(update=update)


def is_loopback(host: str) -> bool:
    """True for localhost and 127.0.0.0/8, ::1: addresses no other machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def ranges_overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Half-open ranges [start, end) share an element."""
    return a[0] < b[1] and b[0] < a[1]


def refuse_keys(data: Any, refused: dict[str, str]) -> Any:
    """Settings a backend inherits but cannot honour: an error that says what to do, never silently ignored."""
    if isinstance(data, dict):
        for key, why in refused.items():
            if key in data:
                raise ValueError(f"{key}: {why}; remove the key")
    return data


class Roi(Section):
    x: int = setting(0, "ROI left", "Left edge of the crop in sensor pixels.", "px", ge=0, le=65535)
    y: int = setting(0, "ROI top", "Top edge of the crop in sensor pixels.", "px", ge=0, le=65535)
    width: int = setting(..., "ROI width", "Width of the crop in sensor pixels.", "px", gt=0, le=65535)
    height: int = setting(..., "ROI height", "Height of the crop in sensor pixels.", "px", gt=0, le=65535)
