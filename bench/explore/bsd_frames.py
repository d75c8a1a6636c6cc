"""BSData's test frames as the issue-23 explorations read them: files, labels, camera views, pit areas,
and the feature cells each pit's mask touches (the same reading as ``bench/supervised_cv.py``)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalyd.training.defects import Defect, defect_cells


@dataclass(frozen=True)
class TestFrames:
    files: list[Path]
    labels: np.ndarray  # True: pitted
    views: np.ndarray  # split.csv's position_angle
    area: np.ndarray  # mask pixels (0 for good frames)
    data: Path

    def pit_cells(self, grid: tuple[int, int]) -> np.ndarray:
        """``[N, h·w]`` True on the cells each pitted frame's mask touches."""
        pits = np.zeros((len(self.files), grid[0] * grid[1]), bool)
        for i in np.flatnonzero(self.labels):
            mask = self.data / "ground_truth" / "pitting" / f"{self.files[i].stem}_mask.png"
            found = defect_cells(Defect(self.files[i], "pitting", mask), grid, None)
            assert found is not None
            pits[i] = found
        return pits


def test_frames(data: Path) -> TestFrames:
    rows = {r["path"]: r for r in csv.DictReader((data / "split.csv").open())}
    files = sorted((data / "test").rglob("*.jpg"))
    rel = [str(t.relative_to(data)) for t in files]
    return TestFrames(
        files=files,
        labels=np.array([t.parent.name != "good" for t in files]),
        views=np.array([rows[r]["position_angle"] for r in rel]),
        area=np.array([float(rows[r]["mask_pixels"] or 0) for r in rel]),
        data=data,
    )
