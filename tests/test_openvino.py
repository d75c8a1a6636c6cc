"""The OpenVINO extractor: the same features as ONNX Runtime, and `auto` takes it only where it measures faster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyd.engines import auto_engine
from anomalyd.engines.auto_engine import AutoEngineConfig, faster
from anomalyd.engines.base import EngineError
from anomalyd.engines.onnxruntime_engine import OnnxRuntimeEngineConfig
from anomalyd.engines.openvino_engine import OpenVinoEngineConfig
from anomalyd.engines.select import build_extractor
from anomalyd.model.bundle import load_bundle
from anomalyd.model.images import read_rgb
from anomalyd.model.scoring import Preprocessor

openvino = pytest.importorskip("openvino", reason="openvino is not installed (the dev extra brings it)")


def _frames(sample_dir: Path, bundle_dir: Path) -> torch.Tensor:
    bundle = load_bundle(bundle_dir)
    prep = Preprocessor(bundle.input_size, None, torch.device("cpu"))
    files = sorted((sample_dir / "test").rglob("*.png"))[:3]
    return prep.batch([read_rgb(f) for f in files])


def test_openvino_features_equal_onnxruntime(sample_dir: Path, bundle_dir: Path) -> None:
    """FP32 OpenVINO and ONNX Runtime run the bundle's one ONNX network: the same features (batch of 3 real parts)."""
    bundle = load_bundle(bundle_dir)
    frames = _frames(sample_dir, bundle_dir)
    ov = build_extractor(bundle, OpenVinoEngineConfig(threads=2))
    ort = build_extractor(bundle, OnnxRuntimeEngineConfig(threads=2))
    try:
        a, b = ov.extract(frames).numpy(), ort.extract(frames).numpy()
        one = ov.extract(frames[1:2]).numpy()  # a single frame after a batch: shapes follow the input
    finally:
        ov.close()
        ort.close()
    assert ov.name == "openvino-cpu" and a.shape == b.shape and a.shape[0] == 3
    scale = float(np.abs(b).max())
    assert scale > 0
    assert float(np.abs(a - b).max()) <= 1e-3 * scale
    np.testing.assert_allclose(one[0], a[1], atol=1e-3 * scale)


def test_openvino_on_a_device_that_is_not_there_is_a_clear_error(bundle_dir: Path) -> None:
    with pytest.raises(EngineError, match=r"engine 'openvino' cannot run here: OpenVINO device 'NPU9' not present"):
        build_extractor(load_bundle(bundle_dir), OpenVinoEngineConfig(device="NPU9"))


def test_faster_takes_openvino_only_beyond_the_margin() -> None:
    assert faster({"onnxruntime": 10.0}) == "onnxruntime"
    assert faster({"onnxruntime": 10.0, "openvino": 9.6}) == "onnxruntime"  # 4 %: within the margin
    assert faster({"onnxruntime": 10.0, "openvino": 9.4}) == "openvino"
    assert faster({"onnxruntime": 10.0, "openvino": 12.0}) == "onnxruntime"


class _SleepingNetwork:
    """A network that takes 2 ms a frame, 10 ms while the machine is busy (its calls 4-9 of all timed ones)."""

    def __init__(self, clock: list[int]) -> None:
        self.clock = clock

    def extract(self, frame: torch.Tensor) -> torch.Tensor:
        call = self.clock[0] - 2 * auto_engine.WARMUP  # the warm-up calls of both come first
        self.clock[0] += 1
        time.sleep(0.010 if 4 <= call < 10 else 0.002)
        return frame


def test_a_burst_of_load_while_timing_does_not_pick_the_slower_engine() -> None:
    """Two equally fast networks and a burst of load over a third of the measurement: timed in turns, both
    take their share of it and neither is called faster (timed one after the other, the first looked 5× slower)."""
    clock = [0]
    a, b = _SleepingNetwork(clock), _SleepingNetwork(clock)
    measured = auto_engine.time_side_by_side({"onnxruntime": a, "openvino": b}, (4, 4))  # type: ignore[dict-item]
    assert clock[0] == 2 * (auto_engine.WARMUP + auto_engine.RUNS)
    assert max(measured.values()) < 6.0, measured  # each median is an unloaded frame
    assert faster(measured) == "onnxruntime"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA auto takes a GPU engine before the CPU ones")
def test_auto_follows_its_measurement_and_keeps_it(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """auto times both on this bundle, takes the faster, keeps the figures; a kept measurement decides later starts."""
    monkeypatch.setenv("ANOMALYD_CACHE_DIR", str(tmp_path))
    bundle = load_bundle(bundle_dir)
    first = build_extractor(bundle, AutoEngineConfig(threads=2))
    (kept,) = tmp_path.glob("cpu-engine-*.json")
    measured = json.loads(kept.read_text())
    assert set(measured) == {"onnxruntime", "openvino"} and all(v > 0 for v in measured.values())
    assert first.name == {"openvino": "openvino-cpu", "onnxruntime": "onnxruntime"}[faster(measured)]
    first.close()

    timed: list[str] = []
    real_time = auto_engine.time_side_by_side

    def timing(extractors: dict, size: tuple[int, int]) -> dict[str, float]:
        timed.extend(e.name for e in extractors.values())
        return real_time(extractors, size)

    monkeypatch.setattr(auto_engine, "time_side_by_side", timing)
    for choice, figures in (
        ("onnxruntime", {"onnxruntime": 1.0, "openvino": 5.0}),
        ("openvino", {"onnxruntime": 5.0, "openvino": 1.0}),
    ):
        kept.write_text(json.dumps(figures))
        again = build_extractor(bundle, AutoEngineConfig(threads=2))
        assert again.name == {"openvino": "openvino-cpu", "onnxruntime": "onnxruntime"}[choice]
        again.close()
    assert timed == []  # the kept figures decided: nothing was timed again

    kept.write_text("not json")  # an unreadable measurement is measured again, not trusted
    build_extractor(bundle, AutoEngineConfig(threads=2)).close()
    assert sorted(timed) == ["onnxruntime", "openvino-cpu"]
    assert set(json.loads(kept.read_text())) == {"onnxruntime", "openvino"}
