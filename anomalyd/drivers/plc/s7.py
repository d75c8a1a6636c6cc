"""Siemens S7 over ISO-on-TCP with python-snap7 3.x (pure Python client)."""

from __future__ import annotations

import contextlib
from typing import Any

from anomalyd.config import S7Config
from anomalyd.drivers.plc.base import PlcDisconnected, PlcError, register_plc
from anomalyd.drivers.plc.layout import Command, Status, pack_status, unpack_command, unpack_status


@register_plc("s7")
class S7Link:
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
