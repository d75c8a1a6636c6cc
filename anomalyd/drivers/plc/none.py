"""No PLC: verdicts go only to the log, records and metrics (bench, free-run trials)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from anomalyd.drivers.plc.base import PlcSettings, register_plc
from anomalyd.drivers.plc.layout import Command, Status


class NoPlcConfig(PlcSettings):
    type: Literal["none"] = "none"


@register_plc(NoPlcConfig)
class NoPlcLink:
    name = "none"
    serves: ClassVar[bool] = False

    @staticmethod
    def write_layout(config: NoPlcConfig, out: Path) -> str:
        """No PLC configured: the S7 default blocks, the layout a PLC programmer most often starts from."""
        from anomalyd.drivers.plc.s7 import S7Config, S7Link

        return S7Link.write_layout(S7Config(), out)

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
