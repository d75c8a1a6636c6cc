"""CLI of signed bundles: keygen, sign, and the ``--trusted-key`` option of the tools that load bundles."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from anomalyd.model.signing import TrustedKey, load_private_key, load_trusted_keys


def add_trusted_key_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trusted-key",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="refuse a bundle not signed by this public key (repeatable; signing.pub from keygen)",
    )


def trusted_from(args: argparse.Namespace) -> list[TrustedKey]:
    return load_trusted_keys(list(getattr(args, "trusted_key", []) or []))


def sign_bundle(folder: Path, key_file: Path) -> str:
    """Add a signature by ``key_file`` to the bundle in ``folder``; the key id that signed.

    The bundle is verified first (never sign what does not load), and the manifest
    is replaced in one rename, so a daemon reading meanwhile sees one or the other.
    """
    from anomalyd.model.bundle import MANIFEST, load_bundle
    from anomalyd.model.signing import key_id, sign_manifest

    key = load_private_key(key_file)
    bundle = load_bundle(folder)
    signed = sign_manifest(bundle.manifest, key)
    target = bundle.path / MANIFEST
    tmp = target.with_name(f".{MANIFEST}.sign-{os.getpid()}")
    tmp.write_text(json.dumps(signed, indent=2) + "\n", encoding="utf-8")
    tmp.chmod(0o444)
    os.replace(tmp, target)
    return key_id(key.public_key())


def cmd_keygen(args: argparse.Namespace) -> int:
    from anomalyd.model.signing import keygen

    private, public = keygen(args.out)
    print(f"private key → {private} (mode 0600: keep it off the line PC)")
    print(f"public key  → {public} (model.trusted_keys on the line PC)")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    kid = sign_bundle(args.bundle, args.key)
    print(f"{args.bundle}: signed by key {kid}")
    return 0


def add_signing_commands(sub: Any) -> None:
    p = sub.add_parser("keygen", help="write a new Ed25519 signing pair: DIR/signing.key (0600), DIR/signing.pub")
    p.add_argument("--out", type=Path, required=True, help="folder for the pair (never overwritten)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign a bundle's manifest (on the machine that holds the private key)")
    p.add_argument("bundle", type=Path)
    p.add_argument("--key", type=Path, required=True, help="signing.key from keygen")
    p.set_defaults(func=cmd_sign)
