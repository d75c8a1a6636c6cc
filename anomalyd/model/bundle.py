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
from pydantic import ValidationError

from anomalyd.errors import AnomalydError
from anomalyd.model.manifest import Manifest

FORMAT = "anomalyd-bundle"
# 2: bundle_id is a hash over the whole manifest body and every file (1: over the files only).
FORMAT_VERSION = 2
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


def manifest_id(manifest: dict[str, Any]) -> str:
    """The bundle's identity: a hash over the manifest body (files' checksums included)."""
    body = {k: v for k, v in manifest.items() if k != "bundle_id"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: ``spec`` is the typed manifest, ``manifest`` the file as written."""

    path: Path
    manifest: dict[str, Any]
    spec: Manifest

    @property
    def bundle_id(self) -> str:
        return str(self.manifest["bundle_id"])

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the model input."""
        return self.spec.input_size

    @property
    def reference_score(self) -> float:
        """Raw score that normalises to 1.0."""
        return self.spec.calibration.reference_raw

    @property
    def suggested_threshold(self) -> float:
        return self.spec.thresholds.suggested_image

    def file(self, name: str) -> Path:
        return self.path / name

    def memory_bank(self) -> np.ndarray:
        """The bank, refused unless float32, of the manifest's shape and finite everywhere.

        One non-finite value makes every distance to it non-finite, and a score
        of nan never reaches a threshold: it would pass every part.
        """
        path = self.file(MEMORY_BANK)
        try:
            bank = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise BundleError(f"{path}: not a plain .npy array ({exc})") from None
        expected = self.spec.bank_shape
        if bank.dtype != np.float32:
            raise BundleError(f"{path}: dtype {bank.dtype}, expected float32")
        if bank.shape != expected:
            raise BundleError(f"{path}: shape {bank.shape}, the manifest says {expected}")
        bad = int(np.count_nonzero(~np.isfinite(bank)))
        if bad:
            raise BundleError(f"{path}: {bad} non-finite values (inf or nan); refit the model")
        return np.ascontiguousarray(bank)

    def extractor_state(self) -> dict[str, torch.Tensor]:
        return torch.load(self.file(EXTRACTOR_WEIGHTS), map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add checksums of the bundle's files and a bundle id, then write manifest.json."""
    files = {name: sha256_file(path / name) for name in REQUIRED_FILES}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest, "files": files}
    manifest.pop("bundle_id", None)
    manifest["bundle_id"] = manifest_id(manifest)
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
    if manifest.get("bundle_id") != manifest_id(manifest):
        raise BundleError(
            f"{manifest_path}: the manifest was edited after fit (bundle_id {manifest.get('bundle_id')!r} "
            "does not match its content); refit, or restore the manifest that fit wrote"
        )
    try:
        spec = Manifest.model_validate(manifest)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BundleError(f"{manifest_path}: {where}: {err['msg']} (got {err.get('input')!r})") from None
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: files: not a mapping of checksums")
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
    return Bundle(path, manifest, spec)
