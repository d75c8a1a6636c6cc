"""The fast layer: the daemon's parts specified in-process with stand-ins for the model and the camera.

Real judge, handshake, dispatcher, recipe book, camera supervisor, recorder, archive,
drift tracker and decision; the fakes (tests/fakes.py) replace only the network and
the device. Each answer is checked against the frame it came from.
"""

from __future__ import annotations

import math
import queue
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from anomalyd.config import AppConfig, ArchiveConfig, DaemonConfig, ModelConfig, RecipeConfig, ThresholdsConfig
from anomalyd.daemon.archive import ArchiveItem, RejectArchive
from anomalyd.daemon.camera_supervisor import CameraSupervisor
from anomalyd.daemon.dispatch import Dispatcher
from anomalyd.daemon.drift import DriftTracker
from anomalyd.daemon.handshake import ErrorCode, Handshake, Ticket
from anomalyd.daemon.judge import Judge
from anomalyd.daemon.metrics import Metrics
from anomalyd.daemon.recipes import RecipeBook
from anomalyd.daemon.recorder import Recorder
from anomalyd.daemon.reloader import reload_entries
from anomalyd.decision import Label, decide, fails
from anomalyd.drivers.camera.simulated import SimulatedCameraConfig
from anomalyd.drivers.plc.layout import Command
from anomalyd.drivers.plc.none import NoPlcConfig
from tests.fakes import SHAPE, FakeOpener, ScriptedCamera, frame_for
from tests.harness import wait_until


# ---------------------------------------------------------------- decision
def test_decide_threshold_warn_band_and_non_finite() -> None:
    rules = ThresholdsConfig(warn=0.8)
    assert decide(0.5, None, 100, rules, 1.0).label is Label.OK
    assert decide(0.9, None, 100, rules, 1.0).label is Label.WARN  # passed, inside the warn band
    assert decide(1.0, None, 100, rules, 1.0).label is Label.NG  # at the threshold: fail
    for bad in (math.nan, math.inf):
        verdict = decide(bad, None, 100, rules, 1.0)
        assert not verdict.passed and verdict.label is Label.NG
        assert fails(bad, 1.0)


def test_decide_minimum_area_rule_counts_pixels_over_the_pixel_threshold() -> None:
    rules = ThresholdsConfig(pixel=0.5, min_area_px=10)
    amap = np.zeros((10, 10), np.float32)
    amap[0, :9] = 0.9  # 9 pixels over: below the minimum area
    small = decide(1.2, amap, 100, rules, 1.0)
    assert small.passed and small.defect_area_px == 9
    amap[1, 0] = 0.9  # the tenth
    big = decide(1.2, amap, 100, rules, 1.0)
    assert not big.passed and big.defect_area_px == 10
    assert str(Label.NG) == "NG" and f"{Label.WARN}" == "WARN"


# ---------------------------------------------------------------- one station, fakes at the edges
def _station(tmp_path: Path, script: list[float | str]):  # type: ignore[no-untyped-def]
    config = AppConfig(
        plc=NoPlcConfig(),
        model=ModelConfig(bundle=tmp_path / "bundle-a"),
        daemon=DaemonConfig(trigger="free_run", data_dir=tmp_path),
    )
    metrics = Metrics()
    handshake = Handshake(budget_ms=5000, grab_timeout_ms=200)
    opener = FakeOpener()
    book = RecipeBook(config, handshake, opener)  # type: ignore[arg-type]
    book.load_all()
    handshake.set_threshold(1.0)
    camera = CameraSupervisor(config.camera, handshake, metrics, camera=ScriptedCamera(script))
    assert camera.ensure_open()
    recorder = Recorder(config.daemon, ArchiveConfig(enabled=False), metrics, "bundle-a")
    triggers: queue.Queue[Ticket] = queue.Queue()
    dispatcher = Dispatcher("plc", handshake, camera, triggers, 0.2, 0.05, on_refused=recorder.add_refused)
    return handshake, dispatcher, triggers, Judge(book, handshake, camera, recorder), recorder


def _rows(tmp_path: Path) -> list[tuple[int, int, str, int, float | None]]:
    with sqlite3.connect(tmp_path / "inspections.sqlite") as db:
        return db.execute(
            "SELECT inspection_id, part_id, verdict, error_code, score FROM inspections ORDER BY inspection_id"
        ).fetchall()


def test_each_answer_is_its_own_frames_and_every_doubt_fails(tmp_path: Path) -> None:
    """Five triggers; each answer names its part and carries the score of the frame taken for it."""
    script: list[float | str] = [0.25, 1.5, "timeout", math.nan, 0.5]
    handshake, dispatcher, triggers, judge, recorder = _station(tmp_path, script)
    expected = [
        (11, Label.OK, ErrorCode.OK, 0.25),
        (12, Label.NG, ErrorCode.OK, 1.5),
        (13, Label.NG, ErrorCode.CAMERA_TIMEOUT, None),
        (14, Label.NG, ErrorCode.MODEL_ERROR, None),  # NaN never passes (nan >= threshold is False)
        (15, Label.OK, ErrorCode.OK, 0.5),
    ]
    for part_id, label, code, score in expected:
        ticket = handshake.on_command(Command(enable=True, trigger=True, part_id=part_id), time.monotonic())
        handshake.on_command(Command(enable=True, trigger=False, part_id=part_id), time.monotonic())
        assert isinstance(ticket, Ticket)
        triggers.put(ticket)
        part = dispatcher.next_part()
        assert part is not None and part.ticket is ticket
        answer = judge.judge(part)
        assert answer is not None
        status = answer.status
        assert (status.part_id, answer.code) == (part_id, code)
        assert status.passed == (label is not Label.NG) and status.fail == (label is Label.NG)
        if score is not None:
            assert status.score == pytest.approx(score)
    recorder.close()
    rows = _rows(tmp_path)
    assert [(r[1], r[2], r[3]) for r in rows] == [(p, str(lb), int(c)) for p, lb, c, _ in expected]
    assert [r[0] for r in rows] == sorted({r[0] for r in rows})  # one record per id, in order
    assert rows[1][4] == pytest.approx(1.5) and rows[2][4] is None  # the timeout's record has no score


# ---------------------------------------------------------------- recipes
def _recipes(tmp_path: Path, **bundles: str) -> AppConfig:
    return AppConfig(
        plc=NoPlcConfig(),
        daemon=DaemonConfig(trigger="free_run", data_dir=tmp_path),
        model=ModelConfig(default_recipe=1),
        recipes={int(n[1:]): RecipeConfig(name=n, bundle=tmp_path / b) for n, b in bundles.items()},
    )


def test_recipe_book_reload_loads_only_what_changed_and_never_judges_with_the_old_bundle(tmp_path: Path) -> None:
    handshake = Handshake()
    opener = FakeOpener()
    book = RecipeBook(_recipes(tmp_path, r1="a", r2="b"), handshake, opener)  # type: ignore[arg-type]
    book.load_all()
    first = {r: book.get(r) for r in (1, 2)}
    assert [i.bundle.bundle_id for i in opener.opened] == ["a", "b"]

    # Thresholds only: nothing reloads, the same inspector serves with the new rule.
    cfg = _recipes(tmp_path, r1="a", r2="b").model_copy(update={"thresholds": ThresholdsConfig(image=2.0)})
    assert book.apply(cfg) == []
    assert book.get(1).inspector is first[1].inspector and book.get(1).threshold == 2.0  # type: ignore[union-attr]

    # Recipe 2 re-pointed, recipe 3 added (its bundle refuses to load), recipe 1 unchanged.
    opener.refuse["c"] = "checksum mismatch"
    opener.delay_s = 0.05
    loading = book.apply(_recipes(tmp_path, r1="a", r2="b2", r3="c"))
    assert sorted(loading) == [2, 3]
    assert book.get(2) is None  # while loading: no recipe 2 at all, never the old bundle under the new name
    wait_until(lambda: not book.state()["loading"], 5.0, "the background loads")
    assert book.get(2).bundle_id == "b2" and book.get(1).inspector is first[1].inspector  # type: ignore[union-attr]
    assert book.state()["failed"] == {3: "checksum mismatch"} and book.get(3) is None
    book.collect()
    assert first[2].inspector.closed and not first[1].inspector.closed  # type: ignore[union-attr]

    # Removed: gone, its inspector closed between parts.
    book.apply(_recipes(tmp_path, r1="a"))
    assert book.get(2) is None and book.state()["failed"] == {}
    book.collect()
    assert opener.opened[2].closed


def test_reload_audit_entries_are_a_function_of_the_two_configs(tmp_path: Path) -> None:
    old = _recipes(tmp_path, r1="a")
    assert reload_entries(old, old, {1: str(tmp_path / "a")}) == []
    new = _recipes(tmp_path, r1="a", r2="b").model_copy(update={"thresholds": ThresholdsConfig(image=1.5)})
    entries = dict(reload_entries(old, new, {1: str(tmp_path / "a")}))
    assert entries["thresholds"]["changed"] == {"image": {"old": None, "new": 1.5}}
    assert entries["recipes"]["added"] == [2] and entries["recipes"]["removed"] == []
    moved = dict(reload_entries(old, old, {1: str(tmp_path / "elsewhere")}))
    assert moved["recipes"]["bundles_moved"] == {1: {"old": str(tmp_path / "elsewhere"), "new": str(tmp_path / "a")}}


# ---------------------------------------------------------------- camera supervisor
def test_supervisor_reopens_with_backoff_and_refuses_a_changed_frame_size() -> None:
    handshake = Handshake()
    camera = ScriptedCamera([0.1], open_fails=3)
    sup = CameraSupervisor(SimulatedCameraConfig(), handshake, Metrics(), camera=camera)
    # Each call returns at once (the loop keeps its heartbeat); attempts wait 0.5, 1, 2 s after each failure.
    opened = {t: sup.ensure_open(now=t) for t in (0.0, 0.1, 0.5, 0.6, 1.6, 2.0, 3.5, 3.7)}
    assert [t for t, ok in opened.items() if ok] == [3.7] and camera.opens == 4
    assert handshake.status.ready
    frame = frame_for(0.1, 1)
    assert sup.check(frame) is None
    other = type(frame)(np.zeros((SHAPE[0] // 2, SHAPE[1], 3), np.uint8), 2, 0)
    assert "expected" in (sup.check(other) or "")
    sup.lost("cable pulled")
    assert (
        not sup.ok and not handshake.status.ready and handshake.status.error_code == int(ErrorCode.CAMERA_DISCONNECTED)
    )


# ---------------------------------------------------------------- archive
def test_archive_keeps_its_quota_and_the_free_space_reserve(tmp_path: Path) -> None:
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)  # ~12 KB as PNG
    archive = RejectArchive(tmp_path / "archive", quota_mb=0.04, min_free_mb=0)
    written = []
    for i in range(6):
        frame_path, overlay = archive.paths_for(i, "NG", time.time_ns())
        assert archive.add(ArchiveItem(frame_path, overlay, image, None, 1.0))
        written.append(frame_path)

    def stored() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "archive").rglob("*.png") if p.exists())

    wait_until(lambda: written[-1].exists() and 0 < stored() <= 0.04 * 1024 * 1024, 10.0, "the archive under quota")
    assert not written[0].exists()  # the oldest went first
    archive.reconfigure(quota_mb=10, min_free_mb=10_000_000)  # a reserve no disk has: nothing more is kept
    frame_path, overlay = archive.paths_for(99, "NG", time.time_ns())
    archive.add(ArchiveItem(frame_path, overlay, image, None, 1.0))
    archive.close()
    assert archive.skipped == 1 and not frame_path.exists()


# ---------------------------------------------------------------- drift
def test_drift_alarms_after_min_parts_beyond_the_margin_and_restarts_with_a_new_bundle() -> None:
    tracker = DriftTracker(window=20, margin=0.2, min_parts=5)
    states = [tracker.add(1, "b1", 0.5, 0.9) for _ in range(5)]
    assert [s.drifting for s in states] == [False] * 4 + [True]  # no alarm before min_parts
    assert tracker.any_drifting
    for _ in range(20):
        back = tracker.add(1, "b1", 0.5, 0.55)
    assert not back.drifting and back.median == pytest.approx(0.55)
    fresh = tracker.add(1, "b2", 0.5, 0.95)  # a promoted bundle: a new series, not the old median
    assert fresh.parts == 1 and fresh.median is None and not fresh.drifting
    assert tracker.states()[1]["bundle"] == "b2"
