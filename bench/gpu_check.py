"""GPU check: torch-CUDA extractor and torch search against the CPU reference, with latency.

    python bench/gpu_check.py --bundle B --images DIR [--json FILE]

Run by bench/gpu_check.sh on a machine with CUDA torch (TensorRT and a faiss GPU
build are used too where installed). Equality: every frame's score and map from
each GPU engine against the CPU reference (torch on the CPU, torch search).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import anomalyd  # noqa: F401  (first: sets the OpenMP wait policy before torch loads)

# isort: split
import numpy as np
import torch

from anomalyd.config import SearchConfig, TensorRtEngineConfig, TorchEngineConfig
from anomalyd.engines.base import EngineError
from anomalyd.engines.inspector import open_inspector
from anomalyd.model.bundle import load_bundle
from anomalyd.model.images import list_images, read_rgb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--runs", type=int, default=300)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to check", file=sys.stderr)
        return 2
    sys.path.insert(0, str(Path(__file__).parent))
    from latency import measure

    bundle = load_bundle(args.bundle)
    frames = [read_rgb(p) for p in list_images(args.images)[:40]]
    reference = open_inspector(bundle, TorchEngineConfig(device="cpu"), SearchConfig(type="torch"))
    ref = [reference.inspect(f) for f in frames]
    candidates: list[tuple[str, Any, SearchConfig]] = [
        ("torch-cuda-fp32+torch", TorchEngineConfig(device="cuda", fp16=False), SearchConfig(type="torch")),
        ("torch-cuda-fp16+torch", TorchEngineConfig(device="cuda", fp16=True), SearchConfig(type="torch")),
        (
            "torch-cuda-fp16-graph+torch",
            TorchEngineConfig(device="cuda", fp16=True, cuda_graph=True),
            SearchConfig(type="torch"),
        ),
        ("torch-cuda-fp16+faiss-gpu", TorchEngineConfig(device="cuda", fp16=True), SearchConfig(type="faiss")),
        ("tensorrt-fp16+torch", TensorRtEngineConfig(fp16=True), SearchConfig(type="torch")),
    ]
    report: dict[str, Any] = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "engines": {}}
    for name, engine, search in candidates:
        try:
            inspector = open_inspector(bundle, engine, search)
        except EngineError as exc:
            report["engines"][name] = {"skipped": str(exc)}
            print(f"{name}: not available here ({exc})")
            continue
        got = [inspector.inspect(f) for f in frames]
        score_diff = max(abs(a.score - b.score) for a, b in zip(ref, got, strict=True))
        map_diff = max(float(np.abs(a.anomaly_map - b.anomaly_map).max()) for a, b in zip(ref, got, strict=True))
        verdicts_equal = sum(
            (a.score >= bundle.suggested_threshold) == (b.score >= bundle.suggested_threshold)
            for a, b in zip(ref, got, strict=True)
        )
        torch.cuda.reset_peak_memory_stats()
        timing = measure(inspector, frames, args.runs, warmup=20)
        timing["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        report["engines"][name] = {
            "max_score_diff": score_diff,
            "max_map_diff": map_diff,
            "same_verdicts": f"{verdicts_equal}/{len(frames)}",
            **timing,
        }
        t = timing
        print(
            f"{name}: max |score - cpu| {score_diff:.4f}, max |map - cpu| {map_diff:.4f}, verdicts "
            f"{verdicts_equal}/{len(frames)} equal; total p50 {t['total_ms']['p50']:.2f} ms p99 "
            f"{t['total_ms']['p99']:.2f} ms (preprocess {t['preprocess_ms']['p50']:.2f}, extract "
            f"{t['extract_ms']['p50']:.2f}, search {t['search_ms']['p50']:.2f}, map {t['map_ms']['p50']:.2f}); "
            f"{t['throughput_fps']:.0f} frames/s"
        )
        inspector.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
