"""Modbus TCP with pymodbus 3.x: as a client of the PLC, or serving registers the PLC polls.

The status block occupies holding registers from ``status_register`` (byte 2k of
the block is the high byte of register k); the command block those from
``command_register``. 32-bit values follow ``word_order``.
"""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from anomalyd.drivers.plc.base import (
    PlcBlocks,
    PlcDisconnected,
    PlcError,
    bytes_from_words,
    client_timeout_setting,
    register_plc,
    words_from_bytes,
)
from anomalyd.drivers.plc.layout import (
    Command,
    CommandLayout,
    Status,
    StatusLayout,
    misaligned_32bit,
    pack_status,
    unpack_command,
    unpack_status,
)
from anomalyd.settings import ranges_overlap, refuse_keys, setting


class ModbusConfig(PlcBlocks):
    type: Literal["modbus"] = "modbus"
    host: str = setting("127.0.0.1", "Server address", "IP address of the Modbus TCP server (the PLC).")
    port: int = setting(502, "TCP port", "Modbus TCP port.", ge=1, le=65535)
    unit: int = setting(1, "Unit id", "Modbus unit/device id.", ge=0, le=255)
    status_register: int = setting(0, "Status register", "First holding register of the status block.", ge=0, le=65000)
    command_register: int = setting(
        100, "Command register", "First holding register of the command block.", ge=0, le=65000
    )
    word_order: Literal["big", "little"] = setting(
        "big", "Word order", "Order of the two registers of a 32-bit value (big: high word first)."
    )
    align_32bit: bool = setting(
        False,
        "Align 32-bit values",
        "Every 32-bit value at an even register (PLCs such as Modicon need it): the aligned default layouts "
        "(latency_ms at register 18, command part_id at register 2); layouts given here are checked instead.",
    )

    @model_validator(mode="before")
    @classmethod
    def _aligned_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("align_32bit") is True:
            data = dict(data)
            data.setdefault("status_layout", StatusLayout.aligned())
            data.setdefault("command_layout", CommandLayout.aligned())
        return data

    def misaligned_32bit(self) -> list[str]:
        """Both blocks' 32-bit values that start at an odd register: 'name (register N)'."""
        return misaligned_32bit(self.status_layout, self.status_register) + misaligned_32bit(
            self.command_layout, self.command_register
        )

    @model_validator(mode="after")
    def _blocks_apart(self) -> ModbusConfig:
        if self.align_32bit:
            odd = self.misaligned_32bit()
            if odd:
                raise ValueError(
                    "align_32bit: 32-bit values at odd registers: " + ", ".join(odd) + "; put them at byte offsets "
                    "divisible by 4 and start the blocks at even registers"
                )
        status = (self.status_register, self.status_register + self.status_layout.size() // 2)
        command = (self.command_register, self.command_register + self.command_layout.size() // 2)
        if ranges_overlap(status, command):
            raise ValueError(
                f"status registers {status[0]}..{status[1] - 1} overlap the command registers "
                f"{command[0]}..{command[1] - 1}; move status_register or command_register"
            )
        if max(status[1], command[1]) > 65536:
            raise ValueError("the blocks must end at or before register 65535")
        return self


class ModbusServerConfig(ModbusConfig):
    type: Literal["modbus-server"] = "modbus-server"  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _unused(cls, data: Any) -> Any:
        return refuse_keys(
            data,
            {
                "unit": "a modbus-server answers requests for any unit id",
                "timeout_s": "a modbus-server waits for no one (a silent client is dropped after idle_timeout_s)",
            },
        )

    host: str = setting("127.0.0.1", "Listen address", "Address the daemon serves registers on.")
    port: int = setting(5020, "TCP port", "Port the daemon serves registers on.", ge=1, le=65535)
    max_clients: int = setting(
        4, "Most clients", "Connections served at once; more are refused (a PLC needs one).", ge=1, le=64
    )
    idle_timeout_s: float = setting(
        60.0, "Idle timeout", "A client that sends nothing for this long is disconnected.", "s", gt=0, le=3600
    )
    client_timeout_heartbeats: int = client_timeout_setting()


def write_register_map(config: ModbusConfig, out: Path, side: str) -> str:
    """The register map as CSV and Markdown for the PLC programmer (``side``: who serves the registers)."""
    from anomalyd.drivers.plc import export

    c = config
    rows = export.register_map(c.status_layout, c.status_register, c.word_order, "status", side)
    rows += export.register_map(c.command_layout, c.command_register, c.word_order, "command", side)
    notes = export.register_map_notes(c, side)
    out.mkdir(parents=True, exist_ok=True)
    (out / "modbus_registers.csv").write_text(export.rows_csv(rows), encoding="utf-8")
    (out / "modbus_registers.md").write_text(export.register_map_markdown(rows, notes), encoding="utf-8")
    return (
        export.table(c.status_layout, "Status block, written by anomalyd")
        + "\n"
        + export.table(c.command_layout, "Command block, written by the PLC")
        + "\n"
        + notes
        + export.register_map_markdown(rows)
        + f"\nModbus register map → {out / 'modbus_registers.csv'} and .md"
    )


def _ranges_overlap(a: int, n: int, b: int, m: int) -> bool:
    return a < b + m and b < a + n


def _block_words(config: ModbusConfig) -> tuple[int, int]:
    """(status, command) sizes in registers; the two ranges must not overlap."""
    status, command = config.status_layout.size() // 2, config.command_layout.size() // 2
    if _ranges_overlap(config.status_register, status, config.command_register, command):
        raise PlcError(
            f"status registers {config.status_register}..{config.status_register + status - 1} overlap "
            f"command registers {config.command_register}..{config.command_register + command - 1}"
        )
    return status, command


@register_plc(ModbusConfig)
class ModbusLink:
    serves: ClassVar[bool] = False

    @staticmethod
    def write_layout(config: ModbusConfig, out: Path) -> str:
        return write_register_map(config, out, "client")

    """The daemon is the Modbus client; the PLC serves the registers."""

    def __init__(self, config: ModbusConfig) -> None:
        self.config = config
        self.name = f"modbus://{config.host}:{config.port}/{config.unit}"
        self._status_words, self._command_words = _block_words(config)
        self._client: Any = None

    def open(self) -> None:
        from pymodbus.client import ModbusTcpClient

        client = ModbusTcpClient(self.config.host, port=self.config.port, timeout=self.config.timeout_s, retries=0)
        if not client.connect():
            client.close()
            raise PlcDisconnected(f"{self.name}: cannot connect")
        self._client = client
        try:
            self._read(self.config.command_register, self._command_words)
            self._read(self.config.status_register, self._status_words)
        except PlcDisconnected as exc:
            self.close()
            raise PlcError(f"{self.name}: registers not readable ({exc}); check addresses and unit id") from exc

    def _read(self, address: int, count: int) -> list[int]:
        if self._client is None:
            raise PlcDisconnected(f"{self.name}: not connected")
        try:
            reply = self._client.read_holding_registers(address, count=count, device_id=self.config.unit)
        except Exception as exc:  # pymodbus raises ConnectionException, ModbusIOException, …
            self.close()
            raise PlcDisconnected(f"{self.name}: read failed ({exc})") from exc
        if reply.isError():
            raise PlcDisconnected(f"{self.name}: read of registers {address}+{count} refused ({reply})")
        return list(reply.registers)

    def read_command(self) -> Command:
        words = self._read(self.config.command_register, self._command_words)
        return unpack_command(bytes_from_words(words), self.config.command_layout, self.config.word_order)

    def read_status(self) -> Status | None:
        words = self._read(self.config.status_register, self._status_words)
        return unpack_status(bytes_from_words(words), self.config.status_layout, self.config.word_order)

    def write_status(self, status: Status) -> None:
        if self._client is None:
            raise PlcDisconnected(f"{self.name}: not connected")
        words = words_from_bytes(pack_status(status, self.config.status_layout, self.config.word_order))
        try:
            reply = self._client.write_registers(self.config.status_register, words, device_id=self.config.unit)
        except Exception as exc:
            self.close()
            raise PlcDisconnected(f"{self.name}: write failed ({exc})") from exc
        if reply.isError():
            raise PlcDisconnected(f"{self.name}: write refused ({reply})")

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


# Function codes this server serves (holding and input registers); any other is "illegal function".
_SERVED = {3, 4, 6, 16, 23}
# Most registers per request (Modbus application protocol 1.1b3, 6.3, 6.12, 6.17).
_MAX_READ, _MAX_WRITE = 125, 123


def _malformed_reply(data: bytes) -> tuple[int, bytes] | None:
    """(frame length, exception reply) when ``data`` starts with a whole, malformed request; else None."""
    if len(data) < 8:
        return None
    tid, proto, length, unit = struct.unpack(">HHHB", data[:7])
    if proto != 0 or length < 2 or len(data) < 6 + length:
        return None
    pdu = data[7 : 6 + length]
    fc = pdu[0]
    code = None
    if fc not in _SERVED:
        code = 1  # illegal function
    elif fc in (3, 4) and (len(pdu) != 5 or not 1 <= struct.unpack(">H", pdu[3:5])[0] <= _MAX_READ):
        code = 3  # illegal data value
    elif (fc == 6 and len(pdu) != 5) or (
        fc == 16
        and (
            len(pdu) < 6
            or not 1 <= (qty := struct.unpack(">H", pdu[3:5])[0]) <= _MAX_WRITE
            or pdu[5] != 2 * qty
            or len(pdu) != 6 + 2 * qty
        )
    ):
        code = 3
    if code is None:
        return None
    reply = struct.pack(">HHHBBB", tid, 0, 3, unit, (fc | 0x80) & 0xFF, code)
    return 6 + length, reply


class RegisterServer:
    """A pymodbus TCP server in a background thread, serving one register map.

    ``owned`` registers are written only by us (the PLC's writes there are
    refused); all others may be written by clients. The register list is the
    server's own, so reads always see the latest values without copying.
    """

    def __init__(
        self,
        host: str,
        port: int,
        size: int,
        owned: range,
        max_clients: int = 16,
        idle_timeout_s: float | None = None,
    ) -> None:
        self.host, self.port, self.size, self.owned = host, port, size, owned
        self.max_clients = max_clients
        self.idle_timeout_s = idle_timeout_s
        self.evicted = 0
        self.last_status_read: float | None = None
        self._registers: list[int] | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    async def _action(
        self, func_code: int, start: int, address: int, count: int, registers: list[int], values: Any
    ) -> Any:
        from pymodbus.constants import ExcCodes

        self._registers = registers
        overlaps = _ranges_overlap(address, count, self.owned.start, len(self.owned))
        if values is not None and overlaps:
            return ExcCodes.ILLEGAL_ADDRESS
        if values is None and overlaps:
            self.last_status_read = time.monotonic()  # a client is reading the result block
        return None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"modbus-server:{self.port}", daemon=True)
        self._thread.start()
        if not self._ready.wait(5.0) or self._error is not None:
            raise PlcError(f"modbus server on {self.host}:{self.port} did not start: {self._error}")

    def _server_class(self) -> Any:
        """ModbusTcpServer with a bound on clients: each connection costs a file descriptor.

        Over ``max_clients`` the connection to drop is one that never sent a request
        (oldest first), else the one idle longest: a flood of idle sockets cannot
        push out a PLC that is polling, and a PLC that reconnects after a pulled
        cable pushes out its own dead connection.
        """
        from pymodbus.server import ModbusTcpServer
        from pymodbus.server.requesthandler import ServerRequestHandler

        owner = self

        class Client(ServerRequestHandler):  # type: ignore[misc]
            connected_at = 0.0
            last_request: float | None = None

            def connection_made(self, transport: Any) -> None:
                self.connected_at = time.monotonic()
                super().connection_made(transport)
                listener = self.listener
                if listener is not None and len(listener.active_connections) > owner.max_clients:
                    owner._evict(list(listener.active_connections.values()))

            def callback_data(self, data: bytes, addr: tuple[Any, ...] | None = None) -> int:
                self.last_request = time.monotonic()
                used = 0
                # A malformed request is answered as the specification says (its function code + 0x80 and
                # exception 01 or 03), not pymodbus' "80 01"; well-formed frames go to pymodbus.
                while (reply := _malformed_reply(data[used:])) is not None:
                    frame_len, answer = reply
                    if self.transport is not None:
                        self.transport.write(answer)  # type: ignore[attr-defined]
                    used += frame_len
                if used >= len(data):
                    return len(data)
                return used + int(super().callback_data(data[used:], addr))

        class Server(ModbusTcpServer):  # type: ignore[misc]
            def callback_new_connection(self) -> Any:
                return Client(self, self.trace_packet, self.trace_pdu, self.trace_connect)

        return Server

    def _evict(self, clients: list[Any]) -> None:
        def key(c: Any) -> tuple[int, float]:
            return (0, c.connected_at) if c.last_request is None else (1, c.last_request)

        while len(clients) > self.max_clients:
            victim = min(clients, key=key)
            clients.remove(victim)
            self.evicted += 1
            if victim.transport is not None:
                victim.transport.close()

    async def _reap_idle(self) -> None:
        """Close clients that have sent nothing for ``idle_timeout_s``."""
        assert self.idle_timeout_s is not None
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout_s / 2))
            now = time.monotonic()
            for client in list(self._server.active_connections.values()):
                last = client.last_request if client.last_request is not None else client.connected_at
                if now - last > self.idle_timeout_s and client.transport is not None:
                    self.evicted += 1
                    client.transport.close()

    def _run(self) -> None:
        from pymodbus.simulator import DataType, SimData, SimDevice

        async def serve() -> None:
            device = SimDevice(
                id=0,
                simdata=[SimData(0, count=self.size, values=0, datatype=DataType.REGISTERS)],
                action=self._action,
            )
            self._server = self._server_class()(device, address=(self.host, self.port))
            self._loop = asyncio.get_running_loop()
            # The simulator builds its register list lazily; capture it through one local read.
            await self._server.context.async_getValues(0, 3, 0, 1)
            self.last_status_read = None  # that was us, not a client
            await self._server.serve_forever(background=True)  # returns once listening
            reaper = asyncio.create_task(self._reap_idle()) if self.idle_timeout_s else None
            self._ready.set()
            await self._server.serving
            if reaper is not None:
                reaper.cancel()

        try:
            asyncio.run(serve())
        except BaseException as exc:  # report start failures to start()
            self._error = exc
            self._ready.set()

    def read(self, address: int, count: int) -> list[int]:
        regs = self._registers
        return [0] * count if regs is None else list(regs[address : address + count])

    def write(self, address: int, words: list[int]) -> None:
        if self._registers is None:
            raise PlcError("modbus server not started")
        # One slice assignment: a client never sees half a block.
        self._registers[address : address + len(words)] = words

    def stop(self) -> None:
        if self._loop is not None and self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.shutdown(), self._loop)
        if self._thread is not None:
            self._thread.join(timeout=5.0)


@register_plc(ModbusServerConfig)
class ModbusServerLink:
    # We are the server: a port that cannot be bound is a set-up fault, not a PLC outage.
    serves: ClassVar[bool] = True

    @staticmethod
    def write_layout(config: ModbusServerConfig, out: Path) -> str:
        return write_register_map(config, out, "server")

    """The daemon serves the registers; the PLC (a Modbus client) polls them."""

    def __init__(self, config: ModbusServerConfig) -> None:
        self.config = config
        self.name = f"modbus-server://{config.host}:{config.port}"
        self._status_words, self._command_words = _block_words(config)
        size = max(config.status_register + self._status_words, config.command_register + self._command_words)
        owned = range(config.status_register, config.status_register + self._status_words)
        self._server: RegisterServer | None = None
        self._size, self._owned = size, owned

    def open(self) -> None:
        if self._server is None:
            server = RegisterServer(
                self.config.host,
                self.config.port,
                self._size,
                self._owned,
                max_clients=self.config.max_clients,
                idle_timeout_s=self.config.idle_timeout_s,
            )
            server.start()
            self._server = server

    def read_command(self) -> Command:
        if self._server is None:
            raise PlcDisconnected(f"{self.name}: not serving")
        words = self._server.read(self.config.command_register, self._command_words)
        return unpack_command(bytes_from_words(words), self.config.command_layout, self.config.word_order)

    def read_status(self) -> Status | None:
        return None  # our own registers: fresh at every start

    def client_seen(self, within_s: float) -> bool:
        """A client has read the status registers within ``within_s`` (we serve; the PLC polls)."""
        last = self._server.last_status_read if self._server is not None else None
        return last is not None and time.monotonic() - last <= within_s

    def write_status(self, status: Status) -> None:
        if self._server is None:
            raise PlcDisconnected(f"{self.name}: not serving")
        raw = pack_status(status, self.config.status_layout, self.config.word_order)
        self._server.write(self.config.status_register, words_from_bytes(raw))

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop()
