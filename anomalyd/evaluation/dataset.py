"""MVTec AD-layout data sets: ``test/<type>/*`` with optional ``ground_truth/<type>/<stem>_mask.png``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from anomalyd.model.images import list_images


@dataclass(frozen=True)
class Sample:
    path: Path
    defect_type: str  # "good" for normal parts
    mask_path: Path | None

    @property
    def is_defect(self) -> bool:
        return self.defect_type != "good"

    def mask(self, shape: tuple[int, int]) -> np.ndarray:
        """Boolean defect mask at ``shape`` (all False for good parts or missing masks)."""
        if self.mask_path is None:
            return np.zeros(shape, dtype=bool)
        mask = cv2.imread(str(self.mask_path), cv2.IMREAD_GRAYSCALE)
        if mask is None:
            raise ValueError(f"{self.mask_path}: not a readable mask")
        if mask.shape != shape:
            mask = cv2.resize(mask, (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST)
        return mask > 0


@dataclass(frozen=True)
class Dataset:
    root: Path
    samples: list[Sample]
    has_masks: bool

    @property
    def train_good(self) -> Path:
        return self.root / "train" / "good"


def load_dataset(root: Path) -> Dataset:
    """Read the test split of an MVTec-layout folder."""
    test = root / "test"
    if not test.is_dir():
        raise FileNotFoundError(f"{root}: no test/ folder (expected MVTec AD layout: test/good, test/<defect>)")
    gt = root / "ground_truth"
    has_masks = gt.is_dir()
    samples = []
    for type_dir in sorted(p for p in test.iterdir() if p.is_dir()):
        for path in list_images(type_dir):
            mask = gt / type_dir.name / f"{path.stem}_mask.png"
            samples.append(Sample(path, type_dir.name, mask if mask.is_file() else None))
    if not any(s.is_defect for s in samples) or not any(not s.is_defect for s in samples):
        raise ValueError(f"{root}: test/ needs both good/ and at least one defect folder")
    return Dataset(root, samples, has_masks)


def labelled_images(folder: Path) -> tuple[list[Path], np.ndarray]:
    """Images with good/defect labels (``fit --val``, ``teach --labelled``): an MVTec-layout folder (test/…)
    or a folder of good/ and defect subfolders; a defect is any folder not named good."""
    root = folder / "test" if (folder / "test").is_dir() else folder
    files: list[Path] = []
    labels: list[bool] = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        imgs = list_images(sub)
        files += imgs
        labels += [sub.name != "good"] * len(imgs)
    if not files:
        raise FileNotFoundError(f"{folder}: no images in subfolders (expected good/ and defect folders)")
    return files, np.array(labels)
