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

from anomalyd.daemon.handshake import Handshake
from anomalyd.daemon.plc_worker import PlcWorker
from anomalyd.drivers.plc.base import PlcError, bytes_from_words
from anomalyd.drivers.plc.layout import (
    Command,
    CommandLayout,
    Status,
    StatusLayout,
    pack_command,
    pack_status,
    unpack_command,
    unpack_status,
)
from anomalyd.drivers.plc.modbus import ModbusConfig, ModbusLink, ModbusServerConfig, ModbusServerLink
from anomalyd.drivers.plc.s7 import S7Config, S7Link
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
    trigger_ready=True,
    part_id=4_000_000_007,
    missed_triggers=70_000,
    recipe=65_535,
    recipe_changing=True,
)


# ------------------------------------------------------------------ layout
def test_default_block_is_the_documented_one() -> None:
    raw = pack_status(FULL, StatusLayout())
    assert len(raw) == 34
    assert raw[0] == 0b11110101  # ready, result_valid, fail, error, trigger_ack, toggle
    assert struct.unpack(">H", raw[2:4])[0] == 65535
    assert struct.unpack(">I", raw[4:8])[0] == 4_000_000_001
    assert struct.unpack(">f", raw[8:12])[0] == 1.25
    assert struct.unpack(">f", raw[12:16])[0] == 1.5
    assert struct.unpack(">H", raw[16:18])[0] == 2
    assert struct.unpack(">f", raw[18:22])[0] == 42.5
    # Appended in the second version; the offsets above kept their meaning.
    assert raw[22] == 0b101  # trigger_ready, recipe_changing
    assert struct.unpack(">I", raw[24:28])[0] == 4_000_000_007
    assert struct.unpack(">I", raw[28:32])[0] == 70_000
    assert struct.unpack(">H", raw[32:34])[0] == 65_535


@pytest.mark.parametrize("order", ["big", "little"])
def test_command_block_carries_the_part_id(order: str) -> None:
    command = Command(trigger=True, result_ack=False, enable=True, part_id=3_000_000_123, recipe_request=7)
    raw = pack_command(command, CommandLayout(), order)
    assert len(raw) == 8 and raw[0] == 0b101 and raw[6:8] == b"\x00\x07"
    assert unpack_command(raw, CommandLayout(), order) == command


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
    moved = StatusLayout(missed_triggers=40)
    assert moved.size() == 44


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
    server.register_area(SrvArea.DB, 100, bytearray(10))  # status block needs 34 bytes
    server.start_to("127.0.0.1", port)
    try:
        with pytest.raises(PlcError, match=r"DB100 \(status block\) is too small.*34 bytes"):
            S7Link(S7Config(port=port)).open()
        with pytest.raises(PlcError, match=r"DB7 \(status block\) does not exist"):
            S7Link(S7Config(port=port, status_db=7)).open()
    finally:
        server.stop()


def _worker(link: object, handshake: Handshake) -> PlcWorker:
    return PlcWorker(link, handshake, heartbeat_s=0.1, poll_s=0.005, reconnect_max_s=0.2)  # type: ignore[arg-type]


def test_s7_full_handshake_with_worker(s7_plc: SimulatedPlc) -> None:
    hs = Handshake(threshold=1.2)
    worker = _worker(S7Link(S7Config(port=s7_plc.port)), hs)
    worker.start()
    hs.set_ready(True)
    try:
        assert s7_plc.wait_for(lambda s: s.ready, 5.0)

        def daemon_side() -> None:
            ticket = worker.triggers.get(timeout=5.0)
            hs.arm(ticket, time.monotonic())
            hs.finish(ticket, time.monotonic(), 0.7, 1.2, True, 0, 20.0)
            worker.wake()

        thread = threading.Thread(target=daemon_side)
        thread.start()
        result = s7_plc.inspect_once(timeout_s=5.0)
        thread.join()
        assert result is not None and result.attributed
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
        reply = client.read_holding_registers(0, count=17, device_id=1)
        assert unpack_status(bytes_from_words(reply.registers), StatusLayout()) == FULL
        # The PLC sets trigger (byte 0 bit 0 = register 100 bit 8) and enable (bit 10).
        # part_id 70000 = 0x00011170 in registers 101 (high word) and 102 (low word).
        assert not client.write_registers(100, [0x0500, 0x0001, 0x1170], device_id=1).isError()
        assert link.read_command() == Command(trigger=True, result_ack=False, enable=True, part_id=70_000)
        # The status registers are ours: a PLC write there is refused.
        assert client.write_registers(0, [0xFFFF], device_id=1).isError()
    finally:
        client.close()
        link.close()


@pytest.mark.e2e
def test_plc_layout_cli_writes_scl_and_register_map(tmp_path: Path) -> None:
    import subprocess

    from tests.conftest import ANOMALYD

    out = subprocess.run(
        [*ANOMALYD, "plc-layout", "--out", str(tmp_path / "s7")], capture_output=True, text=True, check=True
    )
    assert "| 4 | UDINT | inspection_id |" in out.stdout
    scl = (tmp_path / "s7" / "anomalyd_blocks.scl").read_text()
    assert 'TYPE "anomalyd_Status"' in scl and "inspection_id : UDInt;" in scl
    # The appended fields, after today's: byte 22 bit 0, then a spare byte, part_id at 24.
    assert "trigger_ready : Bool;   // 22.0" in scl and "part_id : UDInt;" in scl
    assert scl.index("latency_ms : Real;") < scl.index("trigger_ready : Bool;") < scl.index("missed_triggers : UDInt;")
    assert "S7_Optimized_Access := 'FALSE'" in scl
    config = tmp_path / "mb.yaml"
    config.write_text("plc:\n  type: modbus\n  word_order: little\n")
    subprocess.run(
        [*ANOMALYD, "plc-layout", "--config", str(config), "--out", str(tmp_path / "mb")],
        check=True,
        capture_output=True,
    )
    csv = (tmp_path / "mb" / "modbus_registers.csv").read_text()
    assert csv.startswith("block,register,4xxxx,registers,bit,mask,type,word_order,name,meaning\n")
    assert "status,2,40003,2,,,UDINT,low word first,inspection_id," in csv
    assert "command,100,40101,1,8,16#0100,BOOL,,trigger," in csv
    assert "command,100,40101,1,9,16#0200,BOOL,,result_ack," in csv
    assert "command,100,40101,1,10,16#0400,BOOL,,enable," in csv
    assert "command,101,40102,2,,,UDINT,low word first,part_id," in csv
    md = (tmp_path / "mb" / "modbus_registers.md").read_text()
    assert "unit id 1" in md and "FC16" in md and "FC03" in md and "0-based" in md
    assert "odd registers: latency_ms (register 9), part_id (register 101)" in md and "align_32bit" in md


def test_readme_tables_are_the_code() -> None:
    """The PLC guide's block and error tables are what the daemon writes (no drift)."""
    from anomalyd.daemon.handshake import ERROR_MEANINGS
    from anomalyd.drivers.plc import export

    readme = (Path(__file__).resolve().parents[1] / "docs" / "plc.md").read_text(encoding="utf-8")
    for layout in (StatusLayout(), CommandLayout()):
        for row in export.table(layout, "x").splitlines()[4:]:
            assert row in readme, f"docs/plc.md lacks the row {row}"
    for code, meaning in ERROR_MEANINGS.items():
        assert f"| {int(code)} | {meaning} |" in readme
    from anomalyd.drivers.plc.opcua import node_table

    for r in node_table():
        assert f"| `{r['node']}` | {r['type']} | {r['access']} | {r['meaning']} |" in readme


def _s7_offsets(scl: str, db_name: str) -> dict[str, str]:
    """Where TIA Portal puts each member of a non-optimised DB: Bools pack into bits of a byte,
    Byte takes one byte, numbers and structures start on an even byte."""
    import re

    udts: dict[str, list[tuple[str, str]]] = {}
    for name, body in re.findall(r'TYPE "(\w+)"\nVERSION : 0.1\n   STRUCT\n(.*?)   END_STRUCT;', scl, re.S):
        udts[name] = re.findall(r"^\s+(\w+) : ([^;]+);", body, re.M)
    db = re.search(rf'DATA_BLOCK "{db_name}".*?STRUCT\n(.*?)   END_STRUCT;', scl, re.S)
    assert db is not None
    members = re.findall(r"^\s+(\w+) : ([^;]+);", db.group(1), re.M)
    offsets: dict[str, str] = {}
    pos = [0, 0]  # byte, bit

    def align() -> None:
        if pos[1]:
            pos[0], pos[1] = pos[0] + 1, 0
        pos[0] += pos[0] % 2

    def place(prefix: str, items: list[tuple[str, str]]) -> None:
        for name, kind in items:
            if kind == "Bool":
                offsets[prefix + name] = f"{pos[0]}.{pos[1]}"
                pos[0], pos[1] = (pos[0], pos[1] + 1) if pos[1] < 7 else (pos[0] + 1, 0)
                continue
            if pos[1]:
                pos[0], pos[1] = pos[0] + 1, 0
            if kind == "Byte":
                pos[0] += 1
            elif (m := re.match(r"Array\[0\.\.(\d+)\] of Byte", kind)) is not None:
                align()
                pos[0] += int(m.group(1)) + 1
            elif kind.strip('"') in udts:
                align()
                place(prefix + name + ".", udts[kind.strip('"')])
                align()
            else:
                align()
                offsets[prefix + name] = str(pos[0])
                pos[0] += {"UInt": 2, "UDInt": 4, "Real": 4}[kind]

    place("", members)
    return offsets


def test_scl_honours_every_offset_of_the_yaml() -> None:
    from anomalyd.drivers.plc import export

    status = StatusLayout(heartbeat=34, part_id=40, ready="37.2")  # moved fields
    scl = export.scl_source(status, CommandLayout(), 5, 5, status_start=8, command_start=60)
    offsets = _s7_offsets(scl, "anomalyd_DB5")
    for name, _kind, byte, bit in status.cells():
        expected = f"{byte + 8}.{bit}" if bit >= 0 else str(byte + 8)
        assert offsets[f"status.{name}"] == expected, name
    for name, _kind, byte, bit in CommandLayout().cells():
        expected = f"{byte + 60}.{bit}" if bit >= 0 else str(byte + 60)
        assert offsets[f"command.{name}"] == expected, name


def test_blocks_that_overlap_in_one_db_or_register_space_are_refused() -> None:
    with pytest.raises(ValidationError, match="overlaps the command block"):
        S7Config(status_db=9, command_db=9, command_start=20)
    S7Config(status_db=9, command_db=9, command_start=34)  # right after the 34-byte status block
    with pytest.raises(ValidationError, match="overlap the command registers"):
        ModbusConfig(status_register=90, command_register=100)


def test_align_32bit_lays_every_32bit_value_at_an_even_register_or_says_which_is_not() -> None:
    from anomalyd.config_loader import ConfigError, parse_config
    from anomalyd.drivers.plc.layout import misaligned_32bit

    aligned = parse_config("plc:\n  type: modbus-server\n  align_32bit: true\n").plc
    assert misaligned_32bit(aligned.status_layout, 0) == [] and misaligned_32bit(aligned.command_layout, 100) == []  # type: ignore[union-attr]
    # The default layout keeps the first version's offsets; its one odd 32-bit status value is latency_ms.
    assert misaligned_32bit(StatusLayout(), 0) == ["latency_ms (register 9)"]
    with pytest.raises(ConfigError, match=r"align_32bit: 32-bit values at odd registers: inspection_id \(register 3\)"):
        parse_config("plc:\n  type: modbus\n  align_32bit: true\n  status_register: 1\n")
    with pytest.raises(ConfigError, match=r"part_id \(register 101\)"):
        parse_config("plc:\n  type: modbus\n  align_32bit: true\n  command_layout: {part_id: 2, recipe_request: 6}\n")
