"""PLC blocks, the handshake state machine, and both links against real servers on loopback."""

from __future__ import annotations

import struct
import threading
import time
from dataclasses import fields
from pathlib import Path

import pytest
from pydantic import ValidationError
from pymodbus.client import ModbusTcpClient

from anomalyd.config import ModbusConfig, ModbusServerConfig, S7Config
from anomalyd.daemon.plc_worker import PlcWorker
from anomalyd.drivers.plc.base import PlcError, bytes_from_words
from anomalyd.drivers.plc.handshake import ErrorCode, Handshake
from anomalyd.drivers.plc.layout import (
    Command,
    CommandLayout,
    Status,
    StatusLayout,
    pack_status,
    unpack_status,
)
from anomalyd.drivers.plc.modbus import ModbusLink, ModbusServerLink
from anomalyd.drivers.plc.s7 import S7Link
from anomalyd.drivers.plc.sim import SimulatedPlc
from tests.conftest import free_port

FULL = Status(
    ready=True,
    busy=False,
    result_valid=True,
    passed=False,
    fail=True,
    error=True,
    trigger_ack=True,
    result_toggle=True,
    heartbeat=65535,
    inspection_id=4_000_000_001,
    score=1.25,
    threshold=1.5,
    error_code=2,
    latency_ms=42.5,
)


# ------------------------------------------------------------------ layout
def test_default_block_is_the_documented_one() -> None:
    raw = pack_status(FULL, StatusLayout())
    assert len(raw) == 22
    assert raw[0] == 0b11110101  # ready, result_valid, fail, error, trigger_ack, toggle
    assert struct.unpack(">H", raw[2:4])[0] == 65535
    assert struct.unpack(">I", raw[4:8])[0] == 4_000_000_001
    assert struct.unpack(">f", raw[8:12])[0] == 1.25
    assert struct.unpack(">f", raw[12:16])[0] == 1.5
    assert struct.unpack(">H", raw[16:18])[0] == 2
    assert struct.unpack(">f", raw[18:22])[0] == 42.5


@pytest.mark.parametrize("order", ["big", "little"])
def test_every_field_round_trips(order: str) -> None:
    assert unpack_status(pack_status(FULL, StatusLayout(), order), StatusLayout(), order) == FULL
    for f in fields(Status):
        value = getattr(FULL, f.name)
        single = Status(**{f.name: value})
        assert (
            getattr(unpack_status(pack_status(single, StatusLayout(), order), StatusLayout(), order), f.name) == value
        )


def test_layout_validation() -> None:
    # pydantic reports the LayoutError raised by the validator as a ValidationError.
    with pytest.raises(ValidationError, match="inspection_id overlaps heartbeat at byte 4"):
        StatusLayout(heartbeat=4)
    with pytest.raises(ValidationError, match="even byte"):
        StatusLayout(score=9)
    with pytest.raises(ValidationError, match=r"BYTE\.BIT"):
        CommandLayout(trigger="3")
    moved = StatusLayout(latency_ms=40)
    assert moved.size() == 44


# ------------------------------------------------------------------ handshake
def test_handshake_trigger_to_result() -> None:
    hs = Handshake(threshold=1.1)
    hs.set_ready(True)
    assert not hs.on_command(Command(trigger=False, enable=True))
    assert hs.on_command(Command(trigger=True, enable=True))  # rising edge
    s = hs.status
    assert s.busy and s.trigger_ack and not s.result_valid
    assert not hs.on_command(Command(trigger=True, enable=True))  # level, not edge
    done = hs.finish(0.5, 1.1, True, 0, 12.0)
    assert done is not None and done.inspection_id == 1 and done.result_valid and done.result_toggle
    assert done.passed and not done.fail and not done.busy
    hs.on_command(Command(trigger=False, enable=True))
    assert not hs.status.trigger_ack and hs.status.result_valid
    hs.on_command(Command(result_ack=True, enable=True))
    assert not hs.status.result_valid  # PLC has read it
    hs.on_command(Command(trigger=True, enable=True))
    second = hs.finish(2.0, 1.1, False, 0, 12.0)
    assert second is not None and second.inspection_id == 2 and not second.result_toggle and second.fail


def test_handshake_refuses_triggers_when_disabled_busy_or_not_ready() -> None:
    hs = Handshake()
    assert not hs.on_command(Command(trigger=True, enable=True))  # not ready
    hs.on_command(Command())
    hs.set_ready(True)
    assert not hs.on_command(Command(trigger=True, enable=False))
    assert hs.status.error_code == ErrorCode.DISABLED
    hs.on_command(Command(enable=True))
    assert hs.on_command(Command(trigger=True, enable=True))
    hs.on_command(Command(enable=True))
    assert not hs.on_command(Command(trigger=True, enable=True))  # still busy
    assert hs.status.error_code == ErrorCode.TRIGGER_OVERRUN


def test_deadline_publishes_fail_safe_and_drops_the_late_result() -> None:
    hs = Handshake(threshold=1.0)
    hs.set_ready(True)
    hs.on_command(Command(trigger=True, enable=True))
    hs.arm(deadline=10.0)
    assert hs.expire(now=9.9, budget_ms=100) is None
    expired = hs.expire(now=10.0, budget_ms=100)
    assert expired is not None and expired.fail and expired.error_code == ErrorCode.OVER_BUDGET
    assert hs.finish(0.1, 1.0, True, 0, 150.0) is None  # never a late pass
    assert hs.status.inspection_id == 1


def test_heartbeat_wraps_and_ready_clears_standing_fault() -> None:
    hs = Handshake()
    for _ in range(65537):
        hs.beat()
    assert hs.status.heartbeat == 1
    hs.set_ready(False, int(ErrorCode.CAMERA_DISCONNECTED))
    assert hs.status.error and hs.status.error_code == ErrorCode.CAMERA_DISCONNECTED
    hs.set_ready(True)
    assert hs.status.ready and not hs.status.error and hs.status.error_code == 0


# ------------------------------------------------------------------ S7
@pytest.fixture
def s7_plc() -> SimulatedPlc:
    plc = SimulatedPlc("s7", port=free_port())
    plc.start()
    yield plc
    plc.stop()


def test_s7_fields_round_trip_through_a_real_server(s7_plc: SimulatedPlc) -> None:
    link = S7Link(S7Config(port=s7_plc.port))
    link.open()
    link.write_status(FULL)
    assert s7_plc.read_status() == FULL
    s7_plc.set_command(trigger=True, result_ack=False, enable=True)
    assert link.read_command() == Command(trigger=True, result_ack=False, enable=True)
    link.close()


def test_s7_missing_and_short_db_are_clear_errors() -> None:
    import snap7
    from snap7.type import SrvArea

    port = free_port()
    server = snap7.server.Server(log=False)
    server.register_area(SrvArea.DB, 100, bytearray(10))  # status block needs 22 bytes
    server.start_to("127.0.0.1", port)
    try:
        with pytest.raises(PlcError, match=r"DB100 \(status block\) is too small.*22 bytes"):
            S7Link(S7Config(port=port)).open()
        with pytest.raises(PlcError, match=r"DB7 \(status block\) does not exist"):
            S7Link(S7Config(port=port, status_db=7)).open()
    finally:
        server.stop()


def _worker(link: object, handshake: Handshake) -> PlcWorker:
    return PlcWorker(link, handshake, heartbeat_s=0.1, poll_s=0.005, budget_ms=100, reconnect_max_s=0.2)  # type: ignore[arg-type]


def test_s7_full_handshake_with_worker(s7_plc: SimulatedPlc) -> None:
    hs = Handshake(threshold=1.2)
    worker = _worker(S7Link(S7Config(port=s7_plc.port)), hs)
    worker.start()
    hs.set_ready(True)
    try:
        assert s7_plc.wait_for(lambda s: s.ready, 5.0)

        def daemon_side() -> None:
            worker.triggers.get(timeout=5.0)
            hs.arm(time.monotonic() + 1.0)
            hs.finish(0.7, 1.2, True, 0, 20.0)
            worker.wake()

        thread = threading.Thread(target=daemon_side)
        thread.start()
        result = s7_plc.inspect_once(timeout_s=5.0)
        thread.join()
        assert result is not None
        s = result.status
        assert s.inspection_id == 1 and s.passed and s.score == pytest.approx(0.7) and s.threshold == pytest.approx(1.2)
        assert s7_plc.wait_for(lambda st: not st.result_valid, 2.0)  # result_ack honoured
        beat = s7_plc.read_status().heartbeat
        assert s7_plc.wait_for(lambda st: st.heartbeat >= beat + 2, 2.0)  # beats while idle
    finally:
        worker.stop()


@pytest.mark.parametrize(
    "protocol,link",
    [
        ("s7", lambda port: S7Link(S7Config(port=port, timeout_s=0.5))),
        ("modbus", lambda port: ModbusLink(ModbusConfig(port=port, timeout_s=0.3))),
    ],
)
def test_plc_restart_is_recovered_and_block_rewritten(protocol: str, link: object) -> None:
    port = free_port()
    plc = SimulatedPlc(protocol, port=port)
    plc.start()
    hs = Handshake(threshold=1.0, inspection_id=41)
    hs.set_ready(True)
    worker = _worker(link(port), hs)  # type: ignore[operator]
    worker.start()
    try:
        assert plc.wait_for(lambda s: s.ready and s.inspection_id == 41, 5.0)
        plc.stop()
        deadline = time.monotonic() + 3.0
        while worker.connected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not worker.connected  # noticed within a few heartbeat periods
        fresh = SimulatedPlc(protocol, port=port)  # a restarted PLC: its blocks are zeroed
        fresh.start()
        try:
            status = fresh.wait_for(lambda s: s.ready and s.inspection_id == 41, 5.0)
            assert status is not None  # the whole block was rewritten after reconnecting
            assert worker.reconnect_times_s and worker.reconnect_times_s[-1] < 5.0
        finally:
            fresh.stop()
    finally:
        worker.stop()


# ------------------------------------------------------------------ Modbus
@pytest.mark.parametrize("order", ["big", "little"])
def test_modbus_client_word_orders(order: str) -> None:
    port = free_port()
    plc = SimulatedPlc("modbus", port=port, word_order=order)
    plc.start()
    try:
        link = ModbusLink(ModbusConfig(port=port, word_order=order))
        link.open()
        link.write_status(FULL)
        assert plc.read_status() == FULL
        words = plc._server.read(0, 11)  # type: ignore[attr-defined]
        raw = bytes_from_words(words)
        id_words = raw[4:8] if order == "big" else raw[6:8] + raw[4:6]
        assert struct.unpack(">I", id_words)[0] == FULL.inspection_id
        plc.set_command(trigger=True, enable=True)
        assert link.read_command().trigger
        link.close()
    finally:
        plc.stop()


def test_modbus_server_mode_polled_by_a_plc_client() -> None:
    port = free_port()
    link = ModbusServerLink(ModbusServerConfig(port=port))
    link.open()
    client = ModbusTcpClient("127.0.0.1", port=port)
    try:
        assert client.connect()
        link.write_status(FULL)
        reply = client.read_holding_registers(0, count=11, device_id=1)
        assert unpack_status(bytes_from_words(reply.registers), StatusLayout()) == FULL
        # The PLC sets trigger (byte 0 bit 0 = register 100 bit 8) and enable (bit 10).
        assert not client.write_registers(100, [0x0500], device_id=1).isError()
        assert link.read_command() == Command(trigger=True, result_ack=False, enable=True)
        # The status registers are ours: a PLC write there is refused.
        assert client.write_registers(0, [0xFFFF], device_id=1).isError()
    finally:
        client.close()
        link.close()


def test_plc_layout_cli_writes_scl_and_register_map(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import ANOMALYD

    out = subprocess.run(
        [*ANOMALYD, "plc-layout", "--out", str(tmp_path / "s7")], capture_output=True, text=True, check=True
    )
    assert "| 4 | UDINT | inspection_id |" in out.stdout
    scl = (tmp_path / "s7" / "anomalyd_blocks.scl").read_text()
    assert 'TYPE "anomalyd_Status"' in scl and "inspection_id : UDInt;" in scl
    assert "S7_Optimized_Access := 'FALSE'" in scl
    config = tmp_path / "mb.yaml"
    config.write_text("plc:\n  type: modbus\n  word_order: little\n")
    subprocess.run(
        [*ANOMALYD, "plc-layout", "--config", str(config), "--out", str(tmp_path / "mb")],
        check=True,
        capture_output=True,
    )
    csv = (tmp_path / "mb" / "modbus_registers.csv").read_text()
    assert 'status,2,2..3,UDINT,"32 bit, low word first",inspection_id' in csv
    assert "command,100,bit 8,BOOL,1 bit,trigger" in csv
