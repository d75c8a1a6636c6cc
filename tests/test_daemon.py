"""End to end: the real daemon as a subprocess, a real python-snap7 server, the simulated camera."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from anomalyd.daemon.handshake import ErrorCode
from anomalyd.drivers.plc.sim import SimulatedPlc
from tests.conftest import ANOMALYD
from tests.harness import Running, stop, wait_until

ROOT = Path(__file__).resolve().parents[1]


def test_good_parts_pass_defects_fail_reload_and_clean_exit(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, notify=True)
    # systemd: READY=1 after warm-up, WATCHDOG=1 from the loop.
    seen: list[str] = []
    wait_until(lambda: (seen.extend(r.notifications()) or ("READY=1" in seen and "WATCHDOG=1" in seen)),
               what="READY=1 and WATCHDOG=1")  # fmt: skip
    messages = seen
    assert any(m.startswith("STATUS=OK 0 WARN 0 NG 0") for m in messages)

    # The heartbeat advances while idle.
    beat = r.plc.read_status().heartbeat
    assert r.plc.wait_for(lambda s: (s.heartbeat - beat) % 65536 >= 3, 2.0)

    n_test = sum(1 for _ in (sample_dir / "test").rglob("*.png"))
    results = [r.plc.inspect_once(timeout_s=10.0) for _ in range(n_test)]
    assert all(res is not None for res in results)
    rows = r.wait_rows(n_test)
    assert [row[0] for row in rows] == [res.status.inspection_id for res in results]  # type: ignore[union-attr]
    right = 0
    for res, (_, verdict, code, source) in zip(results, rows, strict=True):
        assert res is not None and code == 0
        defect = Path(source).parent.name != "good"
        assert (verdict == "NG") == res.status.fail  # the record says what the PLC was told
        right += res.status.fail == defect
    assert right >= n_test - 1, f"{right}/{n_test} verdicts right"

    # Prometheus and health on loopback.
    body = urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5).read().decode()
    assert "anomalyd_inspections_total" in body
    assert 'anomalyd_stage_duration_seconds_bucket{le="0.1",stage="extract"}' in body
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/healthz", timeout=5).read())
    assert health["healthy"] and health["plc"] and health["camera"]

    # A bad edit + SIGHUP: rejected, old threshold stays.
    old = r.plc.read_status().threshold
    r.config.write_text(r.config.read_text() + "thresholds:\n  image: -3\n")
    r.process.send_signal(signal.SIGHUP)
    wait_until(lambda: '"reload.rejected"' in (r.config.parent / "daemon.log").read_text(), what="the reload refused")
    assert r.process.poll() is None
    assert r.plc.inspect_once(5.0).status.threshold == pytest.approx(old)  # type: ignore[union-attr]
    log = (r.config.parent / "daemon.log").read_text()
    assert "reload.rejected" in log and "thresholds.image: must be > 0 (got -3)" in log

    # A good edit + SIGHUP: applied without a restart.
    r.write_config(thresholds__image=50.0)
    r.process.send_signal(signal.SIGHUP)
    assert r.plc.wait_for(lambda s: s.threshold == pytest.approx(50.0), 5.0)
    assert r.plc.inspect_once(5.0).status.passed  # type: ignore[union-attr]

    # SIGTERM: ready=0 written, exit 0 within 5 s; every inspection recorded once.
    final_id = r.plc.read_status().inspection_id
    assert stop(r) == 0
    assert not r.plc.read_status().ready
    rows = r.rows()
    assert [row[0] for row in rows] == list(range(1, final_id + 1))


def test_plc_restart_mid_run_is_recovered(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    for _ in range(4):
        assert r.plc.inspect_once(10.0) is not None
    port = r.plc.port
    r.plc.stop()
    log = r.config.parent / "daemon.log"
    # The daemon has seen the PLC go (a write failed) and keeps running while it is away.
    wait_until(lambda: '"plc.disconnected"' in log.read_text(), 10.0, "the daemon noticing the PLC is gone")
    assert r.process.poll() is None
    r.plc = SimulatedPlc("s7", port=port)  # a restarted PLC, its DBs zeroed
    r.plc.start()
    assert r.plc.wait_for(lambda s: s.ready and s.inspection_id == 4, 5.0), "block not rewritten after reconnect"
    results = [r.plc.inspect_once(10.0) for _ in range(4)]
    assert [res.status.inspection_id for res in results] == [5, 6, 7, 8]  # type: ignore[union-attr]
    assert stop(r) == 0
    assert [row[0] for row in r.rows()] == list(range(1, 9))
    log = (r.config.parent / "daemon.log").read_text()
    assert log.count('"plc.disconnected"') == 1  # logged once, not once per retry


def test_camera_timeouts_are_reported_and_the_loop_continues(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, camera__faults={"timeout_every": 3}, daemon__grab_timeout_ms=200)
    statuses = [r.plc.inspect_once(10.0).status for _ in range(6)]  # type: ignore[union-attr]
    codes = [s.error_code for s in statuses]
    # Every third grab times out: inspections 3 and 6.
    assert codes == [0, 0, ErrorCode.CAMERA_TIMEOUT, 0, 0, ErrorCode.CAMERA_TIMEOUT]
    for s in statuses[2::3]:
        assert s.fail and s.error and not s.passed
    assert stop(r) == 0
    rows = r.rows()
    assert [row[2] for row in rows] == codes


def test_over_budget_is_failed_never_a_late_pass(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    good_only = tmp_path / "good_only"
    shutil.copytree(sample_dir / "test" / "good", good_only)
    r = daemon_factory(e2e_bundle, good_only, daemon__budget_ms=1, thresholds__image=100.0)
    statuses = [r.plc.inspect_once(10.0).status for _ in range(3)]  # type: ignore[union-attr]
    for s in statuses:
        assert s.fail and not s.passed and s.error_code == ErrorCode.OVER_BUDGET
    assert stop(r) == 0
    assert all(row[1] == "NG" and row[2] == ErrorCode.OVER_BUDGET for row in r.rows())


@pytest.mark.e2e
def test_corrupt_bundle_refuses_to_start(e2e_bundle: Path, tmp_path: Path, sample_dir: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(e2e_bundle, bundle)
    with (bundle / "extractor.onnx").open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02")
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "camera": {"type": "simulated", "source": str(sample_dir)},
                "model": {"bundle": str(bundle)},
                "plc": {"type": "none"},
                "daemon": {"trigger": "free_run"},
                "metrics": {"enabled": False},
                "page": {"enabled": False},
            }
        )
    )
    out = subprocess.run([*ANOMALYD, "run", "--config", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "extractor.onnx: checksum mismatch" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.e2e
@pytest.mark.parametrize("unit", ["anomalyd.service", "anomalyd@.service"])
def test_systemd_units_verify(unit: str, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed on this machine")
    text = (ROOT / "systemd" / unit).read_text()
    assert "/opt/anomalyd/.venv/bin/anomalyd" in text
    # The only change: ExecStart points at this checkout's entry point, which exists here.
    entry = str(Path(sys.executable).parent / "anomalyd")
    target = tmp_path / unit
    target.write_text(text.replace("/opt/anomalyd/.venv/bin/anomalyd", entry))
    names = [target]
    if "@" in unit:
        instance = tmp_path / unit.replace("@", "@line1")
        instance.write_text(target.read_text())
        names.append(instance)
    for path in names:
        out = subprocess.run([analyze, "verify", str(path)], capture_output=True, text=True)
        assert out.returncode == 0 and out.stderr == "", out.stderr
    for key in (
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "User=anomalyd",
        "Type=notify",
        "WatchdogSec=",
        "RestartPreventExitStatus=2",
    ):
        assert key in text


def _records_by_id(r: Running) -> dict[int, dict[str, object]]:
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        db.row_factory = sqlite3.Row
        rows = db.execute("SELECT * FROM inspections").fetchall()
    return {int(row["inspection_id"]): dict(row) for row in rows}


def test_stalled_daemon_and_immediate_retriggers_never_misattribute(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    """The test PLC stops the daemon (SIGSTOP) mid-inspection for 1.5× the budget, then re-triggers
    at once; every answer must name its own part, and agree with the record of its own frame."""
    budget_ms = 300
    r = daemon_factory(e2e_bundle, sample_dir, daemon__budget_ms=budget_ms, daemon__grab_timeout_ms=500)
    sent: list[tuple[int, object]] = []  # (part_id, SimResult | None)
    stalls = 0
    part_id = 5000
    for i in range(36):
        part_id += 1
        stall = i % 4 == 1
        if stall:
            # Raise the trigger ourselves, stop the daemon as soon as it is busy with this part.
            assert r.plc.wait_for(lambda s: not s.trigger_ack, 5.0)
            before = r.plc.read_status()
            r.plc.set_command(trigger=True, result_ack=False, part_id=part_id)
            if r.plc.wait_for(lambda s: s.busy, 2.0) is not None:
                r.process.send_signal(signal.SIGSTOP)
                time.sleep(1.5 * budget_ms / 1000.0)
                r.process.send_signal(signal.SIGCONT)
                stalls += 1
            status = r.plc.wait_for(lambda s, b=before: s.result_toggle != b.result_toggle, 10.0)
            r.plc.set_command(trigger=False)
            assert status is not None, f"part {part_id} got no answer"
            sent.append((part_id, status))
            continue
        # Right after a stall: no waiting for trigger_ready, only for trigger_ack to fall.
        result = r.plc.inspect_once(10.0, part_id=part_id, interlock=not sent or i % 4 != 2)
        assert result is not None, f"part {part_id} got no answer"
        sent.append((part_id, result.status))
    assert stalls >= 6
    answers = sent
    final_id = r.plc.read_status().inspection_id
    assert stop(r) == 0
    records = _records_by_id(r)
    assert sorted(records) == list(range(1, final_id + 1))  # every answer has its row, none lost
    late = refused = 0
    frames: list[int] = []
    for pid, s in answers:
        assert s.part_id == pid, f"trigger {pid} latched the answer of part {s.part_id}"
        assert not (s.passed and s.error)
        row = records[s.inspection_id]
        assert row["part_id"] == pid and row["error_code"] == s.error_code
        assert (row["verdict"] == "NG") == s.fail
        late += row["late"]
        refused += row["refused"]
        if s.passed:  # a pass is always the on-time verdict of this part's own frame
            assert row["late"] == 0 and row["model_verdict"] in ("OK", "WARN") and row["frame_id"] is not None
        if row["late"]:
            assert s.error_code == ErrorCode.OVER_BUDGET and s.fail and row["model_verdict"] is not None
        if row["frame_id"] is not None:
            frames.append(int(row["frame_id"]))
    assert late >= 1, "no inspection was caught by the stall"
    assert frames == sorted(frames) and len(set(frames)) == len(frames)  # each trigger its own, fresh frame
    assert refused == sum(1 for _, s in answers if s.error_code in (ErrorCode.LATE_RUNNING, ErrorCode.TRIGGER_OVERRUN))


def test_refused_trigger_is_answered_with_its_part_id_and_recorded(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    ok = r.plc.inspect_once(10.0, part_id=1)
    assert ok is not None and ok.attributed
    r.plc.set_command(enable=False)
    assert r.plc.wait_for(lambda s: not s.trigger_ready, 2.0)
    refused = r.plc.inspect_once(5.0, part_id=2, interlock=False)
    assert refused is not None and refused.attributed
    s = refused.status
    assert s.result_valid and s.fail and not s.passed and s.error and s.error_code == ErrorCode.DISABLED
    assert s.missed_triggers == 1 and s.inspection_id == ok.status.inspection_id + 1
    r.plc.set_command(enable=True)
    again = r.plc.inspect_once(10.0, part_id=3)
    assert again is not None and again.attributed and again.status.error_code == 0
    assert stop(r) == 0
    records = _records_by_id(r)
    assert [records[i]["part_id"] for i in sorted(records)] == [1, 2, 3]
    assert records[s.inspection_id]["refused"] == 1 and records[s.inspection_id]["verdict"] == "NG"


@pytest.mark.e2e
def test_a_restart_is_visible_to_the_plc(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    """A stop clears ready and result_valid, so a PLC waiting for an answer re-triggers after ready."""
    r = daemon_factory(e2e_bundle, sample_dir)
    before = r.plc.read_status()
    r.plc.set_command(trigger=True, part_id=1)  # no result_ack: the answer stays valid
    answered = r.plc.wait_for(lambda s: s.result_toggle != before.result_toggle, 10.0)
    assert answered is not None and answered.result_valid and answered.part_id == 1
    assert stop(r) == 0
    s = r.plc.read_status()
    assert not s.ready and not s.result_valid and not s.trigger_ready and not s.passed
    r.plc.set_command(trigger=False)
    # Started again on the same PLC: ready rises, nothing stale is valid, numbering continues.
    process = subprocess.Popen(
        [*ANOMALYD, "run", "--config", str(r.config)],
        stdout=(r.config.parent / "daemon2.log").open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    r.process = process
    back = r.plc.wait_for(lambda st: st.ready, 90.0)
    assert back is not None and not back.result_valid
    again = r.plc.inspect_once(10.0, part_id=2)
    assert again is not None and again.attributed and again.status.inspection_id == answered.inspection_id + 1
    assert stop(r) == 0
