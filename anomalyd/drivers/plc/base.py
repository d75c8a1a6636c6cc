"""The PlcLink interface, its errors and the registry of backends."""

from __future__ import annotations

from typing import Any, Protocol

from anomalyd.drivers.plc.layout import Command, Status
from anomalyd.errors import AnomalydError
from anomalyd.registry import Registry


class PlcError(AnomalydError):
    """The PLC cannot be used as configured (wrong DB, too small, refused)."""


class PlcDisconnected(PlcError):
    """The connection was lost or could not be made; the caller reconnects."""


class PlcLink(Protocol):
    """One connection to the PLC: read the command block, write the status block whole."""

    name: str

    def open(self) -> None: ...

    def read_command(self) -> Command: ...

    def write_status(self, status: Status) -> None: ...

    def read_status(self) -> Status | None:
        """The status block as it stands in the PLC (None where the PLC keeps none, e.g. server mode)."""
        ...

    def close(self) -> None: ...


PLC_LINKS = Registry("PLC link")
register_plc = PLC_LINKS.register


def words_from_bytes(raw: bytes) -> list[int]:
    """Block bytes → 16-bit registers (byte 2k is the high byte of register k)."""
    if len(raw) % 2:
        raw += b"\x00"
    return [(raw[i] << 8) | raw[i + 1] for i in range(0, len(raw), 2)]


def bytes_from_words(words: list[int]) -> bytes:
    return b"".join(int(w & 0xFFFF).to_bytes(2, "big") for w in words)


def open_plc_link(config: Any) -> PlcLink:
    """The registered backend for ``config.type``, not yet opened."""
    from anomalyd.drivers.plc import modbus, none, opcua, s7  # noqa: F401  (registers the backends)

    return PLC_LINKS[config.type](config)  # type: ignore[no-any-return]
