"""The PLC blocks: where each field lives, and packing them into bytes.

The status block is owned by the daemon (written whole, never read back); the
command block is owned by the PLC (only read). Offsets are S7 notation: a BOOL
at ``"byte.bit"``, a number at a byte offset; all numbers big-endian, as S7
stores them. On Modbus, byte 2k is the high byte of register k.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, fields
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

FieldType = Literal["BOOL", "UINT", "UDINT", "REAL"]
SIZES: dict[str, int] = {"BOOL": 1, "UINT": 2, "UDINT": 4, "REAL": 4}


class LayoutError(ValueError):
    """A block layout with overlapping, misaligned or malformed offsets."""


def parse_bit(address: str) -> tuple[int, int]:
    """``"3.5"`` → (3, 5)."""
    try:
        byte_s, bit_s = address.split(".")
        byte, bit = int(byte_s), int(bit_s)
    except ValueError:
        raise LayoutError(f"bit address {address!r} must look like BYTE.BIT, e.g. 0.3") from None
    if byte < 0 or not 0 <= bit <= 7:
        raise LayoutError(f"bit address {address!r}: byte must be ≥ 0 and bit 0..7")
    return byte, bit


# name → (type, meaning); the order is the order of the table in docs/plc.md.
STATUS_FIELDS: dict[str, tuple[FieldType, str]] = {
    "ready": ("BOOL", "model loaded, camera and PLC up"),
    "busy": ("BOOL", "the part of the last accepted trigger is being inspected"),
    "result_valid": ("BOOL", "the result fields answer part_id (cleared by trigger, result_ack, ready = 0)"),
    "pass": ("BOOL", "verdict OK"),
    "fail": ("BOOL", "verdict NG (also set on timeout/error: fail-safe)"),
    "error": ("BOOL", "see error_code"),
    "trigger_ack": ("BOOL", "echoes the PLC trigger"),
    "result_toggle": ("BOOL", "flips on every new answer"),
    "heartbeat": ("UINT", "+1 every heartbeat period, even when idle"),
    "inspection_id": ("UDINT", "+1 per answer (inspection or refused trigger); continues across restarts"),
    "score": ("REAL", "normalised anomaly score"),
    "threshold": ("REAL", "threshold in force"),
    "error_code": ("UINT", "0 ok; see the error-code table"),
    "latency_ms": ("REAL", "frame-to-result time"),
    # Appended after the first version's fields: the offsets above keep their meaning.
    "trigger_ready": ("BOOL", "a trigger now would be inspected: ready, enable = 1, not busy"),
    "records_failing": ("BOOL", "records cannot be written now (kept in memory, retried); traceability at risk"),
    "recipe_changing": ("BOOL", "the requested recipe is being loaded; triggers wait for it (code 13)"),
    "drift": ("BOOL", "warning: the parts' scores drift from the calibration (lens, lamp); verdicts unchanged"),
    "part_id": ("UDINT", "the PLC's part_id latched at the trigger this result answers"),
    "missed_triggers": ("UDINT", "+1 per trigger answered without an inspection (refused)"),
    "recipe": ("UINT", "the recipe the next result uses (recipe_request, 0 = the default recipe)"),
}
COMMAND_FIELDS: dict[str, tuple[FieldType, str]] = {
    "trigger": ("BOOL", "rising edge starts an inspection"),
    "result_ack": ("BOOL", "PLC has read the result; clears result_valid"),
    "enable": ("BOOL", "inspections allowed (0: daemon answers triggers with error 7)"),
    "part_id": ("UDINT", "the part's number; write it before or with the trigger, it is echoed with the result"),
    "recipe_request": ("UINT", "recipe for the next parts (0: the default); latched with each trigger"),
}


class _Layout(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    spec: ClassVar[dict[str, tuple[FieldType, str]]] = {}

    def offsets(self) -> dict[str, str | int]:
        return {name: getattr(self, "pass_" if name == "pass" else name) for name in self.spec}

    def cells(self) -> list[tuple[str, FieldType, int, int]]:
        """(name, type, byte, bit) per field; bit is -1 for numbers."""
        out = []
        for name, where in self.offsets().items():
            kind = self.spec[name][0]
            if kind == "BOOL":
                byte, bit = parse_bit(str(where))
            else:
                byte, bit = int(where), -1
            out.append((name, kind, byte, bit))
        return out

    def size(self) -> int:
        """Bytes the block spans, rounded up to whole 16-bit words."""
        end = max(byte + SIZES[kind] for _, kind, byte, _ in self.cells())
        return end + (end % 2)

    @model_validator(mode="after")
    def _check(self) -> _Layout:
        used: dict[tuple[int, int], str] = {}
        for name, kind, byte, bit in self.cells():
            if kind != "BOOL" and byte % 2:
                raise LayoutError(f"{name} ({kind}) at byte {byte}: numbers must start at an even byte")
            spots = [(byte, bit)] if kind == "BOOL" else [(byte + i, b) for i in range(SIZES[kind]) for b in range(8)]
            for spot in spots:
                if spot in used:
                    raise LayoutError(f"{name} overlaps {used[spot]} at byte {spot[0]} bit {spot[1]}")
                used[spot] = name
        return self


class StatusLayout(_Layout):
    spec = STATUS_FIELDS
    ready: str = "0.0"
    busy: str = "0.1"
    result_valid: str = "0.2"
    pass_: str = Field("0.3", alias="pass")
    fail: str = "0.4"
    error: str = "0.5"
    trigger_ack: str = "0.6"
    result_toggle: str = "0.7"
    heartbeat: int = Field(2, ge=0)
    inspection_id: int = Field(4, ge=0)
    score: int = Field(8, ge=0)
    threshold: int = Field(12, ge=0)
    error_code: int = Field(16, ge=0)
    latency_ms: int = Field(18, ge=0)
    trigger_ready: str = "22.0"
    records_failing: str = "22.1"
    recipe_changing: str = "22.2"
    drift: str = "22.3"
    part_id: int = Field(24, ge=0)
    missed_triggers: int = Field(28, ge=0)
    recipe: int = Field(32, ge=0)

    @classmethod
    def aligned(cls) -> StatusLayout:
        """Every 32-bit value at a byte offset divisible by 4 (an even Modbus register, as Modicon needs):
        the default layout with latency_ms moved from byte 18 (register 9) to byte 36; bytes 18..21 spare."""
        return cls(latency_ms=36)


class CommandLayout(_Layout):
    spec = COMMAND_FIELDS
    trigger: str = "0.0"
    result_ack: str = "0.1"
    enable: str = "0.2"
    part_id: int = Field(2, ge=0)
    recipe_request: int = Field(6, ge=0)

    @classmethod
    def aligned(cls) -> CommandLayout:
        """part_id at byte 4 (register 2, even) and recipe_request at byte 2 (a 16-bit value may be anywhere)."""
        return cls(part_id=4, recipe_request=2)


def misaligned_32bit(layout: _Layout, first_register: int) -> list[str]:
    """32-bit fields that would start at an odd Modbus register: 'name (register N)'."""
    return [
        f"{name} (register {first_register + byte // 2})"
        for name, kind, byte, _ in layout.cells()
        if SIZES[kind] == 4 and (first_register + byte // 2) % 2
    ]


@dataclass(frozen=True)
class Status:
    """Everything the daemon tells the PLC, in one value."""

    ready: bool = False
    busy: bool = False
    result_valid: bool = False
    passed: bool = False
    fail: bool = False
    error: bool = False
    trigger_ack: bool = False
    result_toggle: bool = False
    heartbeat: int = 0
    inspection_id: int = 0
    score: float = 0.0
    threshold: float = 0.0
    error_code: int = 0
    latency_ms: float = 0.0
    trigger_ready: bool = False
    records_failing: bool = False
    recipe_changing: bool = False
    drift: bool = False
    part_id: int = 0
    missed_triggers: int = 0
    recipe: int = 0
    # Not in any block: when the answer these fields carry was decided (Unix time; 0: none yet).
    # OPC UA gives it to clients as the answer's SourceTimestamp.
    decided_at: float = 0.0


@dataclass(frozen=True)
class Command:
    """What the PLC tells the daemon."""

    trigger: bool = False
    result_ack: bool = False
    enable: bool = True
    part_id: int = 0
    recipe_request: int = 0


_STRUCT = {"UINT": ">H", "UDINT": ">I", "REAL": ">f"}


def _swap_words(raw: bytes) -> bytes:
    return raw[2:4] + raw[0:2]


def _pack(values: dict[str, object], layout: _Layout, word_order: str) -> bytes:
    buf = bytearray(layout.size())
    for name, kind, byte, bit in layout.cells():
        value = values[name]
        if kind == "BOOL":
            if value:
                buf[byte] |= 1 << bit
            continue
        if kind == "UINT":
            value = int(value) & 0xFFFF  # type: ignore[call-overload]
        elif kind == "UDINT":
            value = int(value) & 0xFFFFFFFF  # type: ignore[call-overload]
        raw = struct.pack(_STRUCT[kind], value)
        if len(raw) == 4 and word_order == "little":
            raw = _swap_words(raw)
        buf[byte : byte + len(raw)] = raw
    return bytes(buf)


def _unpack(raw: bytes, layout: _Layout, word_order: str) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, kind, byte, bit in layout.cells():
        if kind == "BOOL":
            values[name] = bool(raw[byte] >> bit & 1)
            continue
        chunk = bytes(raw[byte : byte + SIZES[kind]])
        if len(chunk) == 4 and word_order == "little":
            chunk = _swap_words(chunk)
        values[name] = struct.unpack(_STRUCT[kind], chunk)[0]
    return values


def pack_status(status: Status, layout: StatusLayout, word_order: str = "big") -> bytes:
    """The whole status block as bytes, ready for one write."""
    values = {name: getattr(status, "passed" if name == "pass" else name) for name in layout.spec}
    return _pack(values, layout, word_order)


def unpack_status(raw: bytes, layout: StatusLayout, word_order: str = "big") -> Status:
    """Inverse of :func:`pack_status` (the simulated PLC and tests read with it)."""
    values = _unpack(raw, layout, word_order)
    values["passed"] = values.pop("pass")
    return Status(**values)  # type: ignore[arg-type]


def unpack_command(raw: bytes, layout: CommandLayout, word_order: str = "big") -> Command:
    """Read the PLC's command block (bits and part_id, from one read)."""
    return Command(**_unpack(raw, layout, word_order))  # type: ignore[arg-type]


def pack_command(command: Command, layout: CommandLayout, word_order: str = "big") -> bytes:
    """The command block as the PLC would write it (for the simulated PLC)."""
    return _pack({f.name: getattr(command, f.name) for f in fields(command)}, layout, word_order)
