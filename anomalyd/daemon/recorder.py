"""What happens to a result after the PLC has it: counts, metrics, the record, the archive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from anomalyd.config import ArchiveConfig, DaemonConfig, RecordsConfig
from anomalyd.daemon.archive import RejectArchive
from anomalyd.daemon.handshake import Answer, ErrorCode
from anomalyd.daemon.id_counter import IdCounter
from anomalyd.daemon.mes import MqttPublisher
from anomalyd.daemon.metrics import Metrics
from anomalyd.daemon.page import PageFeed
from anomalyd.daemon.records import Record, RecordStore
from anomalyd.daemon.result import Result
from anomalyd.decision import Label
from anomalyd.log import get_logger
from anomalyd.model.inspector import STAGES

log = get_logger(__name__)


class Recorder:
    """Owns the record store, the reject archive and the counters; the loop only hands it results."""

    def __init__(
        self,
        daemon: DaemonConfig,
        archive: ArchiveConfig,
        metrics: Metrics,
        bundle_id: str,
        records: RecordsConfig | None = None,
        on_failing: Callable[[bool], None] = lambda failing: None,
        on_ids: Callable[[bool], None] = lambda ok: None,
        on_id_limit: Callable[[int], None] = lambda limit: None,
        config_id: str = "",
        page_feed: PageFeed | None = None,
        mes: MqttPublisher | None = None,
    ) -> None:
        data: Path = daemon.data_dir
        records = records or RecordsConfig()
        self.required = records.required
        self._on_failing = on_failing
        self.metrics = metrics  # before the record store: its writer reports through it at once
        self.records = RecordStore(
            data / "inspections.sqlite",
            daemon.records_retention_days,
            daemon.records_retention_count,
            records.max_pending,
            on_state=self._records_state,
            journal_bytes=int(records.journal_mb * (1 << 20)),
        )
        self.ids = IdCounter(data / "inspection_id", on_state=on_ids, on_ceiling=on_id_limit)
        self.ids.open()  # its space is taken now: a full disk later cannot stop it being saved
        self.archive = RejectArchive(data / "archive", archive.quota_mb, archive.min_free_mb)
        metrics.count_from("records_dropped", lambda: self.records.lost)
        metrics.count_from("archive_skipped", lambda: self.archive.skipped)
        self.archive_config = archive
        self.bundle_id = bundle_id
        self.config_id = config_id  # the config's hash, in every record
        self.counts: dict[str, int] = {
            "OK": 0,
            "WARN": 0,
            "NG": 0,
            "errors": 0,
            "deadline_misses": 0,
            "missed_triggers": 0,
        }
        # The loop records inspections, the PLC worker refused triggers: one at a time.
        self._lock = threading.Lock()
        self.page_feed = page_feed  # the operator page, when served
        self.mes = mes  # results to the MES, when configured
        self.missing_at_start = 0

    def _records_state(self, failing: bool) -> None:
        self.metrics.records_ok.set(0 if failing else 1)
        self._on_failing(failing)

    @property
    def failing(self) -> bool:
        """Records cannot be written right now (they wait in memory)."""
        return self.records.failing

    def last_inspection_id(self) -> int:
        """The last id that may have been issued: counter file and records, whichever is ahead.

        Also says how many ids the last run answered without a record (a kill -9
        while the disk was full or the database locked: at most its last second).
        """
        previous = self.ids.previous
        if previous is not None and previous.first and previous.issued >= previous.first:
            answered = previous.issued - previous.first + 1
            recorded = self.records.count_between(previous.first, previous.issued)
            self.missing_at_start = answered - recorded
            if self.missing_at_start:
                log.warning(
                    "records.missing_at_start",
                    count=self.missing_at_start,
                    first=previous.first,
                    last=previous.issued,
                    ceiling=previous.ceiling,
                    note="ids answered by the last run without a record (and any it issued after "
                    f"{previous.issued} within its last second)",
                )
        return self.ids.start(self.records.last_inspection_id())

    def reconfigure(self, archive: ArchiveConfig, config_id: str) -> None:
        """A reload: the archive's rules and quota, and the config hash later records carry."""
        with self._lock:
            self.archive_config = archive
            self.config_id = config_id
        self.archive.reconfigure(archive.quota_mb, archive.min_free_mb)

    def add(self, result: Result) -> None:
        self.ids.reserve(result.inspection_id)  # before anything else: an id the PLC saw is never reissued
        with self._lock:
            self._count(result)
            record, overlay = self._store(result)
            if self.mes is not None:  # under the lock: the MES gets results in the order they were recorded
                self.mes.offer(record, overlay)  # one append: publishing is its own thread
        self.metrics.records_pending.set(self.records.pending)
        self.metrics.records_unwritten.set(self.records.unwritten)
        if self.page_feed is not None:
            self.page_feed.offer(result)  # never blocks: rendering is the page's own thread

    def add_refused(self, answer: Answer) -> None:
        """A trigger answered without an inspection (from the PLC worker's thread)."""
        log.warning("trigger.refused", id=answer.status.inspection_id, part_id=answer.part_id, code=int(answer.code))
        self.add(Result(answer, 0.0, recipe=answer.status.recipe, reason="trigger refused"))

    def _count(self, o: Result) -> None:
        self.counts[str(o.label)] += 1
        self.metrics.inspections.labels(verdict=str(o.label)).inc()
        if o.code:
            self.counts["errors"] += 1
            self.metrics.errors.labels(code=str(int(o.code))).inc()
        if o.code == ErrorCode.OVER_BUDGET:
            self.counts["deadline_misses"] += 1
            self.metrics.deadline_misses.inc()
        if o.refused:
            self.counts["missed_triggers"] += 1
            self.metrics.missed_triggers.labels(code=str(int(o.code))).inc()
        if o.inspection is not None:
            self.metrics.score.set(o.inspection.score)
            timings = o.inspection.timings_ms
            for stage in STAGES:
                if stage in timings:
                    self.metrics.stage_seconds.labels(stage=stage).observe(timings[stage] / 1000.0)
            if "total" in timings:
                self.metrics.inference_seconds.observe(timings["total"] / 1000.0)
        if not o.refused:
            self.metrics.frame_to_result_seconds.observe(o.latency_ms / 1000.0)

    def _store(self, o: Result) -> tuple[Record, str | None]:
        """Record the result (and archive its images); the record and the overlay's path."""
        now = time.time_ns()
        archive_path = overlay_path = None
        every = self.archive_config.ok_sample_every
        wanted = o.label == Label.NG or (every and o.inspection_id % every == 0)
        if self.archive_config.enabled and o.frame is not None and wanted:
            frame_path, overlay_path_ = self.archive.paths_for(o.inspection_id, str(o.label), now)
            if self.archive.add(o.archive_item(frame_path, overlay_path_)):
                archive_path, overlay_path = str(frame_path), str(overlay_path_)
        record = o.record(now, self.bundle_id, self.config_id, archive_path)
        score = o.score
        self.records.add(record)
        log.info(
            "inspection",
            id=o.inspection_id,
            part_id=o.part_id,
            verdict=str(o.label),
            score=None if score is None else round(score, 4),
            latency_ms=round(o.latency_ms, 1),
            error_code=int(o.code),
            late=o.late,
        )
        return record, overlay_path

    def close(self, last_issued: int | None = None) -> None:
        self.records.close()
        self.archive.close()
        if last_issued is not None:
            self.ids.finish(last_issued)  # a clean stop: numbering continues without a gap
