"""AUROC against scikit-learn; AUPRO against cases computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import roc_auc_score

from anomalyd.evaluation.metrics import aupro, auroc, pro_curve


@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 20)), min_size=2, max_size=200).filter(
        lambda rows: 0 < sum(r[0] for r in rows) < len(rows)
    )
)
@settings(max_examples=200, deadline=None)
def test_auroc_matches_sklearn_with_ties(rows: list[tuple[bool, int]]) -> None:
    labels = np.array([r[0] for r in rows])
    scores = np.array([r[1] for r in rows], dtype=float)  # small integers: many ties
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auroc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both classes"):
        auroc(np.zeros(4), np.arange(4.0))


def _square_mask(size: int = 10) -> np.ndarray:
    mask = np.zeros((1, size, size), dtype=bool)
    mask[0, 2:5, 2:5] = True
    return mask


def test_aupro_perfect_map_is_one() -> None:
    mask = _square_mask()
    assert aupro(mask, mask.astype(float)) == pytest.approx(1.0)


def test_aupro_constant_map() -> None:
    """A constant map has one threshold: (FPR 0, PRO 0) → (1, 1); area to 0.3 is 0.045, /0.3 = 0.15."""
    mask = _square_mask()
    assert aupro(mask, np.ones(mask.shape)) == pytest.approx(0.15)


def test_aupro_hand_computed_two_regions() -> None:
    """Two regions; the map finds all of region A (score 2) and half of region B (score 1)."""
    mask = np.zeros((1, 4, 10), dtype=bool)
    mask[0, 0, 0:2] = True  # region A: 2 pixels
    mask[0, 3, 6:10] = True  # region B: 4 pixels (not touching A)
    amap = np.zeros(mask.shape)
    amap[0, 0, 0:2] = 2.0
    amap[0, 3, 6:8] = 1.0
    # Thresholds: >=2 → PRO (1 + 0)/2 = 0.5 at FPR 0; >=1 → (1 + 0.5)/2 = 0.75 at FPR 0;
    # >=0 → PRO 1 at FPR 1. Area to 0.3: 0.3 * (0.75 + (0.75 + 0.25 * 0.3)) / 2 = 0.23625 → /0.3
    assert aupro(mask, amap) == pytest.approx(0.7875)
    curve = pro_curve(mask, amap)
    assert curve.y.max() == pytest.approx(1.0)


@given(st.integers(0, 2**31 - 1))
@settings(max_examples=30, deadline=None)
def test_aupro_never_above_one(seed: int) -> None:
    rng = np.random.default_rng(seed)
    masks = rng.random((2, 12, 12)) > 0.8
    masks[0, 0, 0] = True  # at least one region
    masks[1, -1, -1] = False  # at least one normal pixel
    maps = rng.random((2, 12, 12)) + masks * rng.random()
    value = aupro(masks, maps)
    assert 0.0 <= value <= 1.0 + 1e-12


def test_false_rejects_and_escapes_at_the_threshold() -> None:
    from pathlib import Path

    from anomalyd.evaluation.dataset import Sample
    from anomalyd.evaluation.evaluate import Scored, compute_metrics
    from anomalyd.evaluation.report import markdown_table

    def item(kind: str, score: float) -> Scored:
        return Scored(Sample(Path(f"{kind}.png"), kind, None), score, None)

    # 4 good (one over 1.1), 4 defects (one under 1.1, one exactly at it: at counts as NG).
    scored = [item("good", s) for s in (0.8, 0.9, 1.0, 1.2)] + [
        item("crack", 1.5),
        item("crack", 1.05),
        item("stain", 1.1),
        item("stain", 2.0),
    ]
    m = compute_metrics(scored, with_pixels=False, threshold=1.1)
    at = m["at_threshold"]
    assert at == {"threshold": 1.1, "false_reject_rate": 0.25, "escape_rate": 0.25, "false_rejects": 1, "escapes": 1}
    assert m["per_defect"]["crack"]["escape_rate"] == 0.5 and m["per_defect"]["stain"]["escape_rate"] == 0.0
    table = markdown_table(m, "x")
    assert "false rejects 25.0%" in table and "escapes 25.0%" in table
    # 4 good parts: 2 % of them is 0, so the oracle threshold sits just above the highest good part (1.2).
    oracle = m["at_2pct_false_rejects"]
    assert oracle["false_rejects"] == 0 and oracle["escapes"] == 2 and 1.2 < oracle["threshold"] < 1.2001
    assert "an oracle): false rejects 0.0%, escapes 50.0%" in table


def test_escapes_by_defect_area_and_whether_the_peak_was_on_the_defect(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import cv2

    from anomalyd.evaluation.dataset import Sample
    from anomalyd.evaluation.evaluate import Scored, compute_metrics
    from anomalyd.evaluation.report import markdown_table

    def item(kind: str, score: float, area: int, peak: tuple[int, int]) -> Scored:
        mask_path = None
        if area:
            mask = np.zeros((100, 100), np.uint8)
            mask.flat[:area] = 255  # the top rows: rows 0..area//100
            mask_path = tmp_path / f"{kind}_{score}_mask.png"
            cv2.imwrite(str(mask_path), mask)
        fmap = np.zeros((100, 100), np.float32)
        fmap[peak] = 1.0
        return Scored(Sample(tmp_path / f"{kind}.png", kind, mask_path), score, fmap)

    scored = [
        item("good", 0.5, 0, (50, 50)),
        item("good", 0.6, 0, (50, 50)),
        item("pit", 0.9, 50, (0, 10)),  # small, let through, its peak on it
        item("pit", 1.2, 200, (90, 90)),  # small, caught, but for something far from the pit
        item("pit", 1.3, 2000, (21, 50)),  # large (rows 0..19), caught; peak 2 rows below it: within tolerance
    ]
    m = compute_metrics(scored, with_pixels=True, threshold=1.0)
    assert m["escapes_by_area"] == [
        {"area": "0–300 px", "parts": 2, "escapes": 1, "escape_rate": 0.5, "peak_on_defect": 1},
        {"area": "1000–3000 px", "parts": 1, "escapes": 0, "escape_rate": 0.0, "peak_on_defect": 1},
    ]
    assert m["attribution"] == {
        "defective_with_masks": 3,
        "peak_on_defect": 2,
        "rejected": 2,
        "rejected_with_peak_on_defect": 1,
        "caught_for_the_defect_rate": 0.3333,
    }
    table = markdown_table(m, "x")
    assert "| 0–300 px | 2 | 1 (50%) | 1 |" in table
    assert "(map's peak on the defect's mask): 1 of 3 defective parts (33.3%); 1 more" in table


def test_scores_csv_names_each_escape_and_false_reject(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import csv

    import cv2

    from anomalyd.evaluation.dataset import Sample
    from anomalyd.evaluation.evaluate import Scored
    from anomalyd.evaluation.report import write_scores_csv

    mask = np.zeros((20, 30), np.uint8)
    mask[2:5, 3:8] = 255  # 15 px
    cv2.imwrite(str(tmp_path / "pit_mask.png"), mask)
    shape_map = np.zeros((20, 30), np.float32)
    scored = [
        Scored(Sample(tmp_path / "g1.png", "good", None), 0.9, shape_map),
        Scored(Sample(tmp_path / "g2.png", "good", None), 1.3, shape_map),
        Scored(Sample(tmp_path / "pit.png", "pitting", tmp_path / "pit_mask.png"), 1.05, shape_map),
        Scored(Sample(tmp_path / "big.png", "pitting", None), 1.1, None),
    ]
    write_scores_csv(tmp_path / "scores.csv", scored, 1.1)
    rows = list(csv.DictReader((tmp_path / "scores.csv").open()))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == ["g2.png", "big.png", "pit.png", "g1.png"]
    by = {r["path"].rsplit("/", 1)[-1]: r for r in rows}
    assert by["g2.png"]["outcome"] == "false_reject" and by["g2.png"]["verdict"] == "NG"
    assert by["big.png"]["outcome"] == "ok" and by["big.png"]["verdict"] == "NG"  # at the threshold is NG
    assert by["pit.png"]["outcome"] == "escape" and by["pit.png"]["defect_pixels"] == "15"
    assert by["g1.png"]["outcome"] == "ok" and by["g1.png"]["defect_pixels"] == ""
