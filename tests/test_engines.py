"""Every engine available here against the torch reference, on real images."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyd.config import SearchConfig
from anomalyd.engines.auto_engine import AutoEngineConfig
from anomalyd.engines.base import EngineError
from anomalyd.engines.onnxruntime_engine import OnnxRuntimeEngineConfig
from anomalyd.engines.search import FaissSearcher, TorchSearcher
from anomalyd.engines.select import build_extractor, build_searcher, open_inspector
from anomalyd.engines.tensorrt_engine import TensorRtEngineConfig
from anomalyd.engines.torch_engine import TorchEngineConfig
from anomalyd.model.bundle import load_bundle
from anomalyd.model.images import read_rgb
from anomalyd.model.inspector import Inspector

# Patch scores of two engines agree within this (normalised units; 1.0 = most unusual good part).
SCORE_TOLERANCE = 1e-3


def _frames(sample_dir: Path) -> list[np.ndarray]:
    return [read_rgb(p) for p in sorted((sample_dir / "test").rglob("*.png"))[::3]]


def _reference(bundle_dir: Path) -> Inspector:
    return open_inspector(load_bundle(bundle_dir), TorchEngineConfig(device="cpu"), SearchConfig(type="torch"))


@pytest.mark.parametrize(
    "engine,search",
    [
        (OnnxRuntimeEngineConfig(), SearchConfig(type="faiss")),
        (OnnxRuntimeEngineConfig(), SearchConfig(type="torch")),
        (TorchEngineConfig(device="cpu"), SearchConfig(type="faiss")),
    ],
)
def test_engine_matches_torch_reference(bundle_dir: Path, sample_dir: Path, engine: object, search: object) -> None:
    reference = _reference(bundle_dir)
    candidate = open_inspector(load_bundle(bundle_dir), engine, search)
    for frame in _frames(sample_dir):
        a, b = reference.inspect(frame), candidate.inspect(frame)
        assert abs(a.score - b.score) < SCORE_TOLERANCE
        np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=SCORE_TOLERANCE)
        assert set(b.timings_ms) == {"preprocess", "extract", "search", "map", "total"}


def test_faiss_and_torch_search_return_the_same_distances() -> None:
    rng = np.random.default_rng(0)
    bank = rng.standard_normal((3000, 152)).astype(np.float32)
    queries = torch.from_numpy(rng.standard_normal((1000, 152)).astype(np.float32))
    cpu = torch.device("cpu")
    a = FaissSearcher(bank, cpu).search(queries).numpy()
    b = TorchSearcher(bank, cpu).search(queries).numpy()
    exact = np.sqrt(((queries.numpy()[:, None, :] - bank[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(a, exact, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(b, exact, rtol=1e-4, atol=1e-4)


def test_gpu_resize_weights_equal_opencv_area_resize(sample_dir: Path) -> None:
    """The GPU path resizes with matrices; checked here on the CPU against cv2.INTER_AREA."""
    import cv2

    from anomalyd.model.scoring import area_matrix

    frame = cv2.resize(read_rgb(next((sample_dir / "test" / "good").glob("*.png"))), (300, 270))
    expected = cv2.resize(frame, (224, 96), interpolation=cv2.INTER_AREA)
    rows, cols = area_matrix(270, 96), area_matrix(300, 224)
    got = np.stack([np.round(rows @ frame[..., c].astype(np.float32) @ cols.T) for c in range(3)], axis=-1)
    assert np.abs(got - expected).max() <= 1  # float32 summation order may flip a rounding


def test_auto_picks_a_cpu_engine_on_a_cpu_machine(bundle_dir: Path) -> None:
    """No GPU: ONNX Runtime, or OpenVINO where it is installed and measured faster (tests/test_openvino.py)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: auto picks a GPU engine")
    extractor = build_extractor(load_bundle(bundle_dir), AutoEngineConfig())
    assert extractor.name in ("onnxruntime", "openvino-cpu")
    assert extractor.device.type == "cpu"


def test_unavailable_engine_is_a_clear_error(bundle_dir: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is installed here; the error path needs a machine without it")
    except ImportError:
        pass
    with pytest.raises(EngineError, match="engine 'tensorrt' cannot run here: tensorrt is not installed"):
        build_extractor(load_bundle(bundle_dir), TensorRtEngineConfig())
    with pytest.raises(EngineError, match="execution providers not available: NoSuchProvider"):
        build_extractor(load_bundle(bundle_dir), OnnxRuntimeEngineConfig(providers=["NoSuchProvider"]))


@pytest.mark.gpu
def test_tensorrt_matches_torch_reference(bundle_dir: Path, sample_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="TensorRT is not installed on this machine")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    reference = _reference(copy)
    trt = open_inspector(load_bundle(copy), TensorRtEngineConfig(fp16=False), SearchConfig(type="torch"))
    for frame in _frames(sample_dir):
        assert abs(reference.inspect(frame).score - trt.inspect(frame).score) < 1e-2
    assert any((copy / "engines").glob("*.plan"))


@pytest.mark.gpu
def test_torch_cuda_matches_cpu(bundle_dir: Path, sample_dir: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine")
    reference = _reference(bundle_dir)
    gpu = open_inspector(load_bundle(bundle_dir), TorchEngineConfig(device="cuda", fp16=False), SearchConfig())
    for frame in _frames(sample_dir):
        # Same resize weights as OpenCV on the CPU; cuDNN's TF32 convolutions leave ~1e-3.
        assert abs(reference.inspect(frame).score - gpu.inspect(frame).score) < 0.01


# ------------------------------------------------------------------ the GPU path's seams (run here)
def test_auto_moves_on_when_a_candidate_raises_anything(bundle_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine that looks available but whose construction raises (as `set_device` did) is a skip reason."""
    from anomalyd.engines.base import EXTRACTORS

    class BrokenTensorRt:
        name = "tensorrt"

        @staticmethod
        def unavailable(config: object) -> None:
            return None

        def __init__(self, bundle: object, config: object) -> None:
            raise ValueError("Expected a torch.device with a specified index or an integer, but got:cuda")

    monkeypatch.setitem(EXTRACTORS._entries, "tensorrt", (TensorRtEngineConfig, BrokenTensorRt))
    extractor = build_extractor(load_bundle(bundle_dir), AutoEngineConfig())
    assert extractor.name in ("onnxruntime", "openvino-cpu")
    extractor.close()


def test_cuda_devices_always_carry_their_index() -> None:
    from anomalyd.engines.base import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if torch.cuda.is_available():
        assert resolve_device("cuda").index == torch.cuda.current_device()
        assert resolve_device("auto").index is not None
    else:
        with pytest.raises(EngineError, match="sees no CUDA GPU"):
            resolve_device("cuda:1")
    with pytest.raises(EngineError, match="'gpu0'"):
        resolve_device("gpu0")


def test_plan_names_separate_onnx_gpus_and_versions(tmp_path: Path) -> None:
    from anomalyd.engines.plan_cache import GpuIdentity, plan_file, timing_cache_file

    nano, agx = GpuIdentity("Orin", 8, 7, 8), GpuIdentity("Orin", 8, 7, 16)  # same name on every Jetson Orin
    a = plan_file(tmp_path, "a" * 64, nano, "10.3.0", True)
    assert a.name == "aaaaaaaaaaaa_Orin-sm87-8mp_trt10.3.0_fp16.plan"
    others = {
        plan_file(tmp_path, "b" * 64, nano, "10.3.0", True),  # refitted in place
        plan_file(tmp_path, "a" * 64, agx, "10.3.0", True),
        plan_file(tmp_path, "a" * 64, nano, "8.6.2", True),  # JetPack 6.0
        plan_file(tmp_path, "a" * 64, nano, "10.3.0", False),
    }
    assert a not in others and len(others) == 4
    assert timing_cache_file(tmp_path, nano, "10.3.0") != timing_cache_file(tmp_path, agx, "10.3.0")
    assert timing_cache_file(tmp_path, nano, "10.3.0") != timing_cache_file(tmp_path, nano, "8.6.2")
    h200 = GpuIdentity("NVIDIA H200", 9, 0, 132)
    assert h200.slug == "NVIDIA-H200-sm90-132mp"


def test_plan_and_cache_files_are_written_atomically_and_bad_ones_set_aside(tmp_path: Path) -> None:
    from anomalyd.engines.plan_cache import read_timing_cache, set_aside, write_atomically

    target = tmp_path / "engines" / "x.plan"
    write_atomically(target, b"first")
    write_atomically(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["x.plan"]  # no temporary file left behind
    # A write that fails half-way leaves the old file and no temporary file.
    with pytest.raises(TypeError):
        write_atomically(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"second" and [p.name for p in target.parent.iterdir()] == ["x.plan"]
    assert read_timing_cache(tmp_path / "missing.cache") == b""
    unreadable = tmp_path / "dir.cache"
    unreadable.mkdir()  # reading a folder fails with an OSError: start afresh, do not stop
    assert read_timing_cache(unreadable) == b""
    set_aside(target, "could not deserialize")
    assert not target.exists() and (target.parent / "x.plan.bad").read_bytes() == b"second"


@pytest.mark.parametrize(
    "version,fp16,problem",
    [
        ("8.4.1", False, "too old"),
        ("8.5.2", True, None),  # JetPack 5.1
        ("8.6.2", True, None),  # JetPack 6.0
        ("10.3.0", True, None),
        ("11.0.0", True, "strongly typed"),
        ("11.0.0", False, None),
    ],
)
def test_tensorrt_versions_are_checked_before_building(version: str, fp16: bool, problem: str | None) -> None:
    from types import SimpleNamespace

    from anomalyd.engines.tensorrt_engine import check_version

    flags = SimpleNamespace() if version.startswith("11") else SimpleNamespace(FP16=1)
    trt = SimpleNamespace(__version__=version, BuilderFlag=flags)
    if problem is None:
        check_version(trt, fp16)
    else:
        with pytest.raises(EngineError, match=problem):
            check_version(trt, fp16)


class _BuilderConfigSeam:
    """Stands in for TensorRT's IBuilderConfig at the two timing-cache calls only (no TensorRT runs)."""

    def __init__(self, accepts: set[bytes]) -> None:
        self.accepts = accepts
        self.attached: list[tuple[bytes, bool]] = []

    def create_timing_cache(self, data: bytes) -> bytes:
        return bytes(data)

    def set_timing_cache(self, cache: bytes, ignore_mismatch: bool) -> bool:
        ok = cache == b"" or cache in self.accepts
        if ok:
            self.attached.append((cache, ignore_mismatch))
        return ok


def test_a_foreign_timing_cache_is_set_aside_and_the_build_goes_on(tmp_path: Path) -> None:
    from anomalyd.engines.tensorrt_engine import attach_timing_cache

    cache = tmp_path / "timing_x.cache"
    cache.write_bytes(b"ours")
    seam = _BuilderConfigSeam(accepts={b"ours"})
    attach_timing_cache(seam, cache)
    assert seam.attached == [(b"ours", False)] and cache.exists()
    cache.write_bytes(b"from another GPU")
    seam = _BuilderConfigSeam(accepts={b"ours"})
    attach_timing_cache(seam, cache)
    assert seam.attached == [(b"", True)]  # a fresh cache; the foreign one kept aside, not used
    assert not cache.exists() and (tmp_path / "timing_x.cache.bad").read_bytes() == b"from another GPU"


def test_the_bundles_roi_applies_and_a_different_camera_roi_is_refused(sample_dir: Path, tmp_path: Path) -> None:
    from anomalyd.training.fit import FitSettings, fit

    out = tmp_path / "roi_bundle"
    fit(sample_dir / "train" / "good", out, FitSettings(coreset_ratio=0.02, roi=(32, 32, 192, 192)))
    bundle = load_bundle(out)
    inspector = open_inspector(bundle, OnnxRuntimeEngineConfig(), SearchConfig())  # no camera ROI: the bundle's
    frame = _frames(sample_dir)[0]
    assert inspector.inspect(frame).roi == (32, 32, 192, 192)
    inspector.close()
    with pytest.raises(EngineError, match="fitted with ROI"):
        open_inspector(bundle, OnnxRuntimeEngineConfig(), SearchConfig(), roi=(0, 0, 192, 192))


def test_auto_search_on_the_cpu_is_faiss_by_gemm_where_installed_else_torch(
    bundle_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import faiss

    from anomalyd.engines.search import BLAS_FROM_QUERIES

    bundle = load_bundle(bundle_dir)
    cpu = torch.device("cpu")
    faiss.cvar.distance_compute_blas_threshold = 128000  # faiss 1.15's default
    assert build_searcher(bundle, SearchConfig(), cpu).name == "faiss-cpu"  # auto, faiss installed
    # Every frame on faiss's GEMM path (the default left frames under ~800 queries on a 2-3x slower one).
    assert faiss.cvar.distance_compute_blas_threshold == BLAS_FROM_QUERIES
    monkeypatch.setitem(sys.modules, "faiss", None)  # as on a machine without the faiss-cpu extra
    assert build_searcher(bundle, SearchConfig(), cpu).name == "torch-cpu"
    with pytest.raises(EngineError, match="faiss is not installed"):
        build_searcher(bundle, SearchConfig(type="faiss"), cpu)


@pytest.mark.parametrize("searcher", [FaissSearcher, TorchSearcher])
def test_a_non_finite_feature_gives_a_non_finite_distance(searcher) -> None:  # type: ignore[no-untyped-def]
    """Never a huge finite distance (faiss's FLT_MAX) that would be judged as an ordinary NG."""
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((500, 16)).astype(np.float32)
    queries = torch.from_numpy(rng.standard_normal((40, 16)).astype(np.float32))
    queries[3, 2] = float("nan")
    queries[7, 0] = float("inf")
    d = searcher(bank, torch.device("cpu")).search(queries).numpy()
    assert not np.isfinite(d[3]) and not np.isfinite(d[7])
    assert np.isfinite(np.delete(d, [3, 7])).all()


def test_faiss_gpu_is_never_tried_where_its_wheels_have_no_kernels() -> None:
    """faiss-gpu-cu12 ships sm_70/sm_80 code only: Hopper (9.0) and Blackwell (10.0, 12.0) would abort."""
    from anomalyd.engines.search import faiss_gpu_supports

    assert faiss_gpu_supports((7, 0)) and faiss_gpu_supports((8, 6)) and faiss_gpu_supports((8, 9))
    assert not faiss_gpu_supports((6, 1)) and not faiss_gpu_supports((9, 0))
    assert not faiss_gpu_supports((10, 0)) and not faiss_gpu_supports((12, 0))


def test_tensorrt_factories_without_a_gpu_are_an_engine_error() -> None:
    """TensorRT's Builder/Runtime raise TypeError ("factory function returned nullptr") with no usable GPU."""
    from anomalyd.engines.base import EngineError
    from anomalyd.engines.tensorrt_engine import _made

    def nullptr_factory(_logger: object) -> object:
        raise TypeError("pybind11::init(): factory function returned nullptr")

    with pytest.raises(EngineError, match=r"could not create its builder .*nullptr.*nvidia-smi"):
        _made(nullptr_factory, "builder", object())
    with pytest.raises(EngineError, match=r"runtime \(returned nothing\)"):
        _made(lambda _logger: None, "runtime", object())
    assert _made(lambda _logger: "ok", "runtime", object()) == "ok"


@pytest.mark.e2e
def test_faiss_gpu_is_tried_in_a_subprocess_once_and_an_abort_there_is_only_a_no(tmp_path: Path) -> None:
    """What search: auto relies on before faiss-gpu on a GPU its wheels claim: a probe that may abort."""
    from anomalyd.engines.search import faiss_gpu_runs

    aborts = [sys.executable, "-c", "import os; os.abort()"]
    passes = [sys.executable, "-c", "pass"]
    runs, how = faiss_gpu_runs(0, "gpu A|faiss 1.14", tmp_path, command=aborts)
    assert not runs and "killed by SIGABRT" in how
    # Cached per identity: the next start does not probe again (a passing command would say yes).
    runs, how = faiss_gpu_runs(0, "gpu A|faiss 1.14", tmp_path, command=passes)
    assert not runs and "cached in" in how
    # Another GPU, driver or faiss version is probed afresh.
    assert faiss_gpu_runs(0, "gpu A|faiss 1.15", tmp_path, command=passes) == (True, "probe passed")
    hangs = [sys.executable, "-c", "import time; time.sleep(30)"]
    assert faiss_gpu_runs(0, "gpu B", None, command=hangs, timeout_s=0.5) == (False, "probe hung for 0 s")


def test_a_driver_older_than_the_wheels_cuda_is_named_with_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalyd.engines import cuda_info

    proc = tmp_path / "version"
    proc.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n")
    assert cuda_info.driver_version(proc) == "550.54.14"
    assert cuda_info.driver_version(tmp_path / "absent") is None
    monkeypatch.setattr(cuda_info, "driver_cuda", lambda: (12, 4))
    monkeypatch.setattr(cuda_info, "driver_version", lambda proc=None: "550.54.14")
    why = cuda_info.mismatch(13, "TensorRT")
    assert why is not None and "CUDA 13" in why and "R580" in why and "550.54.14" in why and "cu12 build" in why
    assert cuda_info.mismatch(12, "torch") is None and cuda_info.mismatch(None, "torch") is None
    assert "driver 550.54.14 (CUDA up to 12.4)" in cuda_info.describe()


class _FakeTrtConfig:
    """TensorRT 10's IBuilderConfig as far as _build uses it: TF32 is on until cleared."""

    def __init__(self) -> None:
        self.flags = {"TF32"}

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        pass

    def add_optimization_profile(self, profile: object) -> None:
        pass

    def create_timing_cache(self, data: bytes) -> object:
        return object()

    def set_timing_cache(self, cache: object, ignore_mismatch: bool) -> bool:
        return True

    def get_timing_cache(self) -> None:
        return None


def _fake_tensorrt(built: list[tuple[set[str], bytes]]) -> object:
    import types

    class Builder:
        def __init__(self, logger: object) -> None:
            self.config = _FakeTrtConfig()

        def create_network(self, flags: int) -> object:
            return types.SimpleNamespace(onnx=b"")

        def create_builder_config(self) -> _FakeTrtConfig:
            return self.config

        def create_optimization_profile(self) -> object:
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network: object, config: _FakeTrtConfig) -> bytes:
            built.append((set(config.flags), network.onnx))  # type: ignore[attr-defined]
            return b"plan"

    class OnnxParser:
        def __init__(self, network: object, logger: object) -> None:
            self.network = network

        def parse(self, data: bytes) -> bool:
            self.network.onnx = data  # type: ignore[attr-defined]
            return True

    return types.SimpleNamespace(
        __version__="10.16.0",
        Logger=type("Logger", (), {"WARNING": 0, "__init__": lambda self, level: None}),
        Builder=Builder,
        OnnxParser=OnnxParser,
        BuilderFlag=types.SimpleNamespace(FP16="FP16", TF32="TF32"),
        MemoryPoolType=types.SimpleNamespace(WORKSPACE="workspace"),
        NetworkDefinitionCreationFlag=types.SimpleNamespace(EXPLICIT_BATCH=0),
    )


def test_a_tensorrt_fp32_plan_is_fp32_not_tf32(
    bundle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TensorRT 10 allows TF32 unless told not to: an fp32 plan would miss the 2e-3 tolerance."""
    import types

    from anomalyd.engines import tensorrt_engine
    from anomalyd.model.bundle import EXTRACTOR_ONNX

    built: list[tuple[set[str], bytes]] = []
    monkeypatch.setattr(tensorrt_engine, "gpu_identity", lambda device: types.SimpleNamespace(slug="fake-gpu"))
    bundle = load_bundle(bundle_dir)
    for fp16 in (False, True):
        tensorrt_engine._build(_fake_tensorrt(built), bundle, torch.device("cpu"), fp16, 64)
    assert built[0][0] == set() and built[1][0] == {"FP16"}  # TF32 cleared in both
    assert built[0][1] == bundle.blob(EXTRACTOR_ONNX)  # built from the verified bytes
