"""What the daemon keeps: on a full disk no record is lost without a trace and no id is used twice.

A real small filesystem (tmpfs, mounted by the test where mounting is allowed)
holds ``data_dir``; the test fills it, runs parts, kills the daemon with -9 and
starts it again on the still-full disk.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalyd.daemon.records import Record, RecordStore
from tests.harness import stop


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here ({out.stderr.decode().strip()})")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\1" * 4096)
        except OSError:
            pass
    return filler


def unwritten_lines(log: Path) -> dict[int, dict[str, object]]:
    out = {}
    for line in log.read_text().splitlines():
        if '"record.unwritten"' in line:
            row = json.loads(line)
            out[int(row["inspection_id"])] = row
    return out


@pytest.mark.e2e
def test_a_full_disk_then_kill_9_loses_no_answered_id_and_reuses_none(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, small_disk: Path
) -> None:
    data = small_disk / "data"
    r = daemon_factory(
        e2e_bundle, sample_dir / "test", daemon__data_dir=str(data), records__journal_mb=0.0625, archive__enabled=False
    )
    answered: dict[int, int] = {}  # inspection_id → part_id the PLC was told

    def run(n: int) -> None:
        for _ in range(n):
            part = 10_000 + len(answered)
            res = r.plc.inspect_once(10.0, part_id=part)
            assert res is not None and res.attributed
            assert res.status.inspection_id not in answered, "an id answered twice"
            answered[res.status.inspection_id] = part

    run(3)
    filler = fill(small_disk)
    run(220)  # the journal (64 KiB, ~110 records) fills; the rest go to stderr
    time.sleep(1.2)  # what a kill -9 may lose is the last second; this test allows none of it
    assert r.plc.read_status().records_failing
    r.process.send_signal(signal.SIGKILL)
    r.process.wait()
    log1 = r.config.parent / "daemon.log"
    lines = unwritten_lines(log1)

    # Restart on the still-full disk, against a PLC whose block was zeroed.
    r.plc.stop()
    from anomalyd.drivers.plc.sim import SimulatedPlc

    r.plc = SimulatedPlc("s7", port=r.raw["plc"]["port"])  # type: ignore[index]
    r.plc.start()
    log2 = r.restart()
    run(5)
    assert max(answered) > 223 and len(answered) == 228  # no id reused after the restart
    filler.unlink()  # space again: the journal and the pending records reach the database
    run(2)
    assert r.plc.wait_for(lambda s: not s.records_failing, 10.0) is not None
    assert stop(r) == 0
    with sqlite3.connect(data / "inspections.sqlite") as db:
        recorded = dict(db.execute("SELECT inspection_id, part_id FROM inspections").fetchall())
    missing = [i for i in answered if i not in recorded and i not in lines]
    assert not missing, f"answered ids with no record anywhere: {missing[:20]} ({len(missing)})"
    for i, part in answered.items():  # each trace names the part the PLC was told
        assert (recorded.get(i) if i in recorded else lines[i]["part_id"]) == part, i
    assert len(lines) > 0, "the journal should have filled and sent records to stderr"
    first_run = [i for i in answered if i <= 223]
    journaled = [i for i in first_run[3:] if i in recorded]
    assert len(journaled) > 50, "the journal (written on the full disk) reached the database at last"
    assert set(first_run) - set(recorded) <= set(lines)  # the rest is on stderr, every one of them
    start_log = log2.read_text()
    assert '"records.missing_at_start"' in start_log and '"count": ' in start_log
    assert "id_counter.write_failed" not in log1.read_text(), "the counter's space was taken at start"


def test_an_id_recorded_twice_is_an_error_that_logs_both_rows(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = RecordStore(tmp_path / "r.sqlite", 30, 1_000_000)

    def record(verdict: str, score: float) -> Record:
        return Record(
            7, time.time_ns(), verdict, score, 1.0, 0, 5.0, None, None, None, None, None, None, None, None, "b", "c"
        )

    store.add(record("OK", 0.5))
    deadline = time.monotonic() + 5
    while store.written < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    store.add(record("NG", 1.5))
    store.close()
    with sqlite3.connect(tmp_path / "r.sqlite") as db:
        rows = db.execute("SELECT inspection_id, verdict, score FROM inspections").fetchall()
    assert rows == [(7, "OK", 0.5)]  # never replaced
    assert store.conflicts == 1


def test_no_id_past_what_the_counter_saved_is_ever_handed_out(tmp_path: Path) -> None:
    """The counter's save fails (the fault injected at the boundary: its file opened read-only)."""
    import os

    from anomalyd.daemon.handshake import ErrorCode, Handshake, Ticket
    from anomalyd.daemon.id_counter import IdCounter
    from anomalyd.drivers.plc.layout import Command

    hs = Handshake(budget_ms=100, grab_timeout_ms=100)
    hs.set_ready(True)
    states: list[bool] = []

    def on_state(ok: bool) -> None:
        states.append(ok)
        (hs.release if ok else hs.hold)(ErrorCode.RECORDS_UNAVAILABLE)

    counter = IdCounter(tmp_path / "inspection_id", block=4, on_state=on_state, on_ceiling=hs.set_id_limit)
    counter.open()
    assert counter.start(0) == 0 and counter.ceiling == 4
    good_fd = counter._fd
    assert good_fd is not None
    counter._fd = os.open(counter.path, os.O_RDONLY)  # every save now fails with EBADF

    def trigger(part: int) -> object:
        edge = hs.on_command(Command(trigger=True, part_id=part), 0.0)
        hs.on_command(Command(trigger=False, part_id=part), 0.0)
        return edge

    for part in (1, 2):
        ticket = trigger(part)
        assert isinstance(ticket, Ticket)
        answer = hs.finish(ticket, 0.01, 0.5, 1.0, True, 0, 5.0)
        counter.reserve(answer.status.inspection_id)  # at 2 (2 + 4//2 >= 4) a save is due, and fails
    assert states == [False]
    s = hs.status
    assert not s.ready and s.error_code == ErrorCode.RECORDS_UNAVAILABLE
    hs.set_ready(True)  # the camera recovering does not make it ready while the counter is held
    assert not hs.status.ready
    codes = []
    for part in range(3, 9):
        edge = trigger(part)
        codes.append(None if edge is None else edge.status.error_code)  # type: ignore[attr-defined]
    # ids 3 and 4 were saved: answered with code 11; 5 and later would pass the saved ceiling: never handed out.
    assert codes == [ErrorCode.RECORDS_UNAVAILABLE] * 2 + [None] * 4
    assert hs.status.inspection_id == 4 and hs.unanswered == 4
    os.close(counter._fd)
    counter._fd = good_fd  # the disk takes writes again
    counter.reserve(hs.status.inspection_id)
    assert states == [False, True] and hs.status.ready and counter.ceiling == 8
    counter.finish(hs.status.inspection_id)
    assert IdCounter(tmp_path / "inspection_id").ceiling == 4  # a clean stop: next start goes on after 4
