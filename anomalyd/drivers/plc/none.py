"""No PLC: verdicts go only to the log, records and metrics (bench, free-run trials)."""

from __future__ import annotations

from anomalyd.config import NoPlcConfig
from anomalyd.drivers.plc.base import register_plc
from anomalyd.drivers.plc.layout import Command, Status


@register_plc("none")
class NoPlcLink:
    name = "none"

    def __init__(self, config: NoPlcConfig) -> None:
        self.last_status = Status()

    def open(self) -> None:
        pass

    def read_command(self) -> Command:
        return Command(enable=True)

    def write_status(self, status: Status) -> None:
        self.last_status = status

    def read_status(self) -> Status | None:
        return None

    def close(self) -> None:
        pass
