"""Every inspection in SQLite (WAL), written by a background thread off the hot path."""

from __future__ import annotations

import queue
import sqlite3
import threading
import time
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
    model_verdict TEXT              -- what the model said (differs from verdict when late)
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


# Columns added after the first version: added in place to an older database.
ADDED_COLUMNS = {
    "part_id": "INTEGER",
    "late": "INTEGER NOT NULL DEFAULT 0",
    "refused": "INTEGER NOT NULL DEFAULT 0",
    "model_verdict": "TEXT",
}


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False)
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
    """Queue records from the loop; one thread inserts them and applies retention."""

    def __init__(self, path: Path, retention_days: float, retention_count: int) -> None:
        self.path = path
        self.retention_days = retention_days
        self.retention_count = retention_count
        self._queue: queue.Queue[Record | None] = queue.Queue()
        self._db = connect(path)
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="records", daemon=True)
        self._thread.start()

    def last_inspection_id(self) -> int:
        row = self._db.execute("SELECT MAX(inspection_id) FROM inspections").fetchone()
        return int(row[0] or 0)

    def add(self, record: Record) -> None:
        self._queue.put(record)

    def _run(self) -> None:
        fields = list(Record.__dataclass_fields__)
        sql = f"INSERT OR REPLACE INTO inspections ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})"
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while not self._queue.empty() and len(batch) < 256:
                nxt = self._queue.get_nowait()
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            try:
                with self._db:
                    self._db.executemany(sql, [tuple(asdict(r).values()) for r in batch])
                self.written += len(batch)
                if self.written % 1000 < len(batch):
                    self.apply_retention()
            except sqlite3.Error as exc:
                log.error("records.write_failed", error=str(exc), lost=len(batch))

    def apply_retention(self) -> None:
        cutoff = time.time_ns() - int(self.retention_days * 86400e9)
        with self._db:
            self._db.execute("DELETE FROM inspections WHERE time_ns < ?", (cutoff,))
            self._db.execute(
                "DELETE FROM inspections WHERE inspection_id <= (SELECT MAX(inspection_id) FROM inspections) - ?",
                (self.retention_count,),
            )

    def close(self) -> None:
        """Write everything queued, then close."""
        self._queue.put(None)
        self._thread.join(timeout=30.0)
        self._db.close()
