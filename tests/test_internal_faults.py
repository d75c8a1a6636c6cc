"""Faults from inside: each answered once, no dead thread left silent, no late score published.

In-process with the real parts where that is enough (the judge, the handshake,
the PLC worker over a real Modbus server, the reload), the real daemon where
the PLC must see it, and a raw socket for the Modbus exception replies.
"""

from __future__ import annotations

import json
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from anomalyd.config import AppConfig
from anomalyd.daemon.handshake import ErrorCode, Handshake, Ticket
from anomalyd.daemon.plc_worker import PlcWorker
from anomalyd.daemon.reloader import reload_config
from anomalyd.decision import decide, fails
from anomalyd.drivers.plc.layout import Command
from anomalyd.drivers.plc.modbus import ModbusServerConfig, ModbusServerLink, RegisterServer
from anomalyd.ports import free_port
from tests.harness import stop, wait_until
from tests.test_judge import _part, _rows, _station


def test_a_fault_after_the_answer_never_answers_the_part_again(
    bundle_dir: Path, sample_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hs, camera, recorder, judge = _station(bundle_dir, sample_dir, tmp_path, image_threshold=100.0)
    real_add, calls = recorder.add, {"n": 0}

    def add_failing_once(outcome):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("the recorder failed")
        real_add(outcome)

    monkeypatch.setattr(recorder, "add", add_failing_once)
    try:
        hs.set_ready(True)
        first = judge.judge(_part(hs, camera, 1))  # before: HandshakeError "no open window 1" and the daemon exits
        assert first is not None and first.code == ErrorCode.OK and first.part_id == 1
        assert hs.status.inspection_id == 1  # one answer, not a second "code 8" one
        second = judge.judge(_part(hs, camera, 2))
        assert second is not None and second.status.inspection_id == 2 and second.part_id == 2
    finally:
        recorder.close()
        camera.close()
    assert _rows(tmp_path) == [(2, 2, "OK", 0)]


def test_a_late_result_never_publishes_its_score_or_latency() -> None:
    hs = Handshake(1.0, budget_ms=100, grab_timeout_ms=100)
    hs.set_ready(True)
    ticket = hs.on_command(Command(trigger=True, part_id=5), 0.0)
    assert isinstance(ticket, Ticket)
    hs.arm(ticket, 0.0)
    # The model finishes after the deadline, before the deadline timer has fired.
    answer = hs.finish(ticket, 0.15, 0.4, 1.0, True, 0, 150.0)
    s = answer.status
    assert answer.late and s.error_code == ErrorCode.OVER_BUDGET and s.fail and not s.passed
    assert s.score == 0.0 and s.latency_ms == pytest.approx(100.0) and s.part_id == 5  # the deadline's values


def test_an_unknown_recipe_is_answered_at_once_under_the_interlock() -> None:
    hs = Handshake(1.0)
    hs.set_recipes(1, {1}, {1})
    hs.set_ready(True)
    hs.on_command(Command(recipe_request=9), 0.0)
    s = hs.status
    assert s.trigger_ready and not s.recipe_changing  # a PLC that waits for trigger_ready triggers
    answer = hs.on_command(Command(trigger=True, part_id=3, recipe_request=9), 0.01)
    assert answer is not None and not isinstance(answer, Ticket)
    assert answer.status.error_code == ErrorCode.RECIPE_UNAVAILABLE and answer.status.part_id == 3
    hs.set_recipes(1, {1, 2}, {1})  # recipe 2 configured, still loading: wait for it
    hs.on_command(Command(recipe_request=2), 0.02)
    assert not hs.status.trigger_ready and hs.status.recipe_changing


def test_the_final_block_keeps_the_last_answers_error() -> None:
    hs = Handshake(1.0)
    hs.set_ready(True)
    answer = hs.on_command(Command(trigger=True, enable=False, part_id=8), 0.0)
    assert answer is not None and answer.status.error_code == ErrorCode.DISABLED  # type: ignore[union-attr]
    hs.stopping()
    s = hs.status
    assert not s.ready and not s.trigger_ready and not s.passed
    assert s.error and s.error_code == ErrorCode.DISABLED and s.part_id == 8


def test_the_plc_worker_survives_a_fault_it_did_not_foresee() -> None:
    """A driver that raises something other than PlcDisconnected: logged, the link reopened, the PLC served."""
    config = ModbusServerConfig(port=free_port(), max_clients=4)
    link = ModbusServerLink(config)
    real_read, calls = link.read_command, {"n": 0}

    def flaky_read() -> Command:
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("a driver bug")
        return real_read()

    link.read_command = flaky_read  # type: ignore[method-assign]
    hs = Handshake(1.0)
    hs.set_ready(True)
    refused = []
    worker = PlcWorker(link, hs, heartbeat_s=0.05, poll_s=0.01, reconnect_max_s=0.2, on_refused=refused.append)
    worker.start()
    try:
        wait_until(lambda: calls["n"] > 10, what="the worker polls again after the fault")
        assert worker.alive and worker.connected
        beat = hs.status.heartbeat
        wait_until(lambda: hs.status.heartbeat > beat + 2, what="heartbeats")
    finally:
        worker.stop()


def test_server_modes_report_no_plc_until_a_client_reads(tmp_path: Path) -> None:
    config = ModbusServerConfig(port=free_port())
    link = ModbusServerLink(config)
    hs = Handshake(1.0)
    states: list[bool] = []
    worker = PlcWorker(link, hs, heartbeat_s=0.05, poll_s=0.01, reconnect_max_s=0.2, on_connection=states.append)
    worker.start()
    try:
        wait_until(lambda: worker.connected, what="serving")
        time.sleep(0.2)
        assert not worker.up and states == []  # serving, but no PLC
        s = socket.create_connection(("127.0.0.1", config.port), timeout=2)
        s.sendall(struct.pack(">HHHBBHH", 1, 0, 6, 1, 3, config.status_register, 2))
        assert s.recv(64)[7] == 3
        wait_until(lambda: states == [True], what="a client reading")
        s.close()
        wait_until(lambda: states == [True, False], timeout=5, what="no client reading for 10 heartbeats")
    finally:
        worker.stop()


def test_a_reload_is_validated_as_a_whole(e2e_bundle: Path, tmp_path: Path) -> None:
    path = tmp_path / "a.yaml"
    base = (
        "camera: {type: simulated}\nplc: {type: none}\ndaemon: {trigger: free_run}\n"
        f"model: {{bundle: {e2e_bundle}, default_recipe: 2}}\n"
    )
    path.write_text(base + f"recipes:\n  2: {{bundle: {e2e_bundle}}}\n  3: {{bundle: {e2e_bundle}}}\n")
    from anomalyd.config_loader import load_config

    current = load_config(path)
    path.write_text(base + f"recipes:\n  3: {{bundle: {e2e_bundle}}}\n")  # the default recipe removed
    result = reload_config(path, current, frozenset({"camera", "plc", "daemon", "model", "recipes"}))
    assert not result.applied and set(result.config.recipes) == {2, 3}  # nothing changed
    path.write_text(base + "recipes: [unclosed\n")  # not even YAML
    result = reload_config(path, current, frozenset())
    assert not result.applied and result.config is current


def test_one_decision_fails_a_nan_everywhere() -> None:
    from anomalyd.config import ThresholdsConfig

    nan = float("nan")
    assert fails(nan, 1.0) and fails(1.0, 1.0) and not fails(0.99, 1.0)
    verdict = decide(nan, None, 0, ThresholdsConfig(), 1.0)
    assert verdict.label == "NG" and not verdict.finite


def test_modbus_exception_replies_follow_the_specification() -> None:
    server = RegisterServer("127.0.0.1", free_port(), 64, range(0, 16))
    server.start()
    try:

        def ask(pdu: bytes) -> bytes:
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as s:
                s.sendall(struct.pack(">HHHB", 7, 0, len(pdu) + 1, 1) + pdu)
                reply = s.recv(64)
                s.sendall(struct.pack(">HHHBBHH", 8, 0, 6, 1, 3, 0, 2))  # the connection still serves
                assert s.recv(64)[7] == 3
                return reply

        assert ask(struct.pack(">BHH", 3, 0, 0))[7:] == bytes([0x83, 0x03])  # quantity 0
        assert ask(struct.pack(">BHH", 3, 0, 126))[7:] == bytes([0x83, 0x03])  # quantity 126
        assert ask(bytes([0x55, 0, 0]))[7:] == bytes([0xD5, 0x01])  # unknown function
        reply = ask(struct.pack(">BHH", 3, 0, 2))
        assert reply[:2] == struct.pack(">H", 7) and reply[7] == 3 and reply[8] == 4
    finally:
        server.stop()


def test_json_logs_are_json_lines_only(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    res = r.plc.inspect_once(10.0)
    assert res is not None and res.attributed
    status = urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/healthz", timeout=5)
    health = json.loads(status.read())
    assert health["healthy"] and health["workers_dead"] == [] and health["plc"]
    assert stop(r) == 0
    lines = (r.config.parent / "daemon.log").read_text().splitlines()
    bad = [line for line in lines if line.strip() and not line.startswith("{")]
    assert not bad, bad[:5]
    for line in lines:
        json.loads(line)


def test_a_daemon_whose_plc_is_down_is_not_healthy(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir)
    r.plc.stop()

    def health() -> dict[str, object]:
        try:
            return json.loads(urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/healthz", timeout=5).read())
        except urllib.error.HTTPError as exc:
            return json.loads(exc.read())

    def plc_down() -> dict[str, object] | None:
        h = health()
        return None if h["plc"] else h

    state = wait_until(plc_down, what="the PLC seen down")
    assert state["healthy"] is False
    body = urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5).read().decode()
    assert "anomalyd_plc_reconnects_total 0.0" in body  # the first connect is not a re-connection


def test_the_config_rules_hold_for_the_merged_whole() -> None:
    with pytest.raises(ValueError):
        AppConfig.model_validate({"model": {"default_recipe": 3}})
