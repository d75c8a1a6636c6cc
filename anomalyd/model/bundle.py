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
import io
import json
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError

from anomalyd.errors import AnomalydError
from anomalyd.model.manifest import Manifest
from anomalyd.model.names import EXTRACTOR_ONNX
from anomalyd.model.signing import SIGNATURE, SignatureError, TrustedKey, verify_signature

FORMAT = "anomalyd-bundle"
# 2: bundle_id is a hash over the whole manifest body and every file (1: over the files only).
FORMAT_VERSION = 2
# 3: the memory is searched in a projection (search_projection.npz). Written only for such bundles, so a
# reader of version 2 refuses them instead of searching the full features the head never learned from.
PROJECTED_FORMAT_VERSION = 3
# 4: the extractor has a stage learned from the line's defects (manifest ``learned``): its output is wider than
# the memory. Written only for such bundles, so an older reader refuses them with "refit" rather than mistaking
# the learned channels for features it searches.
LEARNED_FORMAT_VERSION = 4
READABLE_VERSIONS = (FORMAT_VERSION, PROJECTED_FORMAT_VERSION, LEARNED_FORMAT_VERSION)


def format_version(manifest: dict[str, Any]) -> int:
    """The format version a manifest with these entries is written as (and must be read as)."""
    if manifest.get("learned"):
        return LEARNED_FORMAT_VERSION
    return PROJECTED_FORMAT_VERSION if manifest.get("search_projection") else FORMAT_VERSION


MANIFEST = "manifest.json"
EXTRACTOR_WEIGHTS = "extractor.pt"
MEMORY_BANK = "memory_bank.npy"
REQUIRED_FILES = (EXTRACTOR_ONNX, EXTRACTOR_WEIGHTS, MEMORY_BANK)
HEAD = "head.npz"  # present when the model learned from labelled defects (manifest ``head``)
PROJECTION = "search_projection.npz"  # present with manifest ``search_projection``: mean [C], basis [C, N]
# Far above any real bundle (a Lite0 ONNX is ~14 MB, a large bank a few hundred MB).
MAX_FILE_BYTES = 4 << 30
MAX_MANIFEST_BYTES = 16 << 20


class BundleError(AnomalydError):
    """The bundle cannot be used; the message says which file and why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_id(manifest: dict[str, Any]) -> str:
    """The bundle's identity: a hash over the manifest body (files' checksums included).

    The signature is not part of it: signing a bundle does not change which model it is.
    """
    body = {k: v for k, v in manifest.items() if k not in ("bundle_id", SIGNATURE)}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Bundle:
    """A loaded, verified bundle: ``spec`` is the typed manifest, ``manifest`` the file as written.

    ``path`` is the folder the bundle was read from, resolved once (a line's
    bundle is a symlink that ``promote`` moves). ``blobs`` are the bytes of every
    file, read once and verified: engines build from these bytes, never by
    reading the folder again, so a bundle can never pair one version's manifest
    with another's bank.
    """

    path: Path
    manifest: dict[str, Any]
    spec: Manifest
    blobs: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    signed_by: str | None = None  # the trusted key's id that verified the signature

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

    def blob(self, name: str) -> bytes:
        """The verified bytes of one of the bundle's files (read once at load)."""
        try:
            return self.blobs[name]
        except KeyError:
            raise BundleError(f"{self.path / name}: not read at load") from None

    def memory_bank(self) -> np.ndarray:
        """The bank, refused unless float32, of the manifest's shape and finite everywhere.

        One non-finite value makes every distance to it non-finite, and a score
        of nan never reaches a threshold: it would pass every part.
        """
        path = self.file(MEMORY_BANK)
        try:
            bank = np.load(io.BytesIO(self.blob(MEMORY_BANK)), allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
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

    def head(self, device: torch.device | str = "cpu") -> Any:
        """The supervised head (:class:`anomalyd.model.head.Head`), or None for a good-parts-only model."""
        spec = self.spec.head
        if spec is None:
            return None
        from anomalyd.model.head import Head

        try:
            head = Head.from_bytes(self.blob(HEAD), spec.use_distance, device, spec.context, spec.first_channel)
        except (ValueError, KeyError, OSError) as exc:
            raise BundleError(f"{self.file(HEAD)}: not a plain array file of the head ({exc})") from None
        read = self.spec.extractor_dim - spec.first_channel  # the extractor's channels the head reads
        if read <= 0:
            raise BundleError(f"{self.file(HEAD)}: first_channel {spec.first_channel} is past the extractor's output")
        want = read * (2 if spec.context else 1) + (1 if spec.use_distance else 0)
        if head.input_dim != want:
            raise BundleError(f"{self.file(HEAD)}: takes {head.input_dim} inputs, the manifest says {want}")
        return head

    def search_projection(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(mean [C], basis [C, N]) of the space the memory is searched in, or None (the features as they are)."""
        dims = self.spec.search_projection
        if dims is None:
            return None
        path = self.file(PROJECTION)
        try:
            with np.load(io.BytesIO(self.blob(PROJECTION)), allow_pickle=False) as arrays:
                mean, basis = arrays["mean"], arrays["basis"]
        except (ValueError, KeyError, EOFError, OSError) as exc:
            raise BundleError(f"{path}: not a plain array file of the search projection ({exc})") from None
        c = self.spec.feature_dim
        if mean.shape != (c,) or basis.shape != (c, dims) or mean.dtype != np.float32 or basis.dtype != np.float32:
            raise BundleError(
                f"{path}: mean {mean.shape} {mean.dtype} and basis {basis.shape} {basis.dtype}; "
                f"the manifest says float32 ({c},) and ({c}, {dims})"
            )
        if not (np.isfinite(mean).all() and np.isfinite(basis).all()):
            raise BundleError(f"{path}: non-finite values")
        return mean, basis

    def extractor_state(self) -> dict[str, torch.Tensor]:
        try:
            weights = io.BytesIO(self.blob(EXTRACTOR_WEIGHTS))
            return torch.load(weights, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]
        except Exception as exc:  # torch raises its own types for a damaged or hostile file
            raise BundleError(f"{self.file(EXTRACTOR_WEIGHTS)}: not plain tensor weights ({exc})") from None


def bundle_files(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The files a bundle with this manifest holds (the head only with a ``head`` entry)."""
    return (
        REQUIRED_FILES
        + ((HEAD,) if manifest.get("head") else ())
        + ((PROJECTION,) if manifest.get("search_projection") else ())
    )


def write_manifest(path: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Add checksums of the bundle's files and a bundle id, then write manifest.json."""
    files = {name: sha256_file(path / name) for name in bundle_files(manifest)}
    manifest = {"format": FORMAT, "format_version": format_version(manifest), **manifest, "files": files}
    manifest.pop("bundle_id", None)
    manifest.pop(SIGNATURE, None)
    manifest["bundle_id"] = manifest_id(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def read_regular(folder: Path, name: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``folder/name``, refusing anything but a regular file inside the folder.

    A FIFO would block the load forever and a link to ``/dev/zero`` would fill
    memory; a link out of the bundle is content nobody checked into it.
    """
    target = folder / name
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        raise BundleError(f"{target}: missing from the bundle") from None
    except OSError as exc:
        raise BundleError(f"{target}: cannot read ({exc.strerror})") from None
    if stat.S_ISLNK(st.st_mode):
        real = target.resolve()
        if real.parent != folder:
            raise BundleError(f"{target}: not a regular file (a link out of the bundle, to {real})")
        st = os.stat(real)
        target = real
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{target}: not a regular file (a FIFO, device or folder); refit, or restore the file")
    if st.st_size > limit:
        raise BundleError(f"{target}: {st.st_size} bytes, more than a bundle file may hold ({limit})")
    try:
        fd = os.open(target, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise BundleError(f"{target}: cannot read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):  # swapped between lstat and open
            raise BundleError(f"{target}: not a regular file")
        return fh.read(limit + 1)


def load_bundle(path: Path | str, verify: bool = True, trusted_keys: Sequence[TrustedKey] = ()) -> Bundle:
    """Open a bundle, refusing one with an unknown format or a file that does not match.

    The folder is resolved once (a symlink moved by ``promote`` meanwhile cannot
    mix two bundles), every file is read once and its checksum verified on those
    bytes. With ``trusted_keys`` the manifest must carry a signature by one of them.
    """
    given = Path(path)
    try:
        folder = given.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise BundleError(f"{given}: no such bundle folder") from None
    if not folder.is_dir():
        raise BundleError(f"{given}: not a folder; is this a bundle written by `anomalyd fit`?")
    manifest_path = folder / MANIFEST
    if not (manifest_path.exists() or manifest_path.is_symlink()):
        raise BundleError(f"{given}: no {MANIFEST}; is this a bundle written by `anomalyd fit`?")
    raw = read_regular(folder, MANIFEST, limit=MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: not an anomalyd bundle manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS or version != format_version(manifest):
        raise BundleError(
            f"{manifest_path}: format version {version!r}, this anomalyd reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (3 with a search projection, 4 with a learned stage); "
            "refit the model with this version"
        )
    if manifest.get("bundle_id") != manifest_id(manifest):
        raise BundleError(
            f"{manifest_path}: the manifest was edited after fit (bundle_id {manifest.get('bundle_id')!r} "
            "does not match its content); refit, or restore the manifest that fit wrote"
        )
    try:
        signed_by = verify_signature(manifest, trusted_keys) if trusted_keys else None
    except SignatureError as exc:
        raise BundleError(f"{manifest_path}: {exc}") from None
    try:
        spec = Manifest.model_validate(manifest)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BundleError(f"{manifest_path}: {where}: {err['msg']} (got {err.get('input')!r})") from None
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise BundleError(f"{manifest_path}: files: not a mapping of checksums")
    blobs: dict[str, bytes] = {}
    for name in bundle_files(manifest):
        if name not in files:
            raise BundleError(f"{manifest_path}: no checksum for {name}")
        data = read_regular(folder, name)
        if verify:
            actual = hashlib.sha256(data).hexdigest()
            if actual != files[name]:
                raise BundleError(
                    f"{folder / name}: checksum mismatch (manifest {str(files[name])[:12]}…, file {actual[:12]}…); "
                    "the file is corrupt or was changed after fit"
                )
        blobs[name] = data
    return Bundle(folder, manifest, spec, MappingProxyType(blobs), signed_by)
