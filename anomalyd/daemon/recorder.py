"""What happens to a result after the PLC has it: counts, metrics, the record, the archive."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from anomalyd.config import ArchiveConfig, DaemonConfig, RecordsConfig
from anomalyd.daemon.archive import ArchiveItem, RejectArchive
from anomalyd.daemon.decision import Verdict
from anomalyd.daemon.handshake import Answer, ErrorCode
from anomalyd.daemon.id_counter import IdCounter
from anomalyd.daemon.mes import MqttPublisher
from anomalyd.daemon.metrics import Metrics
from anomalyd.daemon.page import PageFeed
from anomalyd.daemon.records import Record, RecordStore
from anomalyd.drivers.camera.base import Frame
from anomalyd.engines.inspector import STAGES, Inspection
from anomalyd.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One answer as the PLC was told it, with what the model said about the part's frame."""

    answer: Answer
    latency_ms: float
    verdict: Verdict | None = None  # the model's verdict (for a late answer: what it would have said)
    inspection: Inspection | None = None
    frame: Frame | None = None
    recipe: int = 0
    bundle_id: str | None = None  # the recipe's bundle (None: the recorder's default)

    @property
    def inspection_id(self) -> int:
        return self.answer.status.inspection_id

    @property
    def code(self) -> ErrorCode:
        return self.answer.code

    @property
    def threshold(self) -> float:
        return self.answer.status.threshold

    @property
    def label(self) -> str:
        """OK, WARN or NG: what the PLC was told (a pass is OK or WARN, anything else NG)."""
        if not self.answer.status.passed:
            return "NG"
        return self.verdict.label if self.verdict is not None else "OK"


class Recorder:
    """Owns the record store, the reject archive and the counters; the loop only hands it outcomes."""

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
        self.config_id = ""
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
        self.page_feed: PageFeed | None = None  # the operator page, when served
        self.mes: MqttPublisher | None = None  # results to the MES, when configured
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

    def add(self, outcome: Outcome) -> None:
        self.ids.reserve(outcome.inspection_id)  # before anything else: an id the PLC saw is never reissued
        with self._lock:
            self._count(outcome)
            record, overlay = self._store(outcome)
            if self.mes is not None:  # under the lock: the MES gets results in the order they were recorded
                self.mes.offer(record, overlay)  # one append: publishing is its own thread
        self.metrics.records_pending.set(self.records.pending)
        self.metrics.records_unwritten.set(self.records.unwritten)
        if self.page_feed is not None:
            self.page_feed.offer(outcome)  # never blocks: rendering is the page's own thread

    def add_refused(self, answer: Answer) -> None:
        """A trigger answered without an inspection (from the PLC worker's thread)."""
        log.warning("trigger.refused", id=answer.status.inspection_id, part_id=answer.part_id, code=int(answer.code))
        self.add(Outcome(answer, 0.0, recipe=answer.status.recipe))

    def _count(self, o: Outcome) -> None:
        self.counts[o.label] += 1
        self.metrics.inspections.labels(verdict=o.label).inc()
        if o.code:
            self.counts["errors"] += 1
            self.metrics.errors.labels(code=str(int(o.code))).inc()
        if o.code == ErrorCode.OVER_BUDGET:
            self.counts["deadline_misses"] += 1
            self.metrics.deadline_misses.inc()
        if o.answer.refused:
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
        if not o.answer.refused:
            self.metrics.frame_to_result_seconds.observe(o.latency_ms / 1000.0)

    def _store(self, o: Outcome) -> tuple[Record, str | None]:
        """Record the outcome (and archive its images); the record and the overlay's path."""
        now = time.time_ns()
        archive_path = overlay_path = None
        every = self.archive_config.ok_sample_every
        wanted = o.label == "NG" or (every and o.inspection_id % every == 0)
        if self.archive_config.enabled and o.frame is not None and wanted:
            frame_path, overlay_path_ = self.archive.paths_for(o.inspection_id, o.label, now)
            inspection, shape = o.inspection, o.frame.image.shape
            fmap = (lambda: inspection.frame_map(shape)) if inspection is not None else None
            score_now = inspection.score if inspection is not None else None
            item = ArchiveItem(frame_path, overlay_path_, o.frame.image, fmap, o.threshold, score_now, o.label)
            if self.archive.add(item):
                archive_path, overlay_path = str(frame_path), str(overlay_path_)
        t = o.inspection.timings_ms if o.inspection is not None else {}
        score = o.inspection.score if o.inspection is not None else None
        record = Record(
            inspection_id=o.inspection_id,
            time_ns=now,
            verdict=o.label,
            score=score,
            threshold=o.threshold,
            error_code=int(o.code),
            latency_ms=o.latency_ms,
            preprocess_ms=t.get("preprocess"),
            extract_ms=t.get("extract"),
            search_ms=t.get("search"),
            map_ms=t.get("map"),
            defect_area_px=o.verdict.defect_area_px if o.verdict else None,
            archive_path=archive_path,
            source=o.frame.source if o.frame else None,
            frame_id=o.frame.frame_id if o.frame else None,
            bundle_id=o.bundle_id or self.bundle_id,
            config_hash=self.config_id,
            recipe=o.recipe,
            part_id=o.answer.part_id,
            late=int(o.answer.late),
            refused=int(o.answer.refused),
            model_verdict=o.verdict.label if o.verdict is not None else None,
        )
        self.records.add(record)
        log.info(
            "inspection",
            id=o.inspection_id,
            part_id=o.answer.part_id,
            verdict=o.label,
            score=None if score is None else round(score, 4),
            latency_ms=round(o.latency_ms, 1),
            error_code=int(o.code),
            late=o.answer.late,
        )
        return record, overlay_path

    def close(self, last_issued: int | None = None) -> None:
        self.records.close()
        self.archive.close()
        if last_issued is not None:
            self.ids.finish(last_issued)  # a clean stop: numbering continues without a gap
