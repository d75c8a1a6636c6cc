"""Learning from the line with the real daemon: a lamp change, the drift alarm, teach, fit, compare,
promote, rollback, and every step in the audit log."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import cv2
import pytest

from anomalyd.drivers.plc.layout import Status
from anomalyd.drivers.plc.sim import SimulatedPlc
from anomalyd.model.images import read_rgb
from anomalyd.overlay import write_rgb
from anomalyd.sample import SURFACE_DEFECTS, write_sample
from tests.conftest import ANOMALYD
from tests.harness import Running, free_port, launch, station_config, stop, wait_until


def cli(*args: str) -> str:
    out = subprocess.run([*ANOMALYD, *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"anomalyd {' '.join(args)}:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def run_parts(r: Running, n: int) -> list[Status]:
    out = []
    for _ in range(n):
        res = r.plc.inspect_once(10.0)
        assert res is not None and res.attributed
        out.append(res.status)
    return out


def sources(r: Running, ids: list[int] | None = None, timeout: float = 10.0) -> dict[int, str]:
    """inspection_id → source frame, from the records; waits until ``ids`` are recorded.

    The record is written after the PLC sees the result (records are not required
    here), so a test that reads right after a part can be ahead of the records thread.
    """
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(r.data / "inspections.sqlite") as db:
            found = dict(db.execute("SELECT inspection_id, source FROM inspections").fetchall())
        missing = [i for i in ids or [] if i not in found]
        if not missing:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"inspections {missing} not recorded within {timeout} s")
        time.sleep(0.05)


@pytest.mark.e2e
def test_lamp_change_drift_teach_promote_rollback(daemon_factory, sample_dir: Path, tmp_path: Path) -> None:
    bundles = tmp_path / "bundles"
    old = Path(cli("fit", "--good", str(sample_dir / "train" / "good"), "--into", str(bundles)).splitlines()[0])
    link = bundles / "current"
    link.symlink_to(old)
    # Surface defects only: a global (PatchCore) bundle is not the tool for a missing mark (tests/test_position.py).
    line = write_sample(tmp_path / "line", train=0, test_good=30, per_defect=2, seed=5, kinds=SURFACE_DEFECTS) / "test"
    per_pass = sum(1 for _ in line.rglob("*.png"))  # 36: chip 2, good 30, scratch 2, stain 2
    r = daemon_factory(
        link,
        line,
        camera__faults={"lamp_after": per_pass, "lamp_gain": 1.5},
        drift__window=30,
        drift__min_parts=20,
        drift__margin=0.2,
        archive__ok_sample_every=1,
    )
    data = str(r.data)

    def verdicts(statuses: list[Status]) -> tuple[int, int]:
        """(good parts rejected, defective parts passed) of the last statuses, from the records' sources."""
        src = sources(r, [s.inspection_id for s in statuses])
        good_ng = sum(s.fail for s in statuses if "/good/" in src[s.inspection_id])
        defect_ok = sum(s.passed for s in statuses if "/good/" not in src[s.inspection_id])
        return good_ng, defect_ok

    normal = run_parts(r, per_pass)
    r.wait_rows(per_pass)
    assert verdicts(normal) == (0, 0) and not r.plc.read_status().drift

    # The lamp is replaced: every frame brighter. Good parts are rejected and the alarm rises in the window.
    bright = run_parts(r, per_pass)
    assert r.plc.read_status().drift, "no drift alarm within the window"
    good_ng, _ = verdicts(bright)
    assert good_ng >= 15

    # Teach 20 of the rejected good parts, fit a new bundle next to the old one, compare, promote.
    r.wait_rows(2 * per_pass)
    src = sources(r)
    taught = [s.inspection_id for s in bright if "/good/" in src[s.inspection_id]]
    candidates = tmp_path / "candidates"
    cli("teach", "--data-dir", data, "--out", str(candidates), "--ids", ",".join(map(str, taught)))
    assert len(list(candidates.glob("*.png"))) == len(taught) == 30 and (candidates / "sources.jsonl").is_file()
    # The plant's reference parts (known good and known defects), photographed under the new lamp, set
    # the threshold (fit --val); without them the margin above the held-back good parts is used.
    references = tmp_path / "references"
    for image in (write_sample(tmp_path / "ref", train=0, test_good=6, per_defect=2, seed=11) / "test").rglob("*.png"):
        target = references / image.parent.name / image.name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_rgb(str(target), cv2.convertScaleAbs(read_rgb(image), alpha=1.5))
    new = Path(
        cli(
            "fit",
            "--good",
            str(sample_dir / "train" / "good"),
            "--good",
            str(candidates),
            "--val",
            str(references),
            "--into",
            str(bundles),
        ).splitlines()[0]
    )
    assert new != old and old.is_dir()  # the old bundle stays, untouched
    compared = cli("compare", str(old), str(new), "--data-dir", data, "--last", str(per_pass))
    report = json.loads(compared.split("\nreport")[0])
    assert len(report["ng_to_ok"]) >= 15 and report["ok_to_ng"] == []
    cli("promote", str(new), "--link", str(link), "--data-dir", data)
    assert r.plc.wait_for(lambda s: s.trigger_ready and not s.recipe_changing, 30.0)
    promoted = run_parts(r, per_pass)
    good_ng, defect_ok = verdicts(promoted)
    assert good_ng <= 1 and defect_ok == 0, (good_ng, defect_ok)  # the defects still fail
    assert not r.plc.read_status().drift  # the new bundle's calibration matches the new lamp

    # Roll back: the old bundle's verdicts return.
    cli("rollback", "--link", str(link), "--data-dir", data)
    assert Path(link.readlink()) == old.resolve()
    assert r.plc.wait_for(lambda s: s.trigger_ready and not s.recipe_changing, 30.0)
    back = run_parts(r, per_pass)
    assert verdicts(back)[0] >= 15
    assert stop(r) == 0

    # Every step is in the audit log, and the log cannot be edited.
    audit = cli("audit", "--data-dir", data)
    for action in ("start", "teach", "promote", "rollback", "recipes", "stop"):
        assert f" {action} " in audit, f"{action} missing:\n{audit}"
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("DELETE FROM audit")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            db.execute("UPDATE audit SET actor = 'someone else'")
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        rows = dict(db.execute("SELECT inspection_id, bundle_id FROM inspections").fetchall())
    new_id = json.loads((new / "manifest.json").read_text())["bundle_id"]
    assert {rows[s.inspection_id] for s in promoted} == {new_id}  # records name the bundle that judged


@pytest.mark.e2e
def test_bundles_are_never_overwritten(bundle_dir: Path, sample_dir: Path) -> None:
    out = subprocess.run(
        [*ANOMALYD, "fit", "--good", str(sample_dir / "train" / "good"), "--out", str(bundle_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "bundles are never overwritten" in out.stderr


def test_reload_signal_reaches_the_daemon(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    pid = int((r.data / "anomalyd.pid").read_text())
    assert pid == r.process.pid
    r.process.send_signal(signal.SIGHUP)
    assert r.plc.inspect_once(10.0) is not None
    assert stop(r) == 0


@pytest.mark.e2e
def test_a_reload_signal_while_the_daemon_starts_does_not_end_it(
    tmp_path: Path, e2e_bundle: Path, sample_dir: Path
) -> None:
    """`anomalyd promote` finds the daemon by its pid file and may signal it at once: SIGHUP's
    default action would end the process (a restart loop under systemd, the line without answers)."""
    port = free_port()
    plc = SimulatedPlc("s7", port=port)
    plc.start()
    link = {"type": "s7", "port": port, "timeout_s": 0.5, "reconnect_max_s": 0.5}
    config, _ = station_config(tmp_path, e2e_bundle, sample_dir, link)
    process = launch(config, tmp_path / "daemon.log")
    try:
        pid_file = tmp_path / "data" / "anomalyd.pid"
        wait_until(lambda: pid_file.is_file() and pid_file.read_text().strip(), 60.0, "the pid file")
        assert int(pid_file.read_text()) == process.pid
        process.send_signal(signal.SIGHUP)  # before the bundle is loaded and READY is written
        assert plc.wait_for(lambda s: s.ready, 90.0) is not None, (tmp_path / "daemon.log").read_text()[-3000:]
        result = plc.inspect_once(10.0)
        assert result is not None and result.attributed
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "reload.applied" in (tmp_path / "daemon.log").read_text()  # the signal was taken as a reload
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        plc.stop()
