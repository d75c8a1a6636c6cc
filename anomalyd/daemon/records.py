"""Every inspection in SQLite (WAL), written by a background thread off the hot path."""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from anomalyd.log import get_logger

log = get_logger(__name__)

JOURNAL_AFTER_S = 0.25  # a record refused this long is journaled (plus the writer's back-off, under a second)

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


def archived_records(
    database: Path,
    ids: list[int] | None = None,
    since_ns: int | None = None,
    until_ns: int | None = None,
    verdict: str | None = None,
    recipe: int | None = None,
) -> list[sqlite3.Row]:
    """The records whose images are in the archive, by these filters, oldest first (read-only; ``teach``)."""
    where: list[str] = ["archive_path IS NOT NULL"]
    params: list[object] = []
    if ids is not None:
        where.append(f"inspection_id IN ({','.join('?' * len(ids)) or 'NULL'})")
        params += ids
    for clause, value in (("time_ns >= ?", since_ns), ("time_ns <= ?", until_ns), ("verdict = ?", verdict)):
        if value is not None:
            where.append(clause)
            params.append(value)
    if recipe is not None:
        where.append("recipe = ?")
        params.append(recipe)
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        return conn.execute(
            f"SELECT * FROM inspections WHERE {' AND '.join(where)} ORDER BY inspection_id", params
        ).fetchall()


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


class SpillJournal:
    """Records the database refused, on disk within a second: a file allocated at start, filled in place.

    Allocated while there is space, it takes records when the disk is full. Each
    line is one record as JSON, followed by a NUL that the next line overwrites;
    reading stops at the first NUL. Emptied (the NUL put back at the start)
    once every record in it is in the database.
    """

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = path
        self.size = size_bytes
        self.offset = 0
        self.count = 0
        self.pending: list[dict[str, object]] = []
        self._fd: int | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            log.error("records.journal_unavailable", file=str(path), error=str(exc))
            return
        self._fd = fd
        self.pending = self._scan()
        if os.fstat(fd).st_size < size_bytes:
            try:
                os.posix_fallocate(fd, 0, size_bytes)
            except OSError as exc:  # no space even now: records the database refuses go to stderr
                log.error("records.journal_not_reserved", file=str(path), error=str(exc), bytes=size_bytes)
                self.size = os.fstat(fd).st_size

    def _scan(self) -> list[dict[str, object]]:
        """Records left by the last run (not yet in the database)."""
        assert self._fd is not None
        data = os.pread(self._fd, max(os.fstat(self._fd).st_size, 0), 0)
        end = data.find(b"\0")
        used = data if end < 0 else data[:end]
        rows = []
        for line in used.split(b"\n"):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                log.error("records.journal_damaged_line", file=str(self.path), line=line[:80].decode("latin-1"))
                continue
            if isinstance(row, dict):
                rows.append(row)
        self.offset = len(used)
        self.count = len(rows)
        return rows

    def append(self, records: list[Record]) -> bool:
        """Write ``records`` (fsynced); False if they do not fit or the disk refused."""
        if self._fd is None:
            return False
        blob = b"".join(json.dumps(asdict(r)).encode() + b"\n" for r in records)
        if self.offset + len(blob) + 1 > self.size:
            return False
        try:
            os.pwrite(self._fd, blob + b"\0", self.offset)
            os.fsync(self._fd)
        except OSError:
            return False
        self.offset += len(blob)
        self.count += len(records)
        return True

    def reset(self) -> None:
        if self._fd is None or self.offset == 0:
            return
        try:
            os.pwrite(self._fd, b"\0", 0)
            os.fsync(self._fd)
        except OSError as exc:
            log.error("records.journal_reset_failed", file=str(self.path), error=str(exc))
            return
        self.offset, self.count = 0, 0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def write_unwritten(record: Record) -> None:
    """The last resort: the whole record as one JSON line on stderr (the journal keeps it)."""
    line = json.dumps({"event": "record.unwritten", "level": "error", **asdict(record)})
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: nothing is left to tell
        pass


class RecordStore:
    """Records from the loop, inserted by one thread; kept and retried while the database refuses.

    Nothing is dropped while the database is locked by another process or the
    disk is full: records wait in a bounded buffer (``max_pending``) and the
    writer retries with back-off. ``failing`` says so at once (the daemon shows
    it to the PLC, /healthz and metrics). A record the database has refused for
    more than ``JOURNAL_AFTER_S`` is also written to the spill journal
    (allocated at start), or, when that is full, to stderr as a
    ``record.unwritten`` line: after a kill -9 at most the last second's records
    are missing. Rows are INSERTed, never replaced: an id already recorded with
    other content is an error that logs both rows.
    """

    def __init__(
        self,
        path: Path,
        retention_days: float,
        retention_count: int,
        max_pending: int = 100_000,
        on_state: Callable[[bool], None] = lambda failing: None,
        journal_bytes: int = 16 << 20,
    ) -> None:
        self.path = path
        self.retention_days = retention_days
        self.retention_count = retention_count
        self.max_pending = max_pending
        self.on_state = on_state
        self._pending: deque[tuple[float, Record]] = deque()
        self._journaled: set[int] = set()  # pending records already safe in the journal or on stderr
        self._cond = threading.Condition()
        self._closing = False
        self._db = connect(path)
        self.written = 0
        self.lost = 0
        self.unwritten = 0  # records written only to stderr
        self.conflicts = 0
        self.imported = 0
        self.failing = False
        self._give_up_at: float | None = None
        self.journal = SpillJournal(path.with_name("records-journal.jsonl"), journal_bytes)
        self._import_journal()
        self._thread = threading.Thread(target=self._run, name="records", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() or self._closing

    def last_inspection_id(self) -> int:
        row = self._db.execute("SELECT MAX(inspection_id) FROM inspections").fetchone()
        return int(row[0] or 0)

    def count_between(self, first: int, last: int) -> int:
        row = self._db.execute(
            "SELECT COUNT(*) FROM inspections WHERE inspection_id BETWEEN ? AND ?", (first, last)
        ).fetchone()
        return int(row[0])

    def _import_journal(self) -> None:
        """Records the last run journaled but never got into the database: inserted now (or kept)."""
        rows = self.journal.pending
        if not rows:
            return
        fields = list(Record.__dataclass_fields__)
        records = [Record(**{k: row.get(k) for k in fields}) for row in rows]  # type: ignore[arg-type]
        try:
            self._insert(records)
        except sqlite3.Error as exc:  # still refused: kept in the journal and retried by the writer
            log.error("records.journal_not_imported", count=len(records), error=str(exc))
            now = time.monotonic()
            self._pending.extend((now, r) for r in records)
            self._journaled.update(r.inspection_id for r in records)
            return
        self.imported = len(records)
        log.warning("records.journal_imported", count=len(records), file=str(self.journal.path))
        self.journal.reset()

    def add(self, record: Record) -> None:
        with self._cond:
            if len(self._pending) >= self.max_pending:
                _, dropped = self._pending.popleft()
                if dropped.inspection_id not in self._journaled:
                    write_unwritten(dropped)  # never silently: the whole record goes to the journal
                    self.unwritten += 1
                self._journaled.discard(dropped.inspection_id)
                self.lost += 1
                log.error("records.dropped_from_memory", inspection_id=dropped.inspection_id)
            self._pending.append((time.monotonic(), record))
            self._cond.notify()

    def _set_failing(self, failing: bool, error: str = "") -> None:
        if failing == self.failing:
            return
        self.failing = failing
        if failing:
            log.error("records.write_failing", error=error, pending=len(self._pending), db=str(self.path))
        else:
            log.info("records.write_recovered", pending=len(self._pending), written=self.written)
        try:
            self.on_state(failing)
        except Exception:  # a listener's fault must never stop the writer
            log.exception("records.state_listener_failed")

    def _insert(self, batch: list[Record]) -> None:
        """INSERT ``batch`` in one transaction; an id already recorded is checked row by row."""
        fields = list(Record.__dataclass_fields__)
        sql = f"INSERT INTO inspections ({', '.join(fields)}) VALUES ({', '.join('?' * len(fields))})"
        try:
            with self._db:
                self._db.executemany(sql, [tuple(asdict(r).values()) for r in batch])
            return
        except sqlite3.IntegrityError:
            pass
        for record in batch:
            try:
                with self._db:
                    self._db.execute(sql, tuple(asdict(record).values()))
            except sqlite3.IntegrityError:
                self._conflict(record, fields)

    def _conflict(self, record: Record, fields: list[str]) -> None:
        row = self._db.execute(
            f"SELECT {', '.join(fields)} FROM inspections WHERE inspection_id = ?", (record.inspection_id,)
        ).fetchone()
        existing = dict(zip(fields, row, strict=True)) if row else None
        if existing == asdict(record):
            return  # the same record twice (journaled, then written): nothing to do
        self.conflicts += 1
        log.error("records.id_conflict", inspection_id=record.inspection_id, recorded=existing, new=asdict(record))

    def _journal_old(self, now: float, final: bool = False) -> None:
        """Pending records the database has refused for a while: to the journal, or to stderr."""
        with self._cond:
            due = [
                r
                for t, r in self._pending
                if r.inspection_id not in self._journaled and (final or now - t >= JOURNAL_AFTER_S)
            ]
        if not due:
            return
        if not self.journal.append(due):
            for record in due:
                write_unwritten(record)
            self.unwritten += len(due)
            if self.unwritten == len(due):
                log.error("records.journal_full", file=str(self.journal.path), hint="records go to stderr")
        with self._cond:
            self._journaled.update(r.inspection_id for r in due)

    def _run(self) -> None:
        while True:
            try:
                self._write_loop()
                return
            except Exception:  # a fault nobody foresaw: logged, and the writer goes on with what is pending
                log.exception("records.writer_error")
                time.sleep(0.5)

    def _write_loop(self) -> None:
        backoff = 0.05
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return
                batch = [self._pending[i][1] for i in range(min(256, len(self._pending)))]
            try:
                self._insert(batch)
            except Exception as exc:  # locked, disk full, I/O error: keep the batch, retry
                self._set_failing(True, str(exc))
                self._journal_old(time.monotonic())
                if self._closing and self._give_up_at is not None and time.monotonic() > self._give_up_at:
                    return
                time.sleep(backoff)
                backoff = min(backoff * 2, 0.25)
                continue
            backoff = 0.05
            with self._cond:
                for _ in batch:
                    _, r = self._pending.popleft()
                    self._journaled.discard(r.inspection_id)
                empty = not self._pending
            self.written += len(batch)
            if empty:
                self.journal.reset()  # everything journaled is in the database now
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
        """Write everything queued (retrying up to ``flush_s``), then close; journal the rest."""
        with self._cond:
            self._closing = True
            self._give_up_at = time.monotonic() + flush_s
            self._cond.notify()
        self._thread.join(timeout=flush_s + 5.0)
        if self._pending:
            self._journal_old(time.monotonic(), final=True)
            log.error(
                "records.left_in_journal",
                count=len(self._pending),
                journal=str(self.journal.path),
                stderr=self.unwritten,
                hint="imported into the database at the next start",
            )
        self.journal.close()
        self._db.close()
