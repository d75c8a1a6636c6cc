"""Position-aware memory, the image score, the robust limit and the one scoring path (issue 14)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from anomalyd.config import SearchConfig
from anomalyd.engines.onnxruntime_engine import OnnxRuntimeEngineConfig
from anomalyd.engines.select import open_inspector
from anomalyd.evaluation.dataset import load_dataset
from anomalyd.model.bundle import load_bundle
from anomalyd.model.calibrate import calibration, reference_of, suggest_thresholds
from anomalyd.model.images import read_rgb
from anomalyd.model.nearest import local_nearest_distances
from anomalyd.sample import MARK_AT, PLACEMENT_DEFECTS
from anomalyd.training.extraction import aspect_input_size
from anomalyd.training.fit import FitSettings, fit
from anomalyd.training.memory import _greedy_per_cell, local_bank


@pytest.fixture(scope="module")
def local_bundle(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("local_bundle")
    fit(sample_dir / "train" / "good", out, FitSettings(memory="local"))
    return out


def test_local_search_equals_brute_force_per_cell() -> None:
    rng = np.random.default_rng(0)
    bank = torch.from_numpy(rng.standard_normal((50, 16, 8)).astype(np.float32))
    queries = torch.from_numpy(rng.standard_normal((50, 8)).astype(np.float32))
    got = local_nearest_distances(queries, bank).numpy()
    want = np.sqrt(((bank.numpy() - queries.numpy()[:, None, :]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_local_bank_keeps_what_was_near_each_place() -> None:
    """A feature seen only in the top-left corner is in the corner's memory and nowhere else's."""
    feats = torch.zeros(6, 4, 8, 8)
    feats[:, 0] = torch.linspace(0, 1, 6)[:, None, None]  # ordinary variation everywhere
    feats[2, 3, 0, 0] = 5.0  # one training image has something at cell (0, 0)
    bank = local_bank(feats, radius=1, per_cell=4).reshape(8, 8, 4, 4)
    assert bank[0, 0, :, 3].max() == 5.0 and bank[1, 1, :, 3].max() == 5.0  # within one cell of it
    assert bank[3, 3, :, 3].max() == 0.0 and bank[7, 7, :, 3].max() == 0.0  # far from it: never seen there
    # greedy k-center keeps the extremes of the ordinary variation too
    corner = bank[5, 5, :, 0]
    assert corner.min() == 0.0 and corner.max() == 1.0


def test_greedy_per_cell_picks_distinct_spread_points() -> None:
    cand = torch.tensor([[[0.0], [0.1], [10.0], [5.0], [0.05]]])
    chosen = _greedy_per_cell(cand, 3)[0, :, 0].tolist()
    assert chosen[0] == 5.0  # nearest the mean (3.03): the most typical first
    assert sorted(chosen) == [0.0, 5.0, 10.0]  # then the farthest, never two of the 0.0/0.05/0.1 cluster


def _frame_results(bundle: Path, sample_dir: Path, kind: str) -> list[tuple[float, tuple[int, int], np.ndarray]]:
    inspector = open_inspector(load_bundle(bundle), OnnxRuntimeEngineConfig(threads=2), SearchConfig())
    out = []
    for sample in load_dataset(sample_dir).samples:
        if sample.defect_type != kind:
            continue
        frame = read_rgb(sample.path)
        result = inspector.inspect(frame)
        fmap = result.frame_map(frame.shape)
        hot = np.unravel_index(int(fmap.argmax()), fmap.shape)
        out.append((result.score, (int(hot[0]), int(hot[1])), sample.mask(frame.shape[:2])))
    inspector.close()
    return out


@pytest.mark.parametrize("kind", PLACEMENT_DEFECTS)
def test_missing_or_moved_mark_fails_with_local_memory(
    kind: str, local_bundle: Path, bundle_dir: Path, sample_dir: Path
) -> None:
    """Each patch of these parts is normal somewhere; only where it is makes it a defect."""
    local = load_bundle(local_bundle)
    assert local.spec.memory.kind == "local" and local.spec.memory.per_cell == 32
    good = _frame_results(local_bundle, sample_dir, "good")
    assert all(score < local.suggested_threshold for score, _, _ in good), "local memory rejects good parts"
    for score, hot, mask in _frame_results(local_bundle, sample_dir, kind):
        assert score >= local.suggested_threshold, f"{kind}: local memory passed it ({score:.2f})"
        assert mask[hot], f"{kind}: the hottest pixel {hot} is not where the mark is (or should be)"

    # The global memory (PatchCore) sees it less clearly: plain metal, and a mark, are normal somewhere
    # (what it does see comes from the deeper tap's context, not from where the patch is).
    def margin(bundle: Path) -> float:
        """Lowest defect score over the highest good score."""
        defect = [s for s, _, _ in _frame_results(bundle, sample_dir, kind)]
        return min(defect) / max(s for s, _, _ in _frame_results(bundle, sample_dir, "good"))

    local_margin, global_margin = margin(local_bundle), margin(bundle_dir)
    print(f"{kind}: margin local {local_margin:.2f}, global {global_margin:.2f}")
    assert local_margin > 1.1 and local_margin > global_margin


def test_mark_is_where_the_sample_says(sample_dir: Path) -> None:
    frame = read_rgb(next((sample_dir / "train" / "good").glob("*.png")))
    size = frame.shape[0]
    x, y = int(size / 2 + MARK_AT[0] * size), int(size / 2 + MARK_AT[1] * size)
    assert frame[y, x, 2] > frame[y, x, 0] + 30  # the blue ink dot


def test_faiss_is_refused_for_a_local_memory(local_bundle: Path) -> None:
    from anomalyd.engines.base import EngineError

    with pytest.raises(EngineError, match="position-aware"):
        open_inspector(load_bundle(local_bundle), OnnxRuntimeEngineConfig(), SearchConfig(type="faiss"))


def test_fit_calibrates_through_the_runtime_path(bundle_dir: Path, sample_dir: Path) -> None:
    """The hold-out scores fit wrote are what the daemon's Inspector gives for those files."""
    bundle = load_bundle(bundle_dir)
    calib = bundle.manifest["calibration"]
    train = sorted((sample_dir / "train" / "good").glob("*.png"))
    from anomalyd.training.fit import split_holdout

    _, holdout = split_holdout(train, FitSettings().holdout_fraction, 0)
    inspector = open_inspector(bundle, OnnxRuntimeEngineConfig(threads=2), SearchConfig())
    raw = [inspector.inspect(read_rgb(p)).raw_score for p in holdout]
    inspector.close()
    np.testing.assert_allclose(raw, calib["holdout_raw"], rtol=2e-3)
    assert calib["holdout_images"] == [str(p) for p in holdout]
    assert calib["highest_holdout"]["image"] == str(holdout[int(np.argmax(raw))])


def test_fit_names_the_held_back_good_part_that_sets_the_scale(sample_dir: Path, tmp_path: Path) -> None:
    """A defect left in the good folder and held back sets every score's scale: fit names that file."""
    import shutil

    from anomalyd.training.fit import split_holdout

    good = tmp_path / "good"
    shutil.copytree(sample_dir / "train" / "good", good)
    _, holdout = split_holdout(sorted(good.glob("*.png")), FitSettings().holdout_fraction, 0)
    planted = holdout[0]
    shutil.copy(next((sample_dir / "test" / "scratch").glob("*.png")), planted)  # a scratched part, named good
    calib = fit(good, tmp_path / "bundle", FitSettings(coreset_ratio=0.02))["calibration"]
    highest = calib["highest_holdout"]  # type: ignore[index]
    assert highest["image"] == str(planted)
    assert highest["next_score"] < 0.8  # the good parts held back with it score well under it


def test_top_k_image_score_is_the_mean_of_the_hottest_cells(sample_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "topk"
    fit(sample_dir / "train" / "good", out, FitSettings(coreset_ratio=0.02, image_score="top_k", top_k=4))
    bundle = load_bundle(out)
    assert bundle.spec.map.image_score == "top_k" and bundle.spec.map.top_k == 4
    inspector = open_inspector(bundle, OnnxRuntimeEngineConfig(threads=2), SearchConfig())
    frame = read_rgb(next((sample_dir / "test" / "scratch").glob("*.png")))
    result = inspector.inspect(frame)
    inspector.close()
    h, w = bundle.input_size
    gh, gw = bundle.spec.feature_grid
    k = round(4 * h * w / (gh * gw))
    expected = np.sort(result.anomaly_map.ravel())[-k:].mean()
    assert result.score == pytest.approx(expected, rel=1e-5)
    assert result.score < result.anomaly_map.max()


def test_enough_held_back_parts_put_the_threshold_one_spread_above_their_highest() -> None:
    rng = np.random.default_rng(0)
    good = rng.gumbel(10.0, 0.3, 40)
    calib = calibration(good)
    assert calib["reference_raw"] == good.max() and calib["reference_rule"] == "highest held-back part"
    spread = 1.4826 * np.median(np.abs(good - np.median(good)))
    thr = suggest_thresholds(good)["suggested_image"]
    assert thr == pytest.approx(1.0 + spread / good.max(), abs=1e-4)
    # Fresh good parts from the same law: the highest of 40 alone lets 1/41 (2.4 %) above it on
    # average; one spread more keeps it under 1 %.
    rates = []
    for _ in range(300):
        held = rng.gumbel(10.0, 0.3, 40)
        limit = float(suggest_thresholds(held)["suggested_image"]) * held.max()  # type: ignore[arg-type]
        rates.append(np.mean(rng.gumbel(10.0, 0.3, 2000) >= limit))
    assert np.mean(rates) < 0.01


def test_a_bundle_with_a_head_puts_its_threshold_at_the_highest_held_back_part() -> None:
    good = np.random.default_rng(0).gumbel(10.0, 0.3, 40)
    head = suggest_thresholds(good, supervised=True)
    assert head["suggested_image"] == 1.0 and "no margin" in str(head["source"])
    assert float(suggest_thresholds(good)["suggested_image"]) > 1.0  # … where a good-parts-only one has its margin
    assert suggest_thresholds(good[:3], supervised=True)["suggested_image"] == pytest.approx(1.10)  # too few: 10 %


def test_one_far_outlier_among_the_held_back_parts_is_set_aside() -> None:
    rng = np.random.default_rng(0)
    good = rng.normal(10.0, 0.3, 40)
    with_outlier = np.r_[good, 20.0]  # an unlabelled defect in the "good" folder
    assert reference_of(with_outlier) == (good.max(), True)
    assert calibration(with_outlier)["reference_rule"].startswith("second-highest")
    assert reference_of(good) == (good.max(), False)  # ordinary tails are kept


def test_few_held_back_parts_keep_the_margin_rule() -> None:
    few = np.array([1.0, 1.2, 1.1])
    assert calibration(few)["reference_raw"] == 1.2
    assert suggest_thresholds(few)["suggested_image"] == pytest.approx(1.10)


def test_input_size_keeps_the_aspect_ratio() -> None:
    assert aspect_input_size((460, 1130)) == (224, 544)  # BSData: not squashed to 224x224
    assert aspect_input_size((900, 900)) == (224, 224)
    assert aspect_input_size((1200, 200), max_side=1024) == (1024, 224)


def test_fit_keeps_a_wide_roi_wide_and_the_daemon_path_uses_it(sample_dir: Path, tmp_path: Path) -> None:
    """A 256x128 ROI is fitted at 224x448 (not squashed to 224x224), and the Inspector crops the same ROI."""
    out = tmp_path / "wide"
    fit(sample_dir / "train" / "good", out, FitSettings(roi=(0, 64, 256, 128)))
    bundle = load_bundle(out)
    assert bundle.input_size == (224, 448) and bundle.spec.feature_grid == (28, 56)
    assert bundle.spec.roi == (0, 64, 256, 128)
    inspector = open_inspector(bundle, OnnxRuntimeEngineConfig(threads=2), SearchConfig())
    frame = read_rgb(next((sample_dir / "test" / "good").glob("*.png")))
    result = inspector.inspect(frame)
    inspector.close()
    assert result.roi == (0, 64, 256, 128) and result.anomaly_map.shape == (224, 448)
    assert result.frame_map(frame.shape)[:64].max() == 0.0  # nothing outside the ROI
