"""Siemens S7 over ISO-on-TCP with python-snap7 3.x (pure Python client)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import model_validator

from anomalyd.drivers.plc.base import PlcBlocks, PlcDisconnected, PlcError, register_plc
from anomalyd.drivers.plc.layout import Command, Status, pack_status, unpack_command, unpack_status
from anomalyd.settings import ranges_overlap, setting


class S7Config(PlcBlocks):
    type: Literal["s7"] = "s7"
    host: str = setting("127.0.0.1", "PLC address", "IP address or host name of the S7 CPU.")
    port: int = setting(102, "TCP port", "ISO-on-TCP port (102 on a real PLC).", ge=1, le=65535)
    rack: int = setting(0, "Rack", "Rack of the CPU.", ge=0, le=7)
    slot: int = setting(1, "Slot", "Slot of the CPU (1 for S7-1200/1500).", ge=0, le=31)
    status_db: int = setting(100, "Status DB", "DB number of the daemon-owned status block.", ge=1, le=65535)
    status_start: int = setting(0, "Status start", "Byte offset of the status block in its DB.", ge=0, le=65000)
    command_db: int = setting(101, "Command DB", "DB number of the PLC-owned command block.", ge=1, le=65535)
    command_start: int = setting(0, "Command start", "Byte offset of the command block in its DB.", ge=0, le=65000)

    @model_validator(mode="after")
    def _blocks_apart(self) -> S7Config:
        for name, start in (("status_start", self.status_start), ("command_start", self.command_start)):
            if start % 2:
                raise ValueError(f"{name} {start} must be even (an S7 structure starts on an even byte)")
        # One DB for both blocks is allowed, but our score bytes must never land on the PLC's command byte.
        if self.status_db == self.command_db:
            status = (self.status_start, self.status_start + self.status_layout.size())
            command = (self.command_start, self.command_start + self.command_layout.size())
            if ranges_overlap(status, command):
                raise ValueError(
                    f"status block (DB{self.status_db} bytes {status[0]}..{status[1] - 1}) overlaps the command block "
                    f"(bytes {command[0]}..{command[1] - 1}) in the same DB; move status_start or command_start"
                )
        return self


@register_plc(S7Config)
class S7Link:
    serves: ClassVar[bool] = False

    @staticmethod
    def write_layout(config: S7Config, out: Path) -> str:
        """The two blocks as tables and as TIA Portal source (anomalyd_blocks.scl)."""
        from anomalyd.drivers.plc import export

        c = config
        scl = export.scl_source(
            c.status_layout, c.command_layout, c.status_db, c.command_db, c.status_start, c.command_start
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / "anomalyd_blocks.scl").write_text(scl, encoding="utf-8")
        return (
            export.table(c.status_layout, "Status block, written by anomalyd")
            + "\n"
            + export.table(c.command_layout, "Command block, written by the PLC")
            + f"\nTIA Portal source → {out / 'anomalyd_blocks.scl'} (DB{c.status_db} status, DB{c.command_db} command)"
        )

    def __init__(self, config: S7Config) -> None:
        self.config = config
        self.name = f"s7://{config.host}:{config.port}"
        self._status_size = config.status_layout.size()
        self._command_size = config.command_layout.size()
        self._client: Any = None

    def open(self) -> None:
        import snap7

        c = self.config
        client = snap7.client.Client()
        try:
            client.connect(c.host, c.rack, c.slot, c.port)
        except Exception as exc:  # snap7 raises several types for one cause: no PLC
            raise PlcDisconnected(f"{self.name}: cannot connect ({exc})") from exc
        # Bound every later request by our timeout, not the library's 5 s default.
        connection: Any = client.connection
        connection.timeout = c.timeout_s
        if connection.socket is not None:
            connection.socket.settimeout(c.timeout_s)
        self._client = client
        self._check_db(c.status_db, c.status_start, self._status_size, "status")
        self._check_db(c.command_db, c.command_start, self._command_size, "command")

    def _check_db(self, db: int, start: int, size: int, role: str) -> None:
        """Read the block once, so a missing or short DB is an error at start, not mid-shift."""
        try:
            self._client.db_read(db, start, size)
            return
        except Exception as exc:
            first = exc
        try:
            self._client.db_read(db, 0, 1)
        except Exception:
            self.close()
            raise PlcError(
                f"{self.name}: DB{db} ({role} block) does not exist or cannot be read ({first}); "
                f"create DB{db} with at least {start + size} bytes, not optimised"
            ) from None
        self.close()
        raise PlcError(
            f"{self.name}: DB{db} ({role} block) is too small: the block needs bytes {start}..{start + size - 1} "
            f"({start + size} bytes), the read failed ({first})"
        )

    def _require(self) -> Any:
        if self._client is None:
            raise PlcDisconnected(f"{self.name}: not connected")
        return self._client

    def read_command(self) -> Command:
        client = self._require()
        try:
            raw = client.db_read(self.config.command_db, self.config.command_start, self._command_size)
        except Exception as exc:
            self.close()
            raise PlcDisconnected(f"{self.name}: read of DB{self.config.command_db} failed ({exc})") from exc
        return unpack_command(bytes(raw), self.config.command_layout)

    def read_status(self) -> Status | None:
        client = self._require()
        try:
            raw = client.db_read(self.config.status_db, self.config.status_start, self._status_size)
        except Exception as exc:
            self.close()
            raise PlcDisconnected(f"{self.name}: read of DB{self.config.status_db} failed ({exc})") from exc
        return unpack_status(bytes(raw), self.config.status_layout)

    def write_status(self, status: Status) -> None:
        client = self._require()
        raw = pack_status(status, self.config.status_layout)
        try:
            client.db_write(self.config.status_db, self.config.status_start, bytearray(raw))
        except Exception as exc:
            self.close()
            raise PlcDisconnected(f"{self.name}: write of DB{self.config.status_db} failed ({exc})") from exc

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a dead socket may fail; nothing to do
                client.disconnect()
