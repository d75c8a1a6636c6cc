"""One part to one answer, in-process: the real model, camera, handshake and records (no subprocess)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import AppConfig, ArchiveConfig, DaemonConfig, ModelConfig, SearchConfig, ThresholdsConfig
from anomalyd.daemon.camera_supervisor import CameraSupervisor
from anomalyd.daemon.dispatch import Part
from anomalyd.daemon.handshake import ErrorCode, Handshake, Ticket
from anomalyd.daemon.judge import Judge
from anomalyd.daemon.metrics import Metrics
from anomalyd.daemon.recipes import RecipeBook
from anomalyd.daemon.recorder import Recorder
from anomalyd.drivers.camera.simulated import SimulatedCameraConfig
from anomalyd.drivers.plc.layout import Command
from anomalyd.drivers.plc.none import NoPlcConfig
from anomalyd.model.bundle import Bundle, load_bundle


def _station(  # type: ignore[no-untyped-def]
    bundle_dir: Path, sample_dir: Path, tmp_path: Path, image_threshold: float | None = None, search: str = "auto"
):
    metrics = Metrics()
    hs = Handshake(1.0, budget_ms=5000, grab_timeout_ms=1000)
    config = AppConfig(
        camera=SimulatedCameraConfig(source=sample_dir),
        model=ModelConfig(bundle=bundle_dir),
        search=SearchConfig(type=search),
        thresholds=ThresholdsConfig(image=image_threshold),
        plc=NoPlcConfig(),
        daemon=DaemonConfig(trigger="free_run", data_dir=tmp_path),
    )
    book = RecipeBook(config, hs, RecipeBook.opener(config))
    book.load_all()
    camera = CameraSupervisor(config.camera, hs, metrics)
    assert camera.ensure_open()
    recorder = Recorder(config.daemon, ArchiveConfig(enabled=False), metrics, "b")
    return hs, camera, recorder, Judge(book, hs, camera, recorder)


def _part(hs: Handshake, camera: CameraSupervisor, part_id: int) -> Part:
    ticket = hs.on_command(Command(trigger=True, part_id=part_id), time.monotonic())
    hs.on_command(Command(trigger=False, part_id=part_id), time.monotonic())
    assert isinstance(ticket, Ticket)
    camera.camera.software_trigger()
    frame = camera.camera.grab(1.0)
    now = time.monotonic()
    hs.arm(ticket, now)
    return Part(ticket, frame, frame_at=now)


def _rows(tmp_path: Path) -> list[tuple[int, int, str, int]]:
    with sqlite3.connect(tmp_path / "inspections.sqlite") as db:
        return db.execute("SELECT inspection_id, part_id, verdict, error_code FROM inspections").fetchall()


@pytest.mark.parametrize("search", ["torch", "faiss"])
def test_a_non_finite_score_fails_the_part_with_code_3(
    search: str, bundle_dir: Path, sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poisoned = load_bundle(bundle_dir).memory_bank().copy()
    poisoned[:, 0] = np.nan  # as if the bank were corrupted after the load-time check
    monkeypatch.setattr(Bundle, "memory_bank", lambda self: poisoned)
    hs, camera, recorder, judge = _station(bundle_dir, sample_dir, tmp_path, search=search)
    try:
        hs.set_ready(True)
        answer = judge.judge(_part(hs, camera, 31))
        assert answer.code == ErrorCode.MODEL_ERROR and answer.status.fail and not answer.status.passed
        assert answer.part_id == 31
    finally:
        recorder.close()
        camera.close()
    assert _rows(tmp_path) == [(1, 31, "NG", 3)]


def test_an_unexpected_fault_fails_the_part_with_code_8_and_the_next_part_is_judged(
    bundle_dir: Path, sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from anomalyd.daemon import judge as judge_module

    calls = {"n": 0}
    real_decide = judge_module.decide

    def decide_with_a_bug(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("a bug in the decision")
        return real_decide(*args, **kwargs)

    monkeypatch.setattr(judge_module, "decide", decide_with_a_bug)
    hs, camera, recorder, judge = _station(bundle_dir, sample_dir, tmp_path, image_threshold=100.0)
    try:
        hs.set_ready(True)
        first = judge.judge(_part(hs, camera, 1))
        assert first.code == ErrorCode.INTERNAL and first.status.fail and first.part_id == 1
        second = judge.judge(_part(hs, camera, 2))
        assert second.code == ErrorCode.OK and second.status.passed and second.part_id == 2
    finally:
        recorder.close()
        camera.close()
    assert _rows(tmp_path) == [(1, 1, "NG", 8), (2, 2, "OK", 0)]
