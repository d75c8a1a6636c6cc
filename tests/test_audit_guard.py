"""The audit trail: written before the change, and any tampering found.

Tampering is done the way a person with the file would: a plain sqlite3
connection that drops the triggers, edits, deletes, back-dates and drops the
table. ``anomalyd audit --verify`` and the running daemon must find each one.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from anomalyd.daemon.audit import AuditLog
from tests.conftest import ANOMALYD
from tests.harness import stop, wait_until
from tests.test_fail_closed import hold_lock


def verify(data: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ANOMALYD, "audit", "--verify", "--data-dir", str(data)], capture_output=True, text=True)


def make_log(data: Path, n: int = 5) -> AuditLog:
    audit = AuditLog(data / "inspections.sqlite")
    for i in range(n):
        audit.record("thresholds", {"changed": {"image": {"old": 1.0 + i, "new": 1.1 + i}}}, actor="alice")
    return audit


def edit(data: Path, *sql: str) -> None:
    db = sqlite3.connect(data / "inspections.sqlite")
    db.execute("DROP TRIGGER IF EXISTS audit_no_update")
    db.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    for statement in sql:
        db.execute(statement)
    db.commit()
    db.close()


def _backdated(data: Path) -> None:
    db = sqlite3.connect(data / "inspections.sqlite")
    seq, digest, t = db.execute("SELECT seq, hash, time_ns FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    # A forger who knows the scheme computes a valid hash for a row dated a day earlier.
    from anomalyd.daemon.audit import entry_hash

    when = t - 86_400 * 10**9
    new = entry_hash(digest, seq + 1, when, "mallory", "promote", "{}")
    db.execute("INSERT INTO audit VALUES (?, ?, 'mallory', 'promote', '{}', ?, ?)", (seq + 1, when, digest, new))
    db.commit()
    db.close()
    (data / "audit.head").write_text(f"{seq + 1} {new}\n")


def _restarted(data: Path) -> None:
    edit(data, "DROP TABLE audit")
    AuditLog(data / "inspections.sqlite").record("promote", {"to": "/elsewhere"}, actor="mallory")


TAMPERING: dict[str, tuple[Callable[[Path], None], str]] = {
    "actor changed": (lambda d: edit(d, "UPDATE audit SET actor = 'bob' WHERE seq = 3"), "entry 3"),
    "entry deleted": (lambda d: edit(d, "DELETE FROM audit WHERE seq = 2"), "entry 2"),
    "last entry deleted": (lambda d: edit(d, "DELETE FROM audit WHERE seq = 5"), "entry 5"),
    "back-dated insert": (_backdated, "entry 6"),
    "table dropped and begun again": (_restarted, "entry 5"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(TAMPERING))
def test_each_tampering_is_found_by_audit_verify(tmp_path: Path, case: str) -> None:
    make_log(tmp_path)
    out = verify(tmp_path)
    assert out.returncode == 0 and "5 entries" in out.stdout, out.stderr
    tamper, names = TAMPERING[case]
    tamper(tmp_path)
    out = verify(tmp_path)
    assert out.returncode == 1, out.stdout
    assert out.stderr.startswith("audit chain broken:") and names in out.stderr, out.stderr


@pytest.mark.e2e
def test_a_promote_that_cannot_be_audited_is_refused_and_the_link_stays(
    e2e_bundle: Path, bundle_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    make_log(data, 1)
    link = tmp_path / "current"
    os.symlink(e2e_bundle, link)
    locker = hold_lock(data / "inspections.sqlite", 12.0)
    try:
        out = subprocess.run(
            [*ANOMALYD, "promote", str(bundle_dir), "--link", str(link), "--data-dir", str(data), "--no-reload"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        locker.kill()
        locker.wait()
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0 and "cannot write the audit entry" in out.stderr
    assert os.readlink(link) == str(e2e_bundle) and not (tmp_path / "current.history").exists()
    out = subprocess.run(
        [*ANOMALYD, "promote", str(bundle_dir), "--link", str(link), "--data-dir", str(data), "--no-reload"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert os.readlink(link) == str(bundle_dir.resolve())
    assert verify(data).returncode == 0


def test_a_reload_that_cannot_be_audited_keeps_the_old_thresholds(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, thresholds__image=5.0)
    assert r.plc.read_status().threshold == pytest.approx(5.0)
    r.write_config(thresholds__image=0.5)
    locker = hold_lock(r.data / "inspections.sqlite", 4.0)
    try:
        r.process.send_signal(signal.SIGHUP)
        wait_until(lambda: '"reload.refused"' in (r.config.parent / "daemon.log").read_text(), what="refused")
        assert r.plc.read_status().threshold == pytest.approx(5.0)  # refused: not applied, not audited
    finally:
        locker.kill()
        locker.wait()
    r.process.send_signal(signal.SIGHUP)  # the database free again: the same edit is audited, then applied
    assert r.plc.wait_for(lambda s: abs(s.threshold - 0.5) < 1e-6, 10.0) is not None
    assert stop(r) == 0
    entries = AuditLog(r.data / "inspections.sqlite").recent(10)
    changes = [e for e in entries if e["action"] == "thresholds"]
    assert len(changes) == 1 and changes[0]["detail"]["changed"]["image"] == {"old": 5.0, "new": 0.5}


def test_the_daemon_reports_a_broken_chain_and_keeps_inspecting(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    make_log(data, 3)
    edit(data, "UPDATE audit SET actor = 'bob' WHERE seq = 2")
    r = daemon_factory(e2e_bundle, sample_dir)
    res = r.plc.inspect_once(10.0)
    assert res is not None and res.attributed and res.status.error_code == 0  # the line runs on
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5).read().decode()
    assert "anomalyd_audit_chain_ok 0.0" in metrics
    state = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{r.page_port}/api/state", timeout=5).read())
    assert "entry 2" in state["audit_broken"]
    assert stop(r) == 0
    assert '"audit.chain_broken"' in (r.config.parent / "daemon.log").read_text()
