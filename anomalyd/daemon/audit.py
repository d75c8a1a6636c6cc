"""The audit log: who changed what, when. Append-only, in the records database.

Threshold changes applied by a reload (old → new, config hash), promotions and
rollbacks of bundles, recipe changes, teaching, start and stop. SQLite triggers
refuse UPDATE and DELETE on the table, so nothing in anomalyd can edit or remove
an entry (retention never touches it).
"""

from __future__ import annotations

import getpass
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from anomalyd.log import get_logger

log = get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    time_ns INTEGER NOT NULL,
    actor TEXT NOT NULL,       -- the user who ran the command, or "daemon"
    action TEXT NOT NULL,      -- start, stop, reload, thresholds, recipes, teach, promote, rollback
    detail TEXT NOT NULL       -- JSON
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


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
    def __init__(self, database: Path) -> None:
        self.path = database
        database.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(str(self.path), timeout=5.0)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def append(self, action: str, detail: dict[str, Any], actor: str | None = None) -> bool:
        """Add one entry; False (and a loud log line) if the database refused it."""
        actor = actor or current_user()
        try:
            with self._connect() as db:
                db.execute(
                    "INSERT INTO audit (time_ns, actor, action, detail) VALUES (?, ?, ?, ?)",
                    (time.time_ns(), actor, action, json.dumps(detail, sort_keys=True, default=str)),
                )
        except sqlite3.Error as exc:
            log.error("audit.write_failed", action=action, error=str(exc), detail=detail)
            return False
        log.info("audit", action=action, actor=actor, **{k: v for k, v in detail.items() if k != "action"})
        return True

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
