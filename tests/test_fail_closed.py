"""Fail closed at the process level: a locked database, a killed daemon, start-up faults, floods.

The real daemon runs as a subprocess; the faults are made by real processes and sockets.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from anomalyd.daemon.handshake import ErrorCode
from anomalyd.daemon.records import Record, RecordStore
from tests.conftest import ANOMALYD, free_port
from tests.harness import Running, launch, station_config, stop, wait_until

LOCK_DB = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("ROLLBACK")
"""


def hold_lock(db: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process holds the records database's write lock for ``seconds``."""
    locker = subprocess.Popen([sys.executable, "-c", LOCK_DB, str(db), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
    return locker


def health(r: Running) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/healthz", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.e2e
def test_a_database_locked_by_another_process_loses_no_record(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    sent: list[tuple[int, object]] = []
    for _ in range(3):
        res = r.plc.inspect_once(10.0)
        assert res is not None and res.attributed
        sent.append((res.part_id, res.status))
    r.wait_rows(3)
    # 3 s: three times the writer's busy timeout, so writes fail and queue (20 s showed nothing more).
    locker = hold_lock(r.data / "inspections.sqlite", 3.0)
    seen_failing, seen_503 = False, False
    while locker.poll() is None:
        res = r.plc.inspect_once(10.0)
        assert res is not None and res.attributed
        sent.append((res.part_id, res.status))
        seen_failing |= res.status.records_failing
        if seen_failing and not seen_503:
            code, state = health(r)
            seen_503 = code == 503 and state["records_failing"] is True
        time.sleep(0.05)
    assert seen_failing and seen_503, "the PLC and /healthz were not told that records fail"
    assert all(s.error_code == 0 for _, s in sent)  # records.required is off: the line keeps running
    assert r.plc.wait_for(lambda s: not s.records_failing, 10.0) is not None
    final_id = r.plc.read_status().inspection_id
    assert stop(r) == 0
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        rows = dict(db.execute("SELECT inspection_id, part_id FROM inspections").fetchall())
    assert sorted(rows) == list(range(1, final_id + 1))  # not one row lost
    assert len(sent) > 12  # parts answered while the lock was held, each recorded afterwards
    assert all(rows[s.inspection_id] == pid for pid, s in sent)  # type: ignore[attr-defined]
    log = (r.config.parent / "daemon.log").read_text()
    assert log.count('"records.write_failing"') == 1 and '"records.write_recovered"' in log


@pytest.mark.e2e
def test_records_required_fails_parts_while_records_cannot_be_written(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, records__required=True, thresholds__image=100.0)
    first = r.plc.inspect_once(10.0)
    assert first is not None and first.status.passed
    r.wait_rows(1)
    locker = hold_lock(r.data / "inspections.sqlite", 4.0)
    codes = []
    while locker.poll() is None:
        res = r.plc.inspect_once(10.0)
        assert res is not None and res.attributed
        codes.append(res.status.error_code)
        assert not (res.status.passed and res.status.records_failing)
    assert ErrorCode.RECORDS_UNAVAILABLE in codes
    assert r.plc.wait_for(lambda s: not s.records_failing, 10.0) is not None
    after = r.plc.inspect_once(10.0)
    assert after is not None and after.status.passed  # traceability is back: parts pass again
    assert stop(r) == 0


@pytest.mark.e2e
def test_inspection_ids_never_go_back(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    for _ in range(3):
        assert r.plc.inspect_once(10.0) is not None
    r.wait_rows(3)
    locker = hold_lock(r.data / "inspections.sqlite", 30.0)
    for _ in range(3):
        assert r.plc.inspect_once(10.0) is not None
    seen = r.plc.read_status().inspection_id
    assert seen == 6
    r.process.send_signal(signal.SIGKILL)  # killed while ids 4..6 wait for the lock
    r.process.wait()
    locker.kill()

    r.restart()
    res = r.plc.inspect_once(10.0)
    assert res is not None and res.status.inspection_id > seen  # never an id the PLC has seen
    seen = res.status.inspection_id
    assert stop(r) == 0
    # The database deleted by hand: the counter file goes on.
    for name in ("inspections.sqlite", "inspections.sqlite-wal", "inspections.sqlite-shm"):
        (r.data / name).unlink(missing_ok=True)
    r.restart()
    res = r.plc.inspect_once(10.0)
    assert res is not None and res.status.inspection_id == seen + 1
    seen = res.status.inspection_id
    assert stop(r) == 0
    # The whole data folder lost: the id in the PLC's block still bounds the numbering.
    shutil.rmtree(r.data)
    r.restart()
    res = r.plc.inspect_once(10.0)
    assert res is not None and res.status.inspection_id == seen + 1
    assert stop(r) == 0


def _config(tmp_path: Path, bundle: Path, source: Path, **sections: dict[str, object]) -> Path:
    """The station's config without a PLC, free running (``sections`` merged in)."""
    plc = sections.pop("plc", {"type": "none"})
    daemon = {"trigger": "free_run", **sections.pop("daemon", {})}
    return station_config(tmp_path, bundle, source, plc, "c.yaml", daemon=daemon, **sections)[0]


def _refused(config: Path) -> str:
    out = subprocess.run([*ANOMALYD, "run", "--config", str(config)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[0]


@pytest.mark.e2e
def test_unwritable_data_dir_is_one_line_and_exit_2(e2e_bundle: Path, sample_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    line = _refused(_config(tmp_path, e2e_bundle, sample_dir, daemon={"data_dir": str(blocker / "data")}))
    assert f"daemon.data_dir {blocker / 'data'}: not writable" in line


@pytest.mark.e2e
def test_metrics_port_taken_is_one_line_and_exit_2(e2e_bundle: Path, sample_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _refused(_config(tmp_path, e2e_bundle, sample_dir, metrics={"port": port}))
    assert f"metrics.port {port} on 127.0.0.1: cannot listen" in line


@pytest.mark.e2e
def test_unreadable_image_in_the_camera_folder_is_one_line_and_exit_2(
    e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "frames"
    shutil.copytree(sample_dir / "test" / "good", folder)
    (folder / "zz_broken.png").write_bytes(b"this is not a png")
    line = _refused(_config(tmp_path, e2e_bundle, folder))
    assert "zz_broken.png is not a readable image" in line


@pytest.mark.e2e
def test_malformed_manifest_field_is_one_line_and_exit_2(e2e_bundle: Path, sample_dir: Path, tmp_path: Path) -> None:
    from anomalyd.model import bundle as bundle_io

    bundle = tmp_path / "bundle"
    shutil.copytree(e2e_bundle, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["calibration"]["reference_raw"] = "fast"
    manifest["bundle_id"] = bundle_io.manifest_id(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    line = _refused(_config(tmp_path, bundle, sample_dir))
    assert "manifest.json: calibration.reference_raw:" in line


@pytest.mark.e2e
def test_non_utf8_config_is_one_line_and_exit_2(e2e_bundle: Path, sample_dir: Path, tmp_path: Path) -> None:
    config = _config(tmp_path, e2e_bundle, sample_dir)
    config.write_bytes(config.read_bytes() + "# réglage\n".encode("latin-1"))
    assert "not UTF-8 text" in _refused(config)


@pytest.mark.e2e
def test_modbus_server_survives_a_connection_flood(e2e_bundle: Path, sample_dir: Path, tmp_path: Path) -> None:
    from pymodbus.client import ModbusTcpClient

    from anomalyd.drivers.plc.base import bytes_from_words
    from anomalyd.drivers.plc.layout import StatusLayout, unpack_status

    port = free_port()
    config = _config(
        tmp_path,
        e2e_bundle,
        sample_dir,
        plc={"type": "modbus-server", "port": port, "max_clients": 4, "idle_timeout_s": 2.0},
        daemon={"trigger": "plc"},
    )
    process = launch(config, tmp_path / "daemon.log")
    plc = ModbusTcpClient("127.0.0.1", port=port)
    flood: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 90
        while not plc.connect():
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.2)

        def status() -> object:
            reply = plc.read_holding_registers(0, count=17, device_id=1)
            assert not reply.isError()
            return unpack_status(bytes_from_words(reply.registers), StatusLayout())

        while not status().ready:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(300):  # bounded: 300 idle connections, well past max_clients
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            flood.append(s)

        def open_fds() -> int:
            return len(list(Path(f"/proc/{process.pid}/fd").iterdir()))

        # The refused connections are closed by the server as it sees them: wait for that, not a fixed time.
        with contextlib.suppress(AssertionError):
            wait_until(lambda: open_fds() < 60, 5.0, "the refused connections closed")
        fds = open_fds()
        assert fds < 60, f"{fds} file descriptors: idle clients are not bounded"
        # The PLC that polls keeps its connection and completes a handshake: trigger with part 77.
        before = status()
        assert not plc.write_registers(100, [0x0500, 0, 77, 0], device_id=1).isError()
        while status().result_toggle == before.result_toggle:  # type: ignore[attr-defined]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert status().part_id == 77  # type: ignore[attr-defined]
        assert process.poll() is None
    finally:
        for s in flood:
            s.close()
        plc.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_metrics_server_answers_only_its_two_paths(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    for path in ("/metrics/../etc", "/metricsX", "/healthz/x", "/"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}{path}", timeout=5)
        assert err.value.code == 404
    assert urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics?x=1", timeout=5).status == 200
    assert stop(r) == 0


def _record(i: int) -> Record:
    return Record(i, time.time_ns(), "OK", 0.5, 1.1, 0, 10.0, None, None, None, None, None, None, None, i, "b", "c", i)


def test_a_full_disk_keeps_the_records_and_writes_them_when_there_is_room(tmp_path: Path) -> None:
    states: list[bool] = []
    store = RecordStore(tmp_path / "r.sqlite", 90.0, 1_000_000, on_state=states.append)
    store.add(_record(1))
    deadline = time.monotonic() + 5
    while store.written < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "database or disk is full"
    for i in range(2, 2002):
        store.add(_record(i))
    while not store.failing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert store.pending > 0
    store._db.execute("PRAGMA max_page_count = 1000000")  # room again
    store.close()
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        ids = [row[0] for row in db.execute("SELECT inspection_id FROM inspections ORDER BY inspection_id")]
    assert ids == list(range(1, 2002)) and states == [True, False] and store.lost == 0


@pytest.mark.e2e
def test_score_walks_folders_and_never_overwrites_a_heatmap(bundle_dir: Path, sample_dir: Path, tmp_path: Path) -> None:
    from anomalyd.cli_model import score_targets

    test_root = sample_dir / "test"
    images = sorted(test_root.rglob("*.png"))
    targets = score_targets([test_root])
    assert [p for p, _ in targets] == images
    assert len({name for _, name in targets}) == len(images)  # 000.png exists in several folders
    out = subprocess.run(
        [*ANOMALYD, "score", "--bundle", str(bundle_dir), str(test_root), "--out", str(tmp_path / "maps")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(list((tmp_path / "maps").glob("*.png"))) == len(images)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    out = subprocess.run([*ANOMALYD, "score", "--bundle", str(bundle_dir), str(empty)], capture_output=True, text=True)
    assert out.returncode != 0 and "no images found in it or its subfolders" in out.stderr
