"""What the daemon loads: one bundle from one resolved folder, signed where the plant says so.

Promote/rollback races against running parts, a re-hashed manifest, a FIFO or a
link out of the bundle, a re-bound feature width and a damaged rollback history:
each reproduced from outside (the real daemon or the real CLI) and refused.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import SearchConfig
from anomalyd.engines.auto_engine import AutoEngineConfig
from anomalyd.engines.select import open_inspector
from anomalyd.model import bundle as bundle_io
from anomalyd.model.bundle import BundleError, load_bundle
from anomalyd.model.images import read_rgb
from anomalyd.model.signing import load_trusted_key
from anomalyd.training.fit import FitSettings, fit
from tests.conftest import ANOMALYD
from tests.harness import stop, wait_until


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ANOMALYD, *args], capture_output=True, text=True, timeout=timeout)


def copy_bundle(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def rebind(folder: Path, **changes: object) -> None:
    """Edit the manifest and recompute its id, as whoever can write the folder could."""
    path = folder / bundle_io.MANIFEST
    manifest = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = manifest
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node[key]
        node[leaf] = value
    manifest.pop("signature", None)
    manifest["bundle_id"] = bundle_io.manifest_id(manifest)
    path.chmod(0o644)
    path.write_text(json.dumps(manifest, indent=2))


@pytest.fixture(scope="module")
def bundle_b(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second model of the same part whose scores differ from ``e2e_bundle``'s."""
    out = tmp_path_factory.mktemp("bundle_b")
    fit(sample_dir / "train" / "good", out, FitSettings(coreset_ratio=0.004, seed=5))
    return out


# ---------------------------------------------------------------- one folder, read once
def test_a_bundle_is_read_once_from_the_folder_the_link_named(e2e_bundle: Path, bundle_b: Path, tmp_path: Path) -> None:
    link = tmp_path / "current"
    os.symlink(e2e_bundle, link)
    loaded = load_bundle(link)
    os.replace(_symlink(tmp_path, bundle_b), link)  # a promote after the load: nothing more is read
    assert loaded.path == e2e_bundle.resolve()
    assert loaded.blob(bundle_io.MEMORY_BANK) == (e2e_bundle / bundle_io.MEMORY_BANK).read_bytes()
    bank = loaded.memory_bank()
    assert bank.shape == loaded.spec.bank_shape
    assert not np.array_equal(bank.shape, load_bundle(link).memory_bank().shape) or not np.array_equal(
        bank, load_bundle(link).memory_bank()
    )


def _symlink(folder: Path, target: Path) -> Path:
    tmp = folder / f".tmp-{time.monotonic_ns()}"
    os.symlink(target, tmp)
    return tmp


def test_promote_and_rollback_races_never_mix_two_bundles(
    daemon_factory, e2e_bundle: Path, bundle_b: Path, sample_dir: Path, tmp_path: Path
) -> None:
    """Link rename + SIGHUP every 20–350 ms while parts run (as promote/rollback do)."""
    link = tmp_path / "current"
    os.symlink(e2e_bundle, link)
    r = daemon_factory(link, sample_dir / "test")
    pid = r.process.pid
    targets = [bundle_b, e2e_bundle]
    done = threading.Event()
    flips: list[Path] = []

    b_id = load_bundle(bundle_b).bundle_id

    def judged_by_b() -> object:
        with sqlite3.connect(r.data / "inspections.sqlite") as db:
            return db.execute("SELECT 1 FROM inspections WHERE bundle_id = ? LIMIT 1", (b_id,)).fetchone()

    def flipper() -> None:
        # First one promote that B finishes (its load may outlast every random window on a slow machine),
        # so both bundles have judged parts; then the race.
        os.replace(_symlink(tmp_path, bundle_b), link)
        os.kill(pid, signal.SIGHUP)
        flips.append(bundle_b)
        wait_until(judged_by_b, 60.0, "bundle B judging a part after its promote")
        rng = random.Random(7)
        for i in range(12):
            target = targets[i % 2]
            os.replace(_symlink(tmp_path, target), link)
            os.kill(pid, signal.SIGHUP)
            flips.append(target)
            time.sleep(rng.uniform(0.02, 0.35))
        done.set()

    thread = threading.Thread(target=flipper)
    thread.start()
    while not done.is_set():
        res = r.plc.inspect_once(15.0)
        assert res is not None and res.attributed
    thread.join()
    final = flips[-1]
    final_id = load_bundle(final).bundle_id
    # Within one reload the last rollback is in force: every part after it is judged by it.
    deadline = time.monotonic() + 30
    after: list[int] = []
    while len(after) < 4 and time.monotonic() < deadline:
        res = r.plc.inspect_once(15.0)
        assert res is not None and res.attributed
        if res.status.error_code == 0:
            after.append(res.status.inspection_id)
    assert len(after) == 4, "the final bundle never took over"
    assert stop(r) == 0
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        rows = db.execute(
            "SELECT inspection_id, bundle_id, score, source FROM inspections WHERE score IS NOT NULL"
        ).fetchall()
    by_id = {b.bundle_id: b for b in (load_bundle(e2e_bundle), load_bundle(bundle_b))}
    assert {row[1] for row in rows} == set(by_id), "both bundles judged parts"
    inspectors = {k: open_inspector(b, AutoEngineConfig(), SearchConfig()) for k, b in by_id.items()}
    wrong = []
    for inspection_id, bundle_id, score, source in rows:
        frame = read_rgb(Path(source))
        own = inspectors[bundle_id].inspect(frame).score
        other = next(i for k, i in inspectors.items() if k != bundle_id).inspect(frame).score
        assert abs(own - other) > 1e-3, "the two bundles must score this frame differently"
        if abs(own - score) > 1e-4:
            wrong.append((inspection_id, bundle_id, score, own))
        if inspection_id in after:
            assert bundle_id == final_id, (inspection_id, bundle_id)
    assert not wrong, f"records whose score is not their named bundle's: {wrong}"


def test_a_reload_during_a_load_is_applied_when_the_load_ends(e2e_bundle: Path, bundle_b: Path, tmp_path: Path) -> None:
    """RecipeBook with a slow opener: a second reload while loading is queued, never dropped."""
    from anomalyd.config import AppConfig
    from anomalyd.daemon.handshake import Handshake
    from anomalyd.daemon.recipes import RecipeBook, RecipeSpec

    link = tmp_path / "current"
    os.symlink(e2e_bundle, link)
    config = AppConfig.model_validate({"model": {"bundle": str(link)}, "camera": {"type": "simulated"}})
    gate = threading.Event()
    real = RecipeBook.opener(config)
    opened: list[str] = []

    def slow(spec: RecipeSpec):  # type: ignore[no-untyped-def]
        inspector = real(spec)
        opened.append(inspector.bundle.bundle_id)
        if len(opened) > 1:
            gate.wait(10)
        return inspector

    book = RecipeBook(config, Handshake(budget_ms=500, grab_timeout_ms=200), slow)
    book.load_all()
    a, b = load_bundle(e2e_bundle).bundle_id, load_bundle(bundle_b).bundle_id
    os.replace(_symlink(tmp_path, bundle_b), link)
    assert book.apply(config) == [0]  # promote: B loads
    wait_until(lambda: len(opened) == 2, what="B's load under way")
    os.replace(_symlink(tmp_path, e2e_bundle), link)
    assert book.apply(config) == []  # rollback while B is loading: queued
    assert book.state()["loading"] == [0]
    gate.set()
    wait_until(lambda: not book.state()["loading"], 20.0, "the queued rollback's load")
    state = book.state()
    assert state["loaded"] == {0: {"name": "", "bundle": a}} and not state["failed"], state
    assert opened[:2] == [a, b] and opened[-1] == a
    book.close()


# ---------------------------------------------------------------- signed bundles
@pytest.mark.e2e
def test_a_rehashed_manifest_is_refused_when_keys_are_trusted(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    out = run_cli("keygen", "--out", str(keys))
    assert out.returncode == 0, out.stderr
    assert (keys / "signing.key").stat().st_mode & 0o777 == 0o600
    assert run_cli("keygen", "--out", str(keys)).returncode == 1  # never overwritten
    signed = copy_bundle(e2e_bundle, tmp_path / "signed")
    out = run_cli("sign", str(signed), "--key", str(keys / "signing.key"))
    assert out.returncode == 0, out.stderr
    trusted = load_trusted_key(keys / "signing.pub")
    assert load_bundle(signed, trusted_keys=[trusted]).signed_by == trusted.key_id
    assert load_bundle(signed).bundle_id == load_bundle(e2e_bundle).bundle_id  # signing keeps the identity
    pub = str(keys / "signing.pub")
    assert (
        run_cli("score", "--bundle", str(signed), "--trusted-key", pub, str(sample_dir / "test" / "good")).returncode
        == 0
    )

    # Whoever can write the folder: every part passes, and the id still matches its content.
    tampered = copy_bundle(signed, tmp_path / "tampered")
    manifest = json.loads((tampered / "manifest.json").read_text())
    rebind(tampered, calibration__reference_raw=1e9)
    (tampered / "manifest.json").chmod(0o644)
    m2 = json.loads((tampered / "manifest.json").read_text())
    m2["signature"] = manifest["signature"]  # the old signature kept
    (tampered / "manifest.json").write_text(json.dumps(m2))
    load_bundle(tampered)  # without trusted keys: loads, as before
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(tampered, trusted_keys=[trusted])
    with pytest.raises(BundleError, match="not signed"):
        load_bundle(e2e_bundle, trusted_keys=[trusted])
    out = run_cli("score", "--bundle", str(tampered), "--trusted-key", pub, str(sample_dir / "test" / "good"))
    assert out.returncode == 1 and "does not verify" in out.stderr and out.stderr.count("\n") == 1

    # The daemon: one line, exit 2, never ready.
    cfg = tmp_path / "tampered.yaml"
    cfg.write_text(
        "model:\n  bundle: tampered\n  trusted_keys: [keys/signing.pub]\n"
        f"camera:\n  type: simulated\n  source: {sample_dir / 'test'}\n"
        f"daemon:\n  data_dir: {tmp_path / 'data-t'}\n  trigger: free_run\nplc:\n  type: none\n"
        "metrics:\n  enabled: false\npage:\n  enabled: false\n"
    )
    started = run_cli("run", "--config", str(cfg), timeout=120)
    assert started.returncode == 2, started.stderr
    assert started.stderr.strip().splitlines()[-1].startswith("anomalyd run: cannot start:")
    assert "does not verify" in started.stderr.strip().splitlines()[-1]
    # Signed and trusted: the daemon starts and judges with it.
    r = daemon_factory(signed, sample_dir / "test", model__trusted_keys=[pub])
    res = r.plc.inspect_once(10.0)
    assert res is not None and res.attributed and res.status.error_code == 0
    assert stop(r) == 0
    # promote refuses an unsigned bundle when asked to trust a key; the link stays.
    link = tmp_path / "current"
    os.symlink(signed, link)
    out = run_cli("promote", str(tampered), "--link", str(link), "--data-dir", str(r.data), "--trusted-key", pub)
    assert out.returncode == 1 and os.readlink(link) == str(signed)


# ---------------------------------------------------------------- start-up faults: one line, exit 2
def _start(tmp_path: Path, bundle: Path, sample_dir: Path) -> subprocess.CompletedProcess[str]:
    cfg = tmp_path / "a.yaml"
    cfg.write_text(
        f"model:\n  bundle: {bundle}\ncamera:\n  type: simulated\n  source: {sample_dir / 'test'}\n"
        f"daemon:\n  data_dir: {tmp_path / 'data'}\n  trigger: free_run\nplc:\n  type: none\n"
        "metrics:\n  enabled: false\npage:\n  enabled: false\n"
    )
    return run_cli("run", "--config", str(cfg), timeout=120)


def _one_line_exit_2(out: subprocess.CompletedProcess[str], *words: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("anomalyd run: cannot start:"), last
    for word in words:
        assert word in last, last


@pytest.mark.e2e
def test_a_bank_that_is_a_fifo_or_a_link_out_of_the_bundle_is_not_a_regular_file(
    e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    fifo = copy_bundle(e2e_bundle, tmp_path / "fifo")
    (fifo / bundle_io.MEMORY_BANK).unlink()
    os.mkfifo(fifo / bundle_io.MEMORY_BANK)
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(fifo)
    zero = copy_bundle(e2e_bundle, tmp_path / "zero")
    (zero / bundle_io.MEMORY_BANK).unlink()
    os.symlink("/dev/zero", zero / bundle_io.MEMORY_BANK)
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(zero)
    _one_line_exit_2(_start(tmp_path, fifo, sample_dir), "not a regular file")


@pytest.mark.e2e
def test_a_bank_rebound_to_another_feature_width_is_one_line(
    e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    bundle = copy_bundle(e2e_bundle, tmp_path / "rebound")
    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = manifest["memory_bank_size"]
    bank = np.zeros((rows, 100), dtype=np.float32)
    np.save(bundle / bundle_io.MEMORY_BANK, bank, allow_pickle=False)
    files = dict(manifest["files"], **{bundle_io.MEMORY_BANK: bundle_io.sha256_file(bundle / bundle_io.MEMORY_BANK)})
    rebind(bundle, feature_dim=100, files=files)
    _one_line_exit_2(_start(tmp_path, bundle, sample_dir), "the extractor gives", "refit")


@pytest.mark.e2e
@pytest.mark.parametrize("history", [b'{"from": "/x", "to"', b"\x00\xff\xfe binary", b'["a", "b"]\n'])
def test_a_damaged_rollback_history_is_one_line(e2e_bundle: Path, tmp_path: Path, history: bytes) -> None:
    link = tmp_path / "current"
    os.symlink(e2e_bundle, link)
    (tmp_path / "current.history").write_bytes(history)
    (tmp_path / "data").mkdir()
    out = run_cli("rollback", "--link", str(link), "--data-dir", str(tmp_path / "data"), "--no-reload")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr
    assert "current.history" in out.stderr and os.readlink(link) == str(e2e_bundle)
