"""The inspection counter: persisted on its own, so an id the PLC has seen is never issued again.

The records table cannot be the source: a lock held elsewhere delays rows, a
deleted database or retention forgets them. The counter reserves ids in blocks
(``ceiling``), saved ahead of use; no id above the saved ceiling is ever
published (the handshake is told the limit). After a crash numbering goes on
from the ceiling, skipping at most one block and never going back.

The file is allocated once, at start (two 64-byte slots), and every save
overwrites the older slot in place: a full disk cannot stop a save, and a torn
write spoils one slot while the other still bounds every id issued. Each save
also notes the last id issued and the first of this run, so the next start can
say how many answered ids have no record.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anomalyd.log import get_logger

log = get_logger(__name__)

BLOCK = 1000
SLOT = 64
NOTE_EVERY_S = 0.5  # how stale the noted last id may be (the "last second" a crash can forget)


@dataclass(frozen=True)
class Saved:
    seq: int
    ceiling: int
    issued: int  # the last id issued when saved (0: unknown)
    first: int  # the first id of the run that saved it (0: unknown)


def _encode(s: Saved) -> bytes:
    body = f"anomalyd-ids {s.seq} {s.ceiling} {s.issued} {s.first}"
    line = f"{body} {zlib.crc32(body.encode()):08x}\n".encode("ascii")
    return line.ljust(SLOT, b" ")


def _decode(raw: bytes) -> Saved | None:
    try:
        body, crc = raw.decode("ascii").strip().rsplit(" ", 1)
        magic, seq, ceiling, issued, first = body.split(" ")
    except (UnicodeDecodeError, ValueError):
        return None
    if magic != "anomalyd-ids" or f"{zlib.crc32(body.encode()):08x}" != crc:
        return None
    return Saved(int(seq), int(ceiling), int(issued), int(first))


class IdCounter:
    def __init__(
        self,
        path: Path,
        block: int = BLOCK,
        on_state: Callable[[bool], None] = lambda ok: None,
        on_ceiling: Callable[[int], None] = lambda ceiling: None,
    ) -> None:
        self.path = path
        self.block = block
        self.on_state = on_state
        self.on_ceiling = on_ceiling
        self._lock = threading.Lock()
        self.failing = False
        self.write_failures = 0
        saved = self._read()
        self.previous = saved  # what the last run noted (None: a first start or an old file)
        self.ceiling = saved.ceiling if saved else 0
        self._seq = saved.seq if saved else 0
        self.first = 0
        self.issued = 0
        self._noted_at = 0.0
        self._fd: int | None = None

    def _read(self) -> Saved | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise OSError(f"{self.path}: cannot read the inspection counter ({exc.strerror})") from None
        slots = [s for s in (_decode(raw[i : i + SLOT]) for i in range(0, min(len(raw), 2 * SLOT), SLOT)) if s]
        if slots:
            return max(slots, key=lambda s: s.seq)
        try:  # the first version's file: one number
            return Saved(0, int(raw.decode("ascii").strip()), 0, 0)
        except (UnicodeDecodeError, ValueError):
            # A damaged counter must not restart numbering: the records and the PLC still bound it.
            log.error("id_counter.unreadable", file=str(self.path), content=raw[:40].decode("latin-1"))
            return None

    def open(self) -> None:
        """Allocate the file's two slots now, while there is space (OSError: a start-up fault)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if os.fstat(fd).st_size < 2 * SLOT or _decode(os.pread(fd, SLOT, 0)) is None:
                os.posix_fallocate(fd, 0, 2 * SLOT)
                blank = _encode(Saved(self._seq, self.ceiling, 0, 0))
                os.pwrite(fd, blank + blank, 0)  # an old one-number file becomes two slots
                os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def _save(self, ceiling: int) -> bool:
        """Write ``ceiling`` (and the last id issued) over the older slot; False if the disk refused."""
        saved = Saved(self._seq + 1, ceiling, self.issued, self.first)
        try:
            if self._fd is None:
                raise OSError("the counter file is not open")
            os.pwrite(self._fd, _encode(saved), (saved.seq % 2) * SLOT)
            os.fsync(self._fd)
        except OSError as exc:
            self.write_failures += 1
            if not self.failing:  # once per episode, not once per part
                log.error("id_counter.write_failed", file=str(self.path), error=str(exc), ceiling=self.ceiling)
                self.failing = True
                self.on_state(False)
            return False
        self._seq = saved.seq
        self._noted_at = time.monotonic()
        if ceiling != self.ceiling:
            self.ceiling = ceiling
            self.on_ceiling(ceiling)
        if self.failing:
            log.info("id_counter.write_recovered", file=str(self.path), ceiling=ceiling)
            self.failing = False
            self.on_state(True)
        return True

    def start(self, *known: int) -> int:
        """The last id that may have been issued: the largest of the ceiling and ``known`` ids."""
        last = max(self.ceiling, *known) if known else self.ceiling
        with self._lock:
            self.first, self.issued = last + 1, last
            if not self._save(last + self.block):
                self.on_ceiling(self.ceiling)  # only what was saved before may be issued
        return last

    def reserve(self, issued: int) -> None:
        """``issued`` was just published: keep the ceiling at least half a block ahead of it."""
        with self._lock:
            self.issued = max(self.issued, issued)
            if issued + self.block // 2 >= self.ceiling:
                self._save(issued + self.block)
            elif self.failing or time.monotonic() - self._noted_at > NOTE_EVERY_S:
                self._save(self.ceiling)  # notes the last id issued (and retries after a failure)

    def retry(self) -> None:
        """While saving fails: try again (called from the loop's tick)."""
        if self.failing:
            with self._lock:
                self._save(max(self.ceiling, self.issued + self.block))

    def finish(self, last_issued: int) -> None:
        """A clean stop: the next start continues right after ``last_issued``."""
        with self._lock:
            self.issued = max(self.issued, last_issued)
            if last_issued >= self.ceiling - self.block:  # never lower it below what a crash could have used
                self._save(last_issued)
            else:
                self._save(self.ceiling)
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
