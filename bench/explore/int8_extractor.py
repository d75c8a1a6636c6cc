"""Exploration: is an INT8 extractor (ONNX Runtime static quantization) worth its feature drift?

    python bench/explore/int8_extractor.py [--bundle var/bsd_head5] [--images ../shared/data/bsd_pitting/train/good]

Quantizes the bundle's ``extractor.onnx`` (QDQ, per-channel INT8 weights and activations,
calibrated on every 23rd image), then runs both networks alternately on the same frames with
the engine's session options (2 threads, no spinning) and prints p50 / p99 latency and the
relative L2 drift of the INT8 features. EfficientNet-Lite was designed to quantize well; on
this VM's AVX-512 VNNI cores it still was not worth it (docs/accuracy.md). Nothing here is
used by the daemon.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from anomalyd.model.bundle import load_bundle
from anomalyd.model.images import read_rgb
from anomalyd.model.names import INPUT_NAME
from anomalyd.model.scoring import Preprocessor


class Frames(CalibrationDataReader):
    def __init__(self, frames: list[np.ndarray]) -> None:
        self.frames = iter(frames)

    def get_next(self) -> dict[str, np.ndarray] | None:
        frame = next(self.frames, None)
        return None if frame is None else {INPUT_NAME: frame}


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()  # as the onnxruntime engine opens its session
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, default=Path("var/bsd_head5"))
    p.add_argument("--images", type=Path, default=Path("../shared/data/bsd_pitting/train/good"))
    p.add_argument("--runs", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    bundle = load_bundle(args.bundle)
    prepare = Preprocessor(bundle.spec.input_size, None, torch.device("cpu"))
    files = sorted(args.images.glob("*.jpg"))

    def frame(path: Path) -> np.ndarray:
        return np.ascontiguousarray(prepare.batch([read_rgb(path)]).numpy())

    with tempfile.TemporaryDirectory() as folder:
        fp32 = Path(folder) / "fp32.onnx"
        fp32.write_bytes(bundle.blob("extractor.onnx"))
        ready, int8 = Path(folder) / "pre.onnx", Path(folder) / "int8.onnx"
        quant_pre_process(str(fp32), str(ready))
        quantize_static(
            str(ready), str(int8), Frames([frame(f) for f in files[::23]]), quant_format=QuantFormat.QDQ,
            per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        )  # fmt: skip
        s32, s8 = session(fp32, args.threads), session(int8, args.threads)
    frames = [frame(f) for f in files[5::37]]
    for x in frames[:2]:  # warm-up
        s32.run(None, {INPUT_NAME: x})
        s8.run(None, {INPUT_NAME: x})
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    drift = []
    for i in range(args.runs):
        x = frames[i % len(frames)]
        started = time.perf_counter()
        (f32,) = s32.run(None, {INPUT_NAME: x})
        times["fp32"].append(time.perf_counter() - started)
        started = time.perf_counter()
        (f8,) = s8.run(None, {INPUT_NAME: x})
        times["int8"].append(time.perf_counter() - started)
        drift.append(float(np.linalg.norm(f8 - f32) / np.linalg.norm(f32)))
    print(f"{args.bundle}: input {bundle.spec.input_size}, {args.threads} threads, {args.runs} runs each, alternating")
    for name, t in times.items():
        print(f"  {name}: p50 {np.percentile(t, 50) * 1e3:.1f} ms, p99 {np.percentile(t, 99) * 1e3:.1f} ms")
    print(f"  INT8 feature drift (relative L2): median {np.median(drift):.3f}, max {np.max(drift):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
