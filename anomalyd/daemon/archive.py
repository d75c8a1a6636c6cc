"""Reject archive: NG frames (and a sample of OK ones) with a heatmap overlay, under a disk quota."""

from __future__ import annotations

import queue
import shutil
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from anomalyd.log import get_logger
from anomalyd.overlay import overlay_heatmap, write_rgb

log = get_logger(__name__)


@dataclass(frozen=True)
class ArchiveItem:
    frame_path: Path
    overlay_path: Path
    frame: np.ndarray
    # Builds the full-frame map; called in the archive thread so the resize stays off the loop.
    frame_map: Callable[[], np.ndarray] | None
    threshold: float
    score: float | None = None
    label: str | None = None


class RejectArchive:
    """Writes images in a background thread; deletes the oldest files above the quota."""

    def __init__(self, folder: Path, quota_mb: float, min_free_mb: float = 512.0) -> None:
        self.folder = folder
        self.reconfigure(quota_mb, min_free_mb)
        self.skipped = 0
        self._short_of_space = False
        folder.mkdir(parents=True, exist_ok=True)
        existing = sorted(folder.rglob("*.png"), key=lambda p: p.stat().st_mtime)
        self._files: deque[tuple[Path, int]] = deque((p, p.stat().st_size) for p in existing)
        self._bytes = sum(size for _, size in self._files)
        self._queue: queue.Queue[ArchiveItem | None] = queue.Queue(maxsize=64)
        self._thread = threading.Thread(target=self._run, name="archive", daemon=True)
        self._thread.start()

    def reconfigure(self, quota_mb: float, min_free_mb: float) -> None:
        """The quota and the free-space reserve (at start, and on a reload); the next image obeys them."""
        self.quota_bytes = int(quota_mb * 1024 * 1024)
        self.min_free_bytes = int(min_free_mb * 1024 * 1024)

    def paths_for(self, inspection_id: int, verdict: str, time_ns: int) -> tuple[Path, Path]:
        day = np.datetime64(time_ns, "ns").astype("datetime64[D]")
        base = self.folder / str(day) / f"{inspection_id:010d}_{verdict}"
        return base.with_suffix(".png"), base.with_name(base.name + "_heatmap.png")

    def add(self, item: ArchiveItem) -> bool:
        """Queue an item; False (and nothing blocks) if the writer is behind."""
        try:
            self._queue.put_nowait(item)
            return True
        except queue.Full:
            log.warning("archive.behind", dropped=str(item.frame_path))
            return False

    def _room(self) -> bool:
        """False while the disk is below the reserve kept for the records database (logged once)."""
        free = shutil.disk_usage(self.folder).free
        short = free < self.min_free_bytes
        if short != self._short_of_space:
            self._short_of_space = short
            if short:
                log.error("archive.paused", free_mb=round(free / 2**20, 1), reserve_mb=self.min_free_bytes >> 20)
            else:
                log.info("archive.resumed", free_mb=round(free / 2**20, 1))
        return not short

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if not self._room():
                    self.skipped += 1
                    continue
                item.frame_path.parent.mkdir(parents=True, exist_ok=True)
                write_rgb(str(item.frame_path), item.frame)
                paths = [item.frame_path]
                if item.frame_map is not None:
                    write_rgb(
                        str(item.overlay_path),
                        overlay_heatmap(item.frame, item.frame_map(), item.threshold, item.score, item.label),
                    )
                    paths.append(item.overlay_path)
                for p in paths:
                    size = p.stat().st_size
                    self._files.append((p, size))
                    self._bytes += size
                self._enforce_quota()
            except Exception as exc:  # a disk or drawing fault loses this image, never the writer
                log.error("archive.write_failed", path=str(item.frame_path), error=str(exc))

    def _enforce_quota(self) -> None:
        while self._bytes > self.quota_bytes and self._files:
            path, size = self._files.popleft()
            path.unlink(missing_ok=True)
            self._bytes -= size

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30.0)
