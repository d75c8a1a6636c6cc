"""What the machine's NVIDIA driver supports against what the installed wheels were built for.

A GPU path that cannot run must say why in terms a person can act on: the
driver's version and the newest CUDA it supports, the CUDA torch and TensorRT
were built for. CUDA 13 builds (PyPI's default torch, ``tensorrt_cu13``) need a
driver of the R580 series or newer; CUDA 12 builds work from R525 on.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import re
from pathlib import Path

# The oldest driver series of each CUDA major (NVIDIA's CUDA compatibility table).
DRIVER_FOR_CUDA = {11: "R450", 12: "R525", 13: "R580"}


def driver_version(proc: Path = Path("/proc/driver/nvidia/version")) -> str | None:
    """The kernel module's version (``550.54.14``), None without an NVIDIA driver."""
    try:
        text = proc.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for \w+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    return found.group(1) if found else None


def driver_cuda() -> tuple[int, int] | None:
    """The newest CUDA the installed driver supports (libcuda's cuDriverGetVersion), None without one."""
    for name in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        if lib.cuDriverGetVersion(ctypes.byref(version)) != 0 or version.value <= 0:
            return None
        return version.value // 1000, (version.value % 1000) // 10
    return None


def torch_cuda_major() -> int | None:
    built = torch_cuda()
    return built[0] if built else None


def torch_cuda() -> tuple[int, int] | None:
    """The CUDA this torch build was compiled for; None for a CPU build."""
    import torch

    built = torch.version.cuda
    if not built:
        return None
    major, minor = (int(x) for x in built.split(".")[:2])
    return major, minor


def tensorrt_cuda() -> int | None:
    """The CUDA major of the installed TensorRT wheel (tensorrt_cu12 / _cu13), None if unknown (JetPack's)."""
    for major in (13, 12, 11):
        for name in (f"tensorrt-cu{major}", f"tensorrt_cu{major}", f"tensorrt-cu{major}-libs"):
            try:
                importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            return major
    return None


def mismatch(built_for: int | None, what: str) -> str | None:
    """Why a build for CUDA ``built_for`` cannot run with this driver; None when it can (or nothing is known)."""
    if built_for is None:
        return None
    supports = driver_cuda()
    if supports is None or supports[0] >= built_for:
        return None
    series = DRIVER_FOR_CUDA.get(built_for, "?")
    return (
        f"{what} is built for CUDA {built_for}, which needs an NVIDIA driver of the {series} series or newer; "
        f"this driver ({driver_version() or 'version unknown'}) supports CUDA "
        f"{supports[0]}.{supports[1]}: install the cu{supports[0]} build (docs/deployment.md) or update the driver"
    )


def describe() -> str:
    """One line for an error message: driver, its CUDA, and what the wheels were built for."""
    supports, torch_built, trt_built = driver_cuda(), torch_cuda(), tensorrt_cuda()
    return (
        f"driver {driver_version() or 'not found'}"
        + (f" (CUDA up to {supports[0]}.{supports[1]})" if supports else "")
        + f"; torch built for {f'CUDA {torch_built[0]}.{torch_built[1]}' if torch_built else 'the CPU'}"
        + (f"; TensorRT for CUDA {trt_built}" if trt_built else "")
    )
