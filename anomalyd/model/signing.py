"""Signed bundles: an Ed25519 signature over the manifest, checked against keys the plant trusts.

The manifest's checksums bind every file of the bundle, and ``bundle_id`` is a
hash anyone can recompute: it finds accidents, not intent. Whoever can write the
bundle's folder could raise ``calibration.reference_raw`` and make every part
pass. A signature by a key kept off the line PC cannot be recomputed there. The
signature covers the whole manifest except itself (so ``bundle_id`` and every
file's SHA-256); signing does not change the bundle's id.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from anomalyd.errors import AnomalydError

SIGNATURE = "signature"
ALGORITHM = "ed25519"
PRIVATE_NAME = "signing.key"
PUBLIC_NAME = "signing.pub"


class SignatureError(AnomalydError):
    """A key cannot be read, or a manifest is not signed by a trusted key."""


@dataclass(frozen=True)
class TrustedKey:
    path: Path
    key_id: str
    public: Ed25519PublicKey


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def signed_bytes(manifest: dict[str, Any]) -> bytes:
    """What is signed: the canonical JSON of the manifest without its signature."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def keygen(out: Path) -> tuple[Path, Path]:
    """A new Ed25519 pair in ``out``: the private key mode 0600 (never overwritten), the public key."""
    out.mkdir(parents=True, exist_ok=True)
    private, public = out / PRIVATE_NAME, out / PUBLIC_NAME
    for existing in (private, public):
        if existing.exists():
            raise SignatureError(f"{existing}: already exists; a signing key is never overwritten")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    public.write_bytes(pub)
    return private, public


def _read_key(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SignatureError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def load_private_key(path: Path) -> Ed25519PrivateKey:
    data = _read_key(path, "signing key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key (made by `anomalyd keygen`?)")
    return key


def load_trusted_key(path: Path) -> TrustedKey:
    data = _read_key(path, "trusted key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as exc:
        raise SignatureError(f"{path}: not a PEM public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: not an Ed25519 public key (signing.pub from `anomalyd keygen`)")
    return TrustedKey(path, key_id(key), key)


def load_trusted_keys(paths: list[Path] | tuple[Path, ...]) -> list[TrustedKey]:
    return [load_trusted_key(p) for p in paths]


def sign_manifest(manifest: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """The manifest with a signature by ``key`` (any earlier signature replaced)."""
    body = {k: v for k, v in manifest.items() if k != SIGNATURE}
    value = key.sign(signed_bytes(body))
    return {
        **body,
        SIGNATURE: {
            "algorithm": ALGORITHM,
            "key_id": key_id(key.public_key()),
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


def verify_signature(manifest: dict[str, Any], trusted: Sequence[TrustedKey]) -> str:
    """The id of the trusted key that signed ``manifest``; SignatureError if none did."""
    sig = manifest.get(SIGNATURE)
    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM:
        raise SignatureError("not signed, and model.trusted_keys requires a signature (fit --sign-key)")
    try:
        value = base64.b64decode(str(sig.get("value", "")), validate=True)
    except ValueError:
        raise SignatureError("signature: not base64") from None
    message = signed_bytes(manifest)
    for key in trusted:
        try:
            key.public.verify(value, message)
        except InvalidSignature:
            continue
        return key.key_id
    names = ", ".join(k.path.name for k in trusted)
    raise SignatureError(
        f"signature by key {sig.get('key_id')!r} does not verify with any trusted key ({names}): "
        "the manifest was changed after signing, or it was signed by another key"
    )
