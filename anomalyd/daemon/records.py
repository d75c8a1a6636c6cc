"""Every inspection in SQLite (WAL), written by a background thread off the hot path."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from anomalyd.log import get_logger

log = get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS inspections (
    inspection_id INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    verdict TEXT NOT NULL,          -- OK, WARN or NG
    score REAL,
    threshold REAL NOT NULL,
    error_code INTEGER NOT NULL,
    latency_ms REAL,
    preprocess_ms REAL, extract_ms REAL, search_ms REAL, map_ms REAL,
    defect_area_px INTEGER,
    archive_path TEXT,
    source TEXT,
    frame_id INTEGER,
    bundle_id TEXT NOT NULL,
    config_hash TEXT NOT NULL,
    part_id INTEGER,                -- the PLC's part number latched at the trigger
    late INTEGER NOT NULL DEFAULT 0,     -- 1: the deadline answered; the model's result came later
    refused INTEGER NOT NULL DEFAULT 0,  -- 1: the trigger was answered without an inspection
    model_verdict TEXT,             -- what the model said (differs from verdict when late)
    recipe INTEGER                  -- the recipe that judged the part
);
CREATE INDEX IF NOT EXISTS inspections_time ON inspections(time_ns);
"""


@dataclass(frozen=True)
class Record:
    inspection_id: int
    time_ns: int
    verdict: str
    score: float | None
    threshold: float
    error_code: int
    latency_ms: float | None
    preprocess_ms: float | None
    extract_ms: float | None
    search_ms: float | None
    map_ms: float | None
    defect_area_px: int | None
    archive_path: str | None
    source: str | None
    frame_id: int | None
    bundle_id: str
    config_hash: str
    part_id: int | None = None
    late: int = 0
    refused: int = 0
    model_verdict: str | None = None
    recipe: int | None = None


# Columns added after the first version: added in place to an older database.
ADDED_COLUMNS = {
    "part_id": "INTEGER",
    "late": "INTEGER NOT NULL DEFAULT 0",
    "refused": "INTEGER NOT NULL DEFAULT 0",
    "model_verdict": "TEXT",
    "recipe": "INTEGER",
}


def connect(path: Path, timeout_s: float = 1.0) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A short busy timeout: a lock held elsewhere is reported within a second, and the
    # writer keeps the records and retries instead of waiting blind.
    db = sqlite3.connect(str(path), timeout=timeout_s, check_same_thread=False)
    # WAL keeps readers (QA tools) from blocking the writer, and a killed process
    # leaves a consistent database; NORMAL sync is durable across process crashes.
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    have = {row[1] for row in db.execute("PRAGMA table_info(inspections)")}
    with db:
        for name, kind in ADDED_COLUMNS.items():
            if name not in have:
                db.execute(f"ALTER TABLE inspections ADD COLUMN {name} {kind}")
    db.execute("CREATE INDEX IF NOT EXISTS inspections_part ON inspections(part_id)")
    return db


class RecordStore:
    """Records from the loop, inserted by one thread; kept and retried while the database refuses.

    Nothing is dropped while the database is locked by another process or the
    disk is full: records wait in a bounded buffer (``max_pending``) and the
    writer retries with back-off. ``failing`` says so at once (the daemon shows
    it to the PLC, /healthz and metrics). Only a buffer overflow loses records,
    and it is counted and logged. At close, what still cannot be written goes
    to a JSON-lines file next to the database.
    """

    def __init__(
        self,
        path: Path,
        retention_days: float,
        retention_count: int,
        max_pending: int = 100_000,
        on_state: Callable[[bool], None] = lambda failing: None,
    ) -> None:
        self.path = path
        self.retention_days = retention_days
        self.retention_count = retention_count
        self.max_pending = max_pending
        self.on_state = on_state
        self._pending: deque[Record] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._db = connect(path)
        self.written = 0
        self.lost = 0
        self.failing = False
        self._give_up_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="records", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    def last_inspection_id(self) -> int:
        row = self._db.execute("SELECT MAX(inspection_id) FROM inspections").fetchone()
        return int(row[0] or 0)

    def add(self, record: Record) -> None:
        with self._cond:
            if len(self._pending) >= self.max_pending:
                dropped = self._pending.popleft()
                self.lost += 1
                log.error("records.lost", inspection_id=dropped.inspection_id, pending=len(self._pending))
            self._pending.append(record)
            self._cond.notify()

    def _set_failing(self, failing: bool, error: str = "") -> None:
        if failing == self.failing:
            return
        self.failing = failing
        if failing:
            log.error("records.write_failing", error=error, pending=len(self._pending), db=str(self.path))
        else:
            log.info("records.write_recovered", pending=len(self._pending), written=self.written)
        self.on_state(failing)

    def _run(self) -> None:
        fields = list(Record.__dataclass_fields__)
        sql = f"INSERT OR REPLACE INTO inspections ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})"
        backoff = 0.05
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = [self._pending[i] for i in range(min(256, len(self._pending)))]
            try:
                with self._db:
                    self._db.executemany(sql, [tuple(asdict(r).values()) for r in batch])
            except Exception as exc:  # locked, disk full, I/O error: keep the batch, retry
                self._set_failing(True, str(exc))
                if self._closing and self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            with self._cond:
                for _ in batch:
                    self._pending.popleft()
            self.written += len(batch)
            self._set_failing(False)
            if self.written % 1000 < len(batch):
                try:
                    self.apply_retention()
                except Exception as exc:  # retention is housekeeping: it never stops the writer
                    log.error("records.retention_failed", error=str(exc))

    def apply_retention(self) -> None:
        cutoff = max(0, time.time_ns() - int(self.retention_days * 86400e9))
        with self._db:
            self._db.execute("DELETE FROM inspections WHERE time_ns < ?", (cutoff,))
            self._db.execute(
                "DELETE FROM inspections WHERE inspection_id <= (SELECT MAX(inspection_id) FROM inspections) - ?",
                (self.retention_count,),
            )

    def close(self, flush_s: float = 10.0) -> None:
        """Write everything queued (retrying up to ``flush_s``), then close; spill the rest to a file."""
        with self._cond:
            self._closing = True
            self._give_up_at = time.monotonic() + flush_s
            self._cond.notify()
        self._thread.join(timeout=flush_s + 5.0)
        if self._pending:
            self._spill()
        self._db.close()

    def _spill(self) -> None:
        spill = self.path.with_name(f"records-unwritten-{time.strftime('%Y%m%dT%H%M%S')}.jsonl")
        rows = list(self._pending)
        try:
            with spill.open("a", encoding="utf-8") as fh:
                for r in rows:
                    fh.write(json.dumps(asdict(r)) + "\n")
            log.error("records.spilled", count=len(rows), file=str(spill))
        except OSError as exc:
            log.error("records.lost_at_stop", count=len(rows), error=str(exc))
