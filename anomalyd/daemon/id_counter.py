"""The inspection counter: persisted on its own, so an id the PLC has seen is never issued again.

The records table cannot be the source: a lock held elsewhere delays rows, a
deleted database or retention forgets them. The counter reserves ids in blocks
(``ceiling``), written atomically ahead of use; after a crash numbering goes on
from the ceiling, skipping at most one block and never going back.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from anomalyd.log import get_logger

log = get_logger(__name__)

BLOCK = 1000


class IdCounter:
    def __init__(self, path: Path, block: int = BLOCK) -> None:
        self.path = path
        self.block = block
        self._lock = threading.Lock()
        self.ceiling = self._read()

    def _read(self) -> int:
        try:
            text = self.path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise OSError(f"{self.path}: cannot read the inspection counter ({exc.strerror})") from None
        try:
            return int(text)
        except ValueError:
            # A damaged counter must not restart numbering: the records and the PLC still bound it.
            log.error("id_counter.unreadable", file=str(self.path), content=text[:40])
            return 0

    def _write(self, value: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", encoding="ascii") as fh:
            fh.write(f"{value}\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    def start(self, *known: int) -> int:
        """The last id that may have been issued: the largest of the ceiling and ``known`` ids."""
        last = max(self.ceiling, *known) if known else self.ceiling
        self.reserve(last)
        return last

    def reserve(self, issued: int) -> None:
        """``issued`` was just published: keep the ceiling at least half a block ahead of it."""
        with self._lock:
            if issued + self.block // 2 < self.ceiling:
                return
            ceiling = issued + self.block
            try:
                self._write(ceiling)
            except OSError as exc:  # disk full: the records and the PLC's block still bound the next start
                log.error("id_counter.write_failed", file=str(self.path), error=str(exc))
                return
            self.ceiling = ceiling

    def finish(self, last_issued: int) -> None:
        """A clean stop: the next start continues right after ``last_issued``."""
        with self._lock:
            if last_issued < self.ceiling - self.block:
                return  # never lower the ceiling below what a crash could have used
            try:
                self._write(last_issued)
                self.ceiling = last_issued
            except OSError as exc:
                log.error("id_counter.write_failed", file=str(self.path), error=str(exc))
