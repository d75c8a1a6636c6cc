"""The PlcLink interface, its errors, the settings every link shares and the registry of backends.

A PLC link is one module of this package: its settings class (``type: Literal[KEY]``) and
its link class, registered with ``@register_plc(Settings)``; the link class may say how
to write its layout for the PLC programmer (``write_layout``, used by ``plc-layout``)
and whether the daemon serves the blocks (``serves``: a port it cannot bind is then a
set-up fault, exit 2).
"""

from __future__ import annotations

from typing import Any, Protocol

from anomalyd.drivers.plc.layout import Command, CommandLayout, Status, StatusLayout
from anomalyd.errors import AnomalydError
from anomalyd.registry import Registry
from anomalyd.settings import BackendSettings, setting


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


class PlcSettings(BackendSettings):
    """What every PLC link's settings have: the ``type`` that names the link."""


class PlcBlocks(PlcSettings):
    """A link that carries the two blocks: their layouts, its timeout and reconnect back-off."""

    status_layout: StatusLayout = setting(StatusLayout(), "Status block", "Byte offsets of the daemon-owned block.")
    command_layout: CommandLayout = setting(CommandLayout(), "Command block", "Bit offsets of the PLC-owned block.")
    timeout_s: float = setting(1.0, "I/O timeout", "Timeout of one request to the PLC.", "s", gt=0, le=30)
    reconnect_max_s: float = setting(
        5.0, "Reconnect back-off cap", "Longest wait between reconnects.", "s", gt=0, le=600
    )


def client_timeout_setting() -> Any:
    """For links the daemon serves (Modbus server, OPC UA): when a silent client counts as no PLC."""
    return setting(
        10,
        "Client timeout",
        "plc_connected and /healthz say no PLC when no client has read the status for this many heartbeats.",
        ge=1,
        le=100_000,
    )


PLC_LINKS: Registry[Any] = Registry("PLC link", "anomalyd.drivers.plc")
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
    return PLC_LINKS[config.type](config)  # type: ignore[no-any-return]
