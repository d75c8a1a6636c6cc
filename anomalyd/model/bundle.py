"""The model bundle: a folder that ``fit`` writes and everything else loads.

``manifest.json`` says what the model is and holds the SHA-256 of every other
file. Loading checks the format version and every checksum before anything is
used: a wrong or corrupt bundle is an error, never a silently bad score. Nothing
here can execute code when loaded: ONNX is a graph, the torch weights are read
with ``weights_only=True`` and the memory bank is a ``.npy`` read with
``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomalyd.errors import AnomalydError

FORMAT = "anomalyd-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
EXTRACTOR_ONNX = "extractor.onnx"
EXTRACTOR_WEIGHTS = "extractor.pt"
MEMORY_BANK = "memory_bank.npy"
REQUIRED_FILES = (EXTRACTOR_ONNX, EXTRACTOR_WEIGHTS, MEMORY_BANK)


class BundleError(AnomalydError):
    """The bundle cannot be used; the message says which file and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle."""

    path: Path
    manifest: dict[str, Any]

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        h, w = self.manifest["input_size"]
        return int(h), int(w)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.manifest["normalisation"]["mean"])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.manifest["normalisation"]["std"])  # type: ignore[return-value]

    @property
    def reference_score(self) -> float:
        """Raw score that normalises to 1.0 (the highest held-back good part)."""
        return float(self.manifest["calibration"]["reference_raw"])

    @property
    def suggested_threshold(self) -> float:
        return float(self.manifest["thresholds"]["suggested_image"])

    @property
    def map_sigma(self) -> float:
        return float(self.manifest["map"]["sigma"])

    def file(self, name: str) -> Path:
        return self.path / name

    def memory_bank(self) -> np.ndarray:
        bank = np.load(self.file(MEMORY_BANK), allow_pickle=False)
        if bank.ndim != 2 or bank.shape[1] != self.manifest["feature_dim"]:
            raise BundleError(
                f"{self.file(MEMORY_BANK)}: shape {bank.shape}, expected [N, {self.manifest['feature_dim']}]"
            )
        return np.ascontiguousarray(bank, dtype=np.float32)

    def extractor_state(self) -> dict[str, torch.Tensor]:
        return torch.load(self.file(EXTRACTOR_WEIGHTS), map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add checksums of the bundle's files and a bundle id, then write manifest.json."""
    files = {name: sha256_file(path / name) for name in REQUIRED_FILES}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    manifest["bundle_id"] = hashlib.sha256("".join(files[n] for n in sorted(files)).encode()).hexdigest()[:12]
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def load_bundle(path: Path | str, verify: bool = True) -> Bundle:
    """Open a bundle, refusing one with an unknown format or a file that does not match."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path}: no {MANIFEST}; is this a bundle written by `anomalyd fit`?")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an anomalyd bundle manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format version {version!r}, this anomalyd reads version {FORMAT_VERSION}; "
            "refit the model with this version"
        )
    files = manifest.get("files", {})
    for name in REQUIRED_FILES:
        target = path / name
        if name not in files:
            raise BundleError(f"{manifest_path}: no checksum for {name}")
        if not target.is_file():
            raise BundleError(f"{target}: missing from the bundle")
        if verify:
            actual = sha256_file(target)
            if actual != files[name]:
                raise BundleError(
                    f"{target}: checksum mismatch (manifest {files[name][:12]}…, file {actual[:12]}…); "
                    "the file is corrupt or was changed after fit"
                )
    return Bundle(path, manifest)
