"""One part's result: built once by the judge (or the PLC worker for a refused trigger), read by everyone.

The record row, the page item, the archive entry and the MQTT message are derived
from it here, so each says the same label, score and code: the label is decided in
one place (:attr:`Result.label`) from what the PLC was told.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from anomalyd.daemon.archive import ArchiveItem
from anomalyd.daemon.handshake import ERROR_MEANINGS, Answer, ErrorCode
from anomalyd.daemon.records import Record
from anomalyd.decision import Label, Verdict
from anomalyd.drivers.camera.base import Frame
from anomalyd.model.inspector import Inspection


@dataclass(frozen=True)
class Result:
    """One answer as the PLC was told it (``answer.status``), with what the model said about the part's frame."""

    answer: Answer
    latency_ms: float
    verdict: Verdict | None = None  # the model's verdict (for a late answer: what it would have said)
    inspection: Inspection | None = None
    frame: Frame | None = None
    recipe: int = 0
    bundle_id: str | None = None  # the recipe's bundle (None: the recorder's default)
    reason: str = ""  # why a part failed with an error code, in words for the log

    @property
    def inspection_id(self) -> int:
        return self.answer.status.inspection_id

    @property
    def part_id(self) -> int:
        return self.answer.part_id

    @property
    def code(self) -> ErrorCode:
        return self.answer.code

    @property
    def late(self) -> bool:
        return self.answer.late

    @property
    def refused(self) -> bool:
        return self.answer.refused

    @property
    def threshold(self) -> float:
        return self.answer.status.threshold

    @property
    def score(self) -> float | None:
        """The model's normalised score (None: the part was not inspected)."""
        return self.inspection.score if self.inspection is not None else None

    @property
    def timeout(self) -> bool:
        """Failed by the deadline (code 2): the verdict is the deadline's, the model's score came late."""
        return self.code == ErrorCode.OVER_BUDGET

    @property
    def label(self) -> Label:
        """OK, WARN or NG: what the PLC was told (a pass is OK or WARN, anything else NG)."""
        if not self.answer.status.passed:
            return Label.NG
        return self.verdict.label if self.verdict is not None else Label.OK

    @property
    def error_text(self) -> str:
        """The error code in words (docs/plc.md); '' for code 0."""
        return ERROR_MEANINGS.get(self.code, "unknown error") if self.code else ""

    def archive_item(self, frame_path: Path, overlay_path: Path) -> ArchiveItem:
        """The frame and its overlay for the reject archive (only for a result with a frame)."""
        frame, inspection = self.frame, self.inspection
        assert frame is not None, "a result without a frame has nothing to archive"
        shape = frame.image.shape
        frame_map = (lambda: inspection.frame_map(shape)) if inspection is not None else None
        return ArchiveItem(
            frame_path, overlay_path, frame.image, frame_map, self.threshold, self.score, str(self.label)
        )

    def record(self, time_ns: int, bundle_id: str, config_hash: str, archive_path: str | None) -> Record:
        """The row of the records database."""
        t = self.inspection.timings_ms if self.inspection is not None else {}
        return Record(
            inspection_id=self.inspection_id,
            time_ns=time_ns,
            verdict=str(self.label),
            score=self.score,
            threshold=self.threshold,
            error_code=int(self.code),
            latency_ms=self.latency_ms,
            preprocess_ms=t.get("preprocess"),
            extract_ms=t.get("extract"),
            search_ms=t.get("search"),
            map_ms=t.get("map"),
            defect_area_px=self.verdict.defect_area_px if self.verdict else None,
            archive_path=archive_path,
            source=self.frame.source if self.frame else None,
            frame_id=self.frame.frame_id if self.frame else None,
            bundle_id=self.bundle_id or bundle_id,
            config_hash=config_hash,
            recipe=self.recipe,
            part_id=self.part_id,
            late=int(self.late),
            refused=int(self.refused),
            model_verdict=str(self.verdict.label) if self.verdict is not None else None,
        )
