"""The result contract as a pure state machine: every answer names its own part.

Time is passed in explicitly, so lateness is exact and the tests do not sleep.
"""

from __future__ import annotations

import math
import queue
import random
from pathlib import Path

import numpy as np
import pytest

from anomalyd.daemon.camera_supervisor import CameraSupervisor
from anomalyd.daemon.dispatch import Dispatcher
from anomalyd.daemon.handshake import Answer, ErrorCode, Handshake, Ticket
from anomalyd.daemon.metrics import Metrics
from anomalyd.drivers.camera.simulated import SimulatedCameraConfig
from anomalyd.drivers.plc.layout import Command, Status

BUDGET_MS = 100.0


def ready_handshake(**kwargs: float) -> Handshake:
    hs = Handshake(threshold=1.1, budget_ms=BUDGET_MS, grab_timeout_ms=50.0, **kwargs)  # type: ignore[arg-type]
    hs.set_ready(True)
    return hs


def trigger(hs: Handshake, part_id: int, now: float, enable: bool = True) -> Ticket | Answer | None:
    """A rising edge with ``part_id``, written in one command (the trigger then drops)."""
    edge = hs.on_command(Command(trigger=True, enable=enable, part_id=part_id), now)
    hs.on_command(Command(trigger=False, enable=enable, part_id=part_id), now)
    return edge


def assert_answer_of(status: Status, part_id: int, passed: bool, code: ErrorCode) -> None:
    assert status.result_valid and status.part_id == part_id
    assert status.passed is passed and status.fail is (not passed)
    assert status.error is (code != ErrorCode.OK) and status.error_code == code
    assert not (status.passed and status.error)


def test_trigger_to_result_names_its_part() -> None:
    hs = ready_handshake()
    assert hs.status.trigger_ready
    assert hs.on_command(Command(trigger=False, part_id=7), 0.0) is None
    ticket = hs.on_command(Command(trigger=True, part_id=7), 0.0)
    assert isinstance(ticket, Ticket) and ticket.part_id == 7
    s = hs.status
    assert s.busy and s.trigger_ack and not s.result_valid and not s.trigger_ready
    assert hs.on_command(Command(trigger=True, part_id=8), 0.001) is None  # a level, not an edge
    hs.arm(ticket, 0.002)
    answer = hs.finish(ticket, 0.02, 0.5, 1.1, True, 0, 18.0)
    assert not answer.late and not answer.refused
    assert_answer_of(answer.status, 7, True, ErrorCode.OK)
    assert answer.status.inspection_id == 1 and answer.status.result_toggle and not answer.status.busy
    hs.on_command(Command(trigger=False, part_id=8), 0.03)
    assert hs.status.trigger_ready and not hs.status.trigger_ack
    hs.on_command(Command(result_ack=True), 0.04)
    assert not hs.status.result_valid  # the PLC has read it


def test_ack_held_high_clears_once_and_trigger_held_high_starts_once() -> None:
    hs = ready_handshake()
    t1 = trigger(hs, 1, 0.0)
    assert isinstance(t1, Ticket)
    hs.finish(t1, 0.01, 0.5, 1.1, True, 0, 10.0)
    hs.on_command(Command(result_ack=True), 0.02)
    assert not hs.status.result_valid
    # The PLC keeps result_ack high and triggers again: the next result still shows as valid.
    t2 = hs.on_command(Command(trigger=True, result_ack=True, part_id=2), 0.03)
    assert isinstance(t2, Ticket)
    hs.finish(t2, 0.04, 0.5, 1.1, True, 0, 10.0)
    for now in (0.05, 0.06, 0.07):
        assert hs.on_command(Command(trigger=True, result_ack=True, part_id=2), now) is None
    assert hs.status.result_valid and hs.status.part_id == 2 and hs.status.inspection_id == 2


def test_late_result_is_never_published_and_the_deadline_answers_its_own_part() -> None:
    hs = ready_handshake()
    ticket = trigger(hs, 41, 0.0)
    assert isinstance(ticket, Ticket)
    hs.arm(ticket, 0.01)
    assert hs.expire(0.01 + 0.099) is None
    expired = hs.expire(0.111)
    assert expired is not None and expired.late
    assert_answer_of(expired.status, 41, False, ErrorCode.OVER_BUDGET)
    assert not hs.status.busy and not hs.status.trigger_ready  # the late inspection still runs
    before = hs.status
    late = hs.finish(ticket, 0.3, 0.2, 1.1, True, 0, 290.0)  # a pass, 190 ms too late
    assert late.late and late.status == expired.status
    after = hs.status
    assert after.inspection_id == before.inspection_id and after.result_toggle == before.result_toggle
    assert not after.passed and after.trigger_ready


def test_trigger_during_a_late_inspection_gets_its_own_prompt_answer() -> None:
    hs = ready_handshake()
    stalled = trigger(hs, 100, 0.0)
    assert isinstance(stalled, Ticket)
    hs.arm(stalled, 0.0)
    hs.expire(0.2)  # part 100: fail-safe NG, id 1
    refused = trigger(hs, 101, 0.21)  # the PLC re-triggers at once
    assert isinstance(refused, Answer) and refused.refused
    assert_answer_of(refused.status, 101, False, ErrorCode.LATE_RUNNING)
    assert refused.status.inspection_id == 2 and refused.status.missed_triggers == 1
    assert not refused.status.result_toggle  # flipped twice: NG of 100, answer of 101
    # The stalled inspection finishes: it may not reach part 101's window.
    late = hs.finish(stalled, 0.25, 0.1, 1.1, True, 0, 250.0)
    assert late.late and late.status.part_id == 100
    assert hs.status.part_id == 101 and not hs.status.passed
    nxt = trigger(hs, 102, 0.26)
    assert isinstance(nxt, Ticket)
    hs.arm(nxt, 0.26)
    answer = hs.finish(nxt, 0.27, 0.4, 1.1, True, 0, 10.0)
    assert_answer_of(answer.status, 102, True, ErrorCode.OK)
    assert answer.status.inspection_id == 3


def test_trigger_while_busy_is_answered_at_once_and_the_running_part_keeps_its_window() -> None:
    hs = ready_handshake()
    first = trigger(hs, 1, 0.0)
    assert isinstance(first, Ticket)
    second = trigger(hs, 2, 0.005)  # the PLC ignored trigger_ready = 0
    assert isinstance(second, Answer)
    assert_answer_of(second.status, 2, False, ErrorCode.TRIGGER_OVERRUN)
    assert hs.status.busy  # part 1 is still being inspected
    answer = hs.finish(first, 0.02, 0.3, 1.1, True, 0, 20.0)
    assert_answer_of(answer.status, 1, True, ErrorCode.OK)
    assert [second.status.inspection_id, answer.status.inspection_id] == [1, 2]


@pytest.mark.parametrize(
    "setup,code",
    [
        (lambda hs: None, ErrorCode.DISABLED),
        (lambda hs: hs.set_ready(False, int(ErrorCode.CAMERA_DISCONNECTED)), ErrorCode.CAMERA_DISCONNECTED),
        (lambda hs: hs.set_ready(False), ErrorCode.NOT_READY),
    ],
)
def test_refused_trigger_is_a_result_of_its_own_never_the_previous_pass(setup, code: ErrorCode) -> None:
    hs = ready_handshake()
    good = trigger(hs, 10, 0.0)
    assert isinstance(good, Ticket)
    hs.finish(good, 0.01, 0.2, 1.1, True, 0, 10.0)
    assert hs.status.passed and hs.status.result_valid
    setup(hs)
    refused = trigger(hs, 11, 0.1, enable=code != ErrorCode.DISABLED)
    assert isinstance(refused, Answer) and refused.refused
    assert_answer_of(refused.status, 11, False, code)
    assert refused.status.inspection_id == 2 and not refused.status.result_toggle  # flipped again
    assert refused.status.missed_triggers == 1 and not refused.status.trigger_ready


def test_not_ready_clears_the_standing_pass() -> None:
    hs = ready_handshake()
    t = trigger(hs, 5, 0.0)
    assert isinstance(t, Ticket)
    hs.finish(t, 0.01, 0.2, 1.1, True, 0, 10.0)
    hs.set_ready(False, int(ErrorCode.CAMERA_DISCONNECTED))
    s = hs.status
    assert not s.ready and not s.result_valid and not s.passed and s.error
    hs.set_ready(True)
    assert hs.status.ready and not hs.status.error and hs.status.error_code == 0


def test_enable_off_refuses_hardware_triggered_frames() -> None:
    hs = ready_handshake()
    hs.on_command(Command(enable=False, part_id=77), 0.0)
    assert not hs.status.trigger_ready
    refused = hs.begin(0.1)
    assert isinstance(refused, Answer)
    assert_answer_of(refused.status, 77, False, ErrorCode.DISABLED)
    hs.on_command(Command(enable=True, part_id=78), 0.2)
    ticket = hs.begin(0.3)
    assert isinstance(ticket, Ticket) and ticket.part_id == 78


@pytest.mark.parametrize("mode", ["hardware", "free_run"])
def test_enable_off_stops_inspection_in_stream_modes(mode: str, tmp_path: Path) -> None:
    import cv2

    for i in range(3):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((32, 32, 3), i * 40, np.uint8))
    hs = ready_handshake()
    supervisor = CameraSupervisor(SimulatedCameraConfig(source=tmp_path, fps=200.0), hs, Metrics())
    assert supervisor.ensure_open()
    refused: list[Answer] = []
    dispatcher = Dispatcher(mode, hs, supervisor, queue.Queue(), 1.0, 0.2, on_refused=refused.append)
    try:
        hs.on_command(Command(enable=False, part_id=9), 0.0)
        assert all(dispatcher.next_part() is None for _ in range(3))
        if mode == "hardware":  # each frame is a part: answered NG, code 7, with the PLC's part_id
            assert len(refused) == 3 and all(a.code == ErrorCode.DISABLED and a.part_id == 9 for a in refused)
        else:  # free run: frames are not parts; nothing is inspected or answered
            assert refused == [] and hs.status.inspection_id == 0
        hs.on_command(Command(enable=True, part_id=10), 0.0)
        part = dispatcher.next_part()
        assert part is not None and part.frame is not None and part.ticket.part_id == 10
    finally:
        supervisor.close()


def test_records_failing_after_the_judge_looked_still_fails_the_part() -> None:
    """records.required: the bit and the verdict are decided under one lock (no pass beside records_failing)."""
    hs = ready_handshake(records_required=True)
    ticket = trigger(hs, 5, 0.0)
    assert isinstance(ticket, Ticket)
    hs.arm(ticket, 0.001)
    hs.set_records_failing(True)  # the records thread, between the judge's check and the publish
    answer = hs.finish(ticket, 0.02, 0.5, 1.1, True, 0, 18.0)
    assert_answer_of(answer.status, 5, False, ErrorCode.RECORDS_UNAVAILABLE)
    assert answer.status.records_failing
    hs.set_records_failing(False)
    ticket = trigger(hs, 6, 0.1)
    assert isinstance(ticket, Ticket)
    hs.arm(ticket, 0.101)
    assert_answer_of(hs.finish(ticket, 0.12, 0.5, 1.1, True, 0, 18.0).status, 6, True, ErrorCode.OK)


def test_records_failing_after_a_pass_was_shown_withdraws_the_pass() -> None:
    """records.required: a pass is written to its record after it is shown; when the records then fail, the
    block must not go on showing that pass beside records_failing (an unrecorded result is a fail)."""
    hs = ready_handshake(records_required=True)
    ticket = trigger(hs, 45, 0.0)
    assert isinstance(ticket, Ticket)
    hs.arm(ticket, 0.001)
    shown = hs.finish(ticket, 0.02, 0.5, 1.1, True, 0, 18.0).status
    assert_answer_of(shown, 45, True, ErrorCode.OK)
    hs.set_records_failing(True)  # its record (or the one before) cannot be written
    now = hs.status
    assert now.records_failing and not now.passed and now.fail
    assert now.part_id == 45 and now.inspection_id == shown.inspection_id  # the same part, now NG
    assert now.error_code == ErrorCode.RECORDS_UNAVAILABLE
    hs.set_records_failing(False)  # recovered: the withdrawn pass stays withdrawn
    assert not hs.status.passed and not hs.status.records_failing


def test_finish_after_the_deadline_fails_even_before_the_worker_noticed() -> None:
    hs = ready_handshake()
    t = trigger(hs, 3, 0.0)
    assert isinstance(t, Ticket)
    hs.arm(t, 0.0)
    answer = hs.finish(t, 0.101, 0.2, 1.1, True, 0, 101.0)
    assert answer.late
    assert_answer_of(answer.status, 3, False, ErrorCode.OVER_BUDGET)


@pytest.mark.parametrize("score", [math.nan, math.inf])
def test_non_finite_score_fails_with_code_3(score: float) -> None:
    hs = ready_handshake()
    t = trigger(hs, 4, 0.0)
    assert isinstance(t, Ticket)
    answer = hs.finish(t, 0.01, score, 1.1, True, 0, 10.0)
    assert_answer_of(answer.status, 4, False, ErrorCode.MODEL_ERROR)


def test_a_grab_that_hangs_is_still_answered_by_the_deadline() -> None:
    hs = ready_handshake()  # grab timeout 50 ms + budget 100 ms
    t = trigger(hs, 6, 0.0)
    assert isinstance(t, Ticket)
    assert hs.expire(0.149) is None
    expired = hs.expire(0.151)
    assert expired is not None and expired.status.part_id == 6


def test_heartbeat_counts_only_while_the_loop_is_alive() -> None:
    hs = Handshake()
    for _ in range(65537):
        hs.beat()
    assert hs.status.heartbeat == 1
    hs.beat(loop_alive=False)
    assert hs.status.heartbeat == 1


def test_random_schedules_never_misattribute() -> None:
    """A PLC that re-triggers at once, a loop that sometimes stalls: check every answer.

    Each trigger carries a fresh part_id; the model's verdict of part P is "pass"
    when P is even. Every answer in the block must name a trigger, each trigger
    gets exactly one answer, and pass = 1 only for an even part inspected in time.
    """
    rng = random.Random(1)
    hs = ready_handshake()
    now, part_id = 0.0, 0
    answers: dict[int, Status] = {}  # part_id → the answer the PLC latched
    running: list[tuple[Ticket, float]] = []  # ticket, time the loop will finish it
    last_toggle = hs.status.result_toggle

    def latch() -> None:
        nonlocal last_toggle
        s = hs.status
        if s.result_toggle != last_toggle:
            last_toggle = s.result_toggle
            assert s.part_id not in answers, f"part {s.part_id} answered twice"
            answers[s.part_id] = s

    for _ in range(3000):
        now += rng.choice([0.001, 0.005, 0.02])
        if running and now >= running[0][1]:
            ticket, _ = running.pop(0)
            passed = ticket.part_id % 2 == 0
            hs.finish(ticket, now, 0.5 if passed else 2.0, 1.1, passed, 0, 0.0)
            latch()
        if hs.expire(now) is not None:
            latch()
        if rng.random() < 0.3:
            part_id += 1
            edge = trigger(hs, part_id, now, enable=rng.random() > 0.05)
            latch()
            if isinstance(edge, Ticket):
                hs.arm(edge, now)
                stall = rng.choice([0.01, 0.02, 0.03, 0.25])  # sometimes far past the budget
                running.append((edge, now + stall))
    assert set(answers) <= set(range(1, part_id + 1))
    assert len(answers) >= part_id - 1  # at most the last trigger is still open
    for pid, s in answers.items():
        assert not (s.passed and s.error)
        if s.passed:
            assert pid % 2 == 0 and s.error_code == 0
    assert any(s.error_code == ErrorCode.LATE_RUNNING for s in answers.values())
    assert any(s.error_code == ErrorCode.OVER_BUDGET for s in answers.values())
    assert sum(s.passed for s in answers.values()) > 50
