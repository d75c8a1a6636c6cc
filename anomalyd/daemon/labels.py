"""Labels from the line: a person says what a part really was (defect confirmed, or good: a false reject).

Stored with who and when in the records database (table ``labels``, one row per
statement, the newest wins) and in the audit log. ``anomalyd teach --labelled``
gathers labelled parts into a training set; ``fit --defects`` learns from them.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Literal

from anomalyd.daemon.audit import AuditLog, current_user
from anomalyd.errors import AnomalydError

Label = Literal["defect", "good"]
LABELS: tuple[Label, ...] = ("defect", "good")

SCHEMA = """
CREATE TABLE IF NOT EXISTS labels (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    inspection_id INTEGER NOT NULL,
    label TEXT NOT NULL CHECK (label IN ('defect', 'good')),
    actor TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS labels_inspection ON labels(inspection_id);
"""


def _connect(database: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(database), timeout=5.0)
    db.execute("PRAGMA journal_mode=WAL")
    db.executescript(SCHEMA)
    return db


def resolve_ids(database: Path, ids: list[int], by_part: bool) -> list[tuple[int, int | None, str]]:
    """(inspection_id, part_id, verdict) of the records named by inspection ids or, with ``by_part``, part ids."""
    column = "part_id" if by_part else "inspection_id"
    with _connect(database) as db:
        found: list[tuple[int, int | None, str]] = []
        for value in ids:
            rows = db.execute(
                f"SELECT inspection_id, part_id, verdict FROM inspections WHERE {column} = ? AND refused = 0 "
                "ORDER BY inspection_id DESC",
                (value,),
            ).fetchall()
            if not rows:
                what = "part" if by_part else "inspection"
                raise AnomalydError(f"{database}: no inspected record of {what} {value}")
            found.append(rows[0])  # a part inspected twice: its newest inspection
    return found


def add_labels(
    database: Path, ids: list[int], label: Label, by_part: bool = False, actor: str | None = None, note: str = ""
) -> list[tuple[int, int | None, str]]:
    """Label records (audited first: a label that cannot be audited is not stored)."""
    if label not in LABELS:
        raise AnomalydError(f"label {label!r}: defect or good")
    records = resolve_ids(database, ids, by_part)
    actor = actor or current_user()
    AuditLog(database).record(
        "label",
        {"label": label, "inspections": [r[0] for r in records], "parts": [r[1] for r in records], "note": note},
        actor=actor,
    )
    now = time.time_ns()
    with _connect(database) as db:
        db.executemany(
            "INSERT INTO labels (inspection_id, label, actor, time_ns, note) VALUES (?, ?, ?, ?, ?)",
            [(r[0], label, actor, now, note or None) for r in records],
        )
    return records


def current_labels(database: Path) -> dict[int, tuple[Label, str, int]]:
    """inspection_id → (label, actor, time_ns): the newest statement about each labelled record."""
    with _connect(database) as db:
        rows = db.execute("SELECT inspection_id, label, actor, time_ns FROM labels ORDER BY seq").fetchall()
    return {i: (label, actor, t) for i, label, actor, t in rows}
