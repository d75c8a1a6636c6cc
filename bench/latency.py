"""Per-stage latency of every engine and search backend available here (a benchmark, not a test).

    python bench/latency.py --bundle B --images DIR [--json FILE] [--runs N]

Frames are decoded once before timing (decode excluded) and fed at full size, so
preprocess includes the resize of the whole frame. Prints p50/p99 per stage,
throughput and peak memory per engine, and the limit: the extractor's and the
search's FLOPs against this machine's measured matmul rate, in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any

import anomalyd  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import numpy as np
import torch

from anomalyd.config import SearchConfig
from anomalyd.engines.base import EngineError
from anomalyd.engines.onnxruntime_engine import OnnxRuntimeEngineConfig
from anomalyd.engines.openvino_engine import OpenVinoEngineConfig
from anomalyd.engines.select import open_inspector
from anomalyd.engines.tensorrt_engine import TensorRtEngineConfig
from anomalyd.engines.torch_engine import TorchEngineConfig
from anomalyd.model.bundle import Bundle, load_bundle
from anomalyd.model.images import list_images, read_rgb
from anomalyd.model.inspector import STAGES, Inspector

STAGE_KEYS = (*STAGES, "total")


def combos(threads: int) -> list[tuple[str, Any, SearchConfig]]:
    out: list[tuple[str, Any, SearchConfig]] = [
        ("onnxruntime+faiss", OnnxRuntimeEngineConfig(threads=threads), SearchConfig(type="faiss")),
        ("onnxruntime+torch", OnnxRuntimeEngineConfig(threads=threads), SearchConfig(type="torch")),
        ("openvino+faiss", OpenVinoEngineConfig(threads=threads), SearchConfig(type="faiss")),
        ("torch-cpu+faiss", TorchEngineConfig(device="cpu", threads=threads), SearchConfig(type="faiss")),
    ]
    if torch.cuda.is_available():
        out += [
            ("torch-cuda-fp32+torch", TorchEngineConfig(device="cuda", fp16=False), SearchConfig(type="torch")),
            ("torch-cuda-fp16+torch", TorchEngineConfig(device="cuda", fp16=True), SearchConfig(type="torch")),
            (
                "torch-cuda-fp16-graph+torch",
                TorchEngineConfig(device="cuda", fp16=True, cuda_graph=True),
                SearchConfig(type="torch"),
            ),
            ("tensorrt-fp16+torch", TensorRtEngineConfig(fp16=True), SearchConfig(type="torch")),
        ]
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "mean": round(float(a.mean()), 3),
    }


def measure(inspector: Inspector, frames: list[np.ndarray], runs: int, warmup: int) -> dict[str, Any]:
    for frame in frames[:warmup]:
        inspector.inspect(frame)
    timings: dict[str, list[float]] = {k: [] for k in STAGE_KEYS}
    started = time.perf_counter()
    count = 0
    for i in range(runs):
        result = inspector.inspect(frames[i % len(frames)])
        for k in STAGE_KEYS:
            timings[k].append(result.timings_ms[k])
        count += 1
    wall = time.perf_counter() - started
    out: dict[str, Any] = {f"{k}_ms": percentiles(v) for k, v in timings.items()}
    out["throughput_fps"] = round(count / wall, 2)
    out["frames"] = count
    return out


def matmul_rate(threads: int, device: str = "cpu") -> float:
    """Measured float32 GEMM rate in GFLOP/s, best of several (the "peak" the fractions refer to)."""
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for i in range(8):
        if device != "cpu":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        if i >= 2:  # the first products warm caches and thread pools
            best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def extractor_flops(bundle: Bundle) -> float:
    """FLOPs of one forward pass of the extractor at batch 1 (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from anomalyd.engines.torch_engine import load_bundle_module

    module = load_bundle_module(bundle)
    h, w = bundle.input_size
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        module(torch.zeros(1, 3, h, w))
    return float(counter.get_total_flops())


def search_flops(bundle: Bundle) -> float:
    spec = bundle.spec
    if spec.memory.kind == "local":  # each cell against its own per_cell rows only
        return 2.0 * spec.memory_bank_size * spec.feature_dim
    return 2.0 * spec.cells * spec.memory_bank_size * spec.feature_dim


def table(results: dict[str, Any]) -> str:
    head = "| engine | " + " | ".join(f"{k} p50 / p99 ms" for k in STAGE_KEYS) + " | frames/s | peak RSS MiB |"
    lines = [head, "|---" * (len(STAGE_KEYS) + 3) + "|"]
    for name, r in results["engines"].items():
        if "error" in r:
            lines.append(f"| {name} | not available here: {r['error']} |")
            continue
        cells = [f"{r[f'{k}_ms']['p50']:.1f} / {r[f'{k}_ms']['p99']:.1f}" for k in STAGE_KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['throughput_fps']:.1f} | {r['peak_rss_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True, help="folder of full-size frames")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--runs", type=int, default=200, help="timed inspections per engine")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: all cores)")
    parser.add_argument("--only", help="comma-separated engine names to run")
    args = parser.parse_args()

    threads = args.threads or (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    bundle = load_bundle(args.bundle)
    frames = [read_rgb(p) for p in list_images(args.images)[:50]]
    results: dict[str, Any] = {"engines": {}}
    for name, engine, search in combos(threads):
        if args.only and name not in args.only.split(","):
            continue
        try:
            inspector = open_inspector(bundle, engine, search)
        except EngineError as exc:
            results["engines"][name] = {"error": str(exc)}
            continue
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        r = measure(inspector, frames, args.runs, args.warmup)
        r["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            r["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        results["engines"][name] = r
        inspector.close()
        print(f"{name}: total p50 {r['total_ms']['p50']:.2f} ms, p99 {r['total_ms']['p99']:.2f} ms", file=sys.stderr)

    rate = matmul_rate(threads)
    ext, srch = extractor_flops(bundle), search_flops(bundle)
    limit: dict[str, Any] = {
        "matmul_gflops_cpu": round(rate, 1),
        "extractor_gflop": round(ext / 1e9, 3),
        "search_gflop": round(srch / 1e9, 3),
    }
    for name, r in results["engines"].items():
        if "error" in r or "cuda" in name or "tensorrt" in name:
            continue
        limit[name] = {
            "extract_fraction_of_peak": round(ext / (r["extract_ms"]["p50"] / 1e3) / 1e9 / rate, 3),
            "search_fraction_of_peak": round(srch / (r["search_ms"]["p50"] / 1e3) / 1e9 / rate, 3),
        }
    if torch.cuda.is_available():
        limit["matmul_gflops_cuda_fp32"] = round(matmul_rate(threads, "cuda"), 1)
    results["limit"] = limit
    results["machine"] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "bundle": bundle.bundle_id,
        "input_size": bundle.input_size,
        "memory_bank": bundle.spec.memory_bank_size,
        "memory": bundle.spec.memory.kind,
        "frame_size": list(frames[0].shape),
    }
    print(table(results))
    print(json.dumps(limit, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
