"""Where TensorRT plans and timing caches live, and how they are written: no TensorRT needed here.

A plan is valid for one ONNX file, one GPU (name, compute capability, SM count:
Jetson Orin Nano, NX and AGX all call themselves "Orin") and one TensorRT
version; its name says all of them, so a refit in place, a moved bundle or an
upgraded TensorRT builds a new plan instead of loading a wrong one. Files are
written atomically (temporary file, fsync, rename). A timing cache that cannot
be read is set aside, never fatal.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anomalyd.log import get_logger

log = get_logger(__name__)

EXPECTED_BUILD_S = 900.0


@dataclass(frozen=True)
class GpuIdentity:
    """What makes a plan portable or not between two GPUs."""

    name: str
    major: int
    minor: int
    multiprocessors: int

    @property
    def slug(self) -> str:
        name = re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-") or "gpu"
        return f"{name}-sm{self.major}{self.minor}-{self.multiprocessors}mp"


def gpu_identity(device: object) -> GpuIdentity:
    """The identity of a torch CUDA device."""
    import torch

    props = torch.cuda.get_device_properties(device)  # type: ignore[arg-type]
    return GpuIdentity(props.name, props.major, props.minor, props.multi_processor_count)


def plan_file(engines_dir: Path, onnx_sha256: str, gpu: GpuIdentity, trt_version: str, fp16: bool) -> Path:
    precision = "fp16" if fp16 else "fp32"
    return engines_dir / f"{onnx_sha256[:12]}_{gpu.slug}_trt{trt_version}_{precision}.plan"


def timing_cache_file(engines_dir: Path, gpu: GpuIdentity, trt_version: str) -> Path:
    """One timing cache per GPU and TensorRT version: another's is useless or rejected."""
    return engines_dir / f"timing_{gpu.slug}_trt{trt_version}.cache"


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary file and rename: a crash never leaves half a file under the real name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_timing_cache(path: Path) -> bytes:
    """The cache's bytes, or b"" (start afresh) when it is missing or unreadable."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""
    except OSError as exc:
        log.warning("tensorrt.timing_cache_unreadable", file=str(path), error=str(exc))
        return b""


def set_aside(path: Path, why: str) -> None:
    """Move a bad plan or cache out of the way (kept for a post-mortem), so it is rebuilt."""
    target = path.with_name(path.name + ".bad")
    try:
        os.replace(path, target)
        log.warning("tensorrt.file_set_aside", file=str(path), moved_to=str(target), reason=why)
    except OSError as exc:
        log.warning("tensorrt.file_set_aside_failed", file=str(path), error=str(exc))


def announce_build(on_long_build: Callable[[float], None]) -> None:
    """A plan build starts: its owner is told how long it may take (the daemon tells systemd)."""
    on_long_build(EXPECTED_BUILD_S)
