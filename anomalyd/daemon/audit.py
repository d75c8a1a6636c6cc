"""The audit log: who changed what, when. Append-only, tamper-evident, written before the change.

Threshold changes applied by a reload (old → new, config hash), promotions and
rollbacks of bundles, recipe changes, teaching, start and stop. An entry is
written *before* the change takes effect; a change whose entry cannot be
written is refused.

SQLite triggers refuse UPDATE and DELETE, but anyone who can write the file can
drop them. So each entry also carries the SHA-256 of the one before (a chain),
and the newest entry's seq and hash are kept beside the database
(``audit.head``): an edited, deleted or out-of-order row breaks the chain, and a
table dropped and begun again no longer reaches the head. :meth:`AuditLog.verify`
says where.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anomalyd.errors import AnomalydError
from anomalyd.log import get_logger

log = get_logger(__name__)

GENESIS = "0" * 64

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns INTEGER NOT NULL,
    actor TEXT NOT NULL,       -- the user who ran the command, or "daemon"
    action TEXT NOT NULL,      -- start, stop, reload, thresholds, recipes, teach, promote, rollback
    detail TEXT NOT NULL,      -- JSON
    prev_hash TEXT,            -- the hash of the entry before (GENESIS for the first)
    hash TEXT                  -- SHA-256 over prev_hash and this entry
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


class AuditError(AnomalydError):
    """An entry could not be written: the change it describes must not happen."""


@dataclass(frozen=True)
class Verdict:
    ok: bool
    entries: int
    problem: str = ""  # the first break, naming its entry


def entry_hash(prev: str, seq: int, time_ns: int, actor: str, action: str, detail: str) -> str:
    body = json.dumps([prev, seq, time_ns, actor, action, detail], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def current_user() -> str:
    """The person behind a command: the sudo caller when run with sudo -u."""
    for var in ("SUDO_USER", "LOGNAME", "USER"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


class AuditLog:
    def __init__(self, database: Path, timeout_s: float = 5.0) -> None:
        self.path = database
        self.head_path = database.with_name("audit.head")
        self.timeout_s = timeout_s
        database.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)  # also puts back triggers someone dropped
            have = {row[1] for row in db.execute("PRAGMA table_info(audit)")}
            for column in ("prev_hash", "hash"):
                if column not in have:  # a database from before the chain: older rows stay unchained
                    db.execute(f"ALTER TABLE audit ADD COLUMN {column} TEXT")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=self.timeout_s, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def append(self, action: str, detail: dict[str, Any], actor: str | None = None) -> bool:
        """Add one entry; False (and a loud log line) if the database refused it."""
        try:
            self.record(action, detail, actor)
        except AuditError as exc:
            log.error("audit.write_failed", action=action, error=str(exc), detail=detail)
            return False
        return True

    def record(self, action: str, detail: dict[str, Any], actor: str | None = None) -> int:
        """Add one entry, chained to the one before; its seq. AuditError if it cannot be written."""
        actor = actor or current_user()
        text = json.dumps(detail, sort_keys=True, default=str)
        try:
            db = self._connect()
            try:
                db.execute("BEGIN IMMEDIATE")  # the last hash and the new row under one lock
                row = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                seq = (row[0] if row else 0) + 1
                prev = (row[1] or GENESIS) if row else GENESIS
                head = self._head()
                if head is not None and head[0] >= seq:
                    # The newest entry written is no longer in the table (deleted, or the table begun
                    # again): go on from it, so the gap stays visible instead of a fresh chain at 1.
                    seq, prev = head[0] + 1, head[1]
                now = time.time_ns()
                digest = entry_hash(prev, seq, now, actor, action, text)
                db.execute(
                    "INSERT INTO audit (seq, time_ns, actor, action, detail, prev_hash, hash) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, now, actor, action, text, prev, digest),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise AuditError(f"{self.path}: cannot write the audit entry for {action} ({exc})") from None
        self._write_head(seq, digest)
        log.info("audit", action=action, actor=actor, **{k: v for k, v in detail.items() if k != "action"})
        return seq

    def _write_head(self, seq: int, digest: str) -> None:
        tmp = self.head_path.with_name(f".audit.head.{os.getpid()}")
        try:
            tmp.write_text(f"{seq} {digest}\n", encoding="ascii")
            os.replace(tmp, self.head_path)
        except OSError as exc:  # the chain itself still holds; only a drop-and-restart goes unseen until it is written
            log.error("audit.head_write_failed", file=str(self.head_path), error=str(exc))

    def _head(self) -> tuple[int, str] | None:
        try:
            seq, digest = self.head_path.read_text(encoding="ascii").split()
            return int(seq), digest
        except FileNotFoundError:
            return None
        except (OSError, ValueError, UnicodeDecodeError):
            return (-1, "")

    def verify(self) -> Verdict:
        """Is the chain whole? The first broken entry otherwise (edited, deleted, inserted, begun again)."""
        try:
            with self._connect() as db:
                rows = db.execute(
                    "SELECT seq, time_ns, actor, action, detail, prev_hash, hash FROM audit ORDER BY seq"
                ).fetchall()
        except sqlite3.Error as exc:
            return Verdict(False, 0, f"the audit table cannot be read ({exc})")
        chained = [r for r in rows if r[6] is not None]
        if len(chained) < len(rows) and any(r[6] is None for r in rows[len(rows) - len(chained) :]):
            bad = next(r for r in rows[len(rows) - len(chained) :] if r[6] is None)
            return Verdict(False, len(rows), f"entry {bad[0]}: has no hash after chained entries (inserted by hand)")
        prev, last_seq, last_time = GENESIS, None, 0
        if chained and chained[0][5] != GENESIS:
            first = chained[0][0]
            return Verdict(
                False,
                len(rows),
                f"entry {first}: entry {first - 1} and those before it are not in the log (deleted, or begun again)",
            )
        for seq, time_ns, actor, action, detail, prev_hash, digest in chained:
            if last_seq is not None and seq != last_seq + 1:
                return Verdict(False, len(rows), f"entry {last_seq + 1}: missing (deleted); the chain jumps to {seq}")
            if last_seq is not None and prev_hash != prev:
                return Verdict(False, len(rows), f"entry {seq}: does not follow entry {last_seq} (inserted or edited)")
            if entry_hash(prev_hash, seq, time_ns, actor, action, detail) != digest:
                return Verdict(False, len(rows), f"entry {seq}: its content does not match its hash (edited)")
            if time_ns < last_time:
                return Verdict(False, len(rows), f"entry {seq}: dated before entry {last_seq} (back-dated)")
            prev, last_seq, last_time = digest, seq, time_ns
        head = self._head()
        if head is None and chained:
            return Verdict(False, len(rows), f"{self.head_path}: missing, but the log has chained entries (deleted?)")
        if head is not None:
            seq, digest = head
            found = next((r for r in chained if r[0] == seq), None)
            if seq < 0:
                return Verdict(False, len(rows), f"{self.head_path}: damaged")
            if found is None:
                return Verdict(
                    False, len(rows), f"entry {seq}: the newest entry written is gone (deleted, or the log begun again)"
                )
            if found[6] != digest:
                return Verdict(False, len(rows), f"entry {seq}: not the entry that was written (the log begun again?)")
        return Verdict(True, len(rows))

    def recent(self, limit: int = 20) -> list[dict[str, Any]]:
        try:
            with self._connect() as db:
                rows = db.execute(
                    "SELECT seq, time_ns, actor, action, detail FROM audit ORDER BY seq DESC LIMIT ?", (limit,)
                ).fetchall()
        except sqlite3.Error:
            return []
        return [
            {"seq": s, "time": t / 1e9, "actor": a, "action": act, "detail": json.loads(d)} for s, t, a, act, d in rows
        ]
