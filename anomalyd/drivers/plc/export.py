"""The block layout for the PLC programmer: a table, TIA Portal SCL, a Modbus register map."""

from __future__ import annotations

import csv
import io

from anomalyd.drivers.plc.layout import COMMAND_FIELDS, SIZES, STATUS_FIELDS, CommandLayout, StatusLayout, _Layout

_SCL_TYPES = {"BOOL": "Bool", "UINT": "UInt", "UDINT": "UDInt", "REAL": "Real"}


def _cells(layout: _Layout) -> list[tuple[str, str, int, int, str]]:
    meanings = STATUS_FIELDS if isinstance(layout, StatusLayout) else COMMAND_FIELDS
    rows = [(name, kind, byte, bit, meanings[name][1]) for name, kind, byte, bit in layout.cells()]
    return sorted(rows, key=lambda r: (r[2], r[3]))


def table(layout: _Layout, title: str) -> str:
    """A Markdown table: offset, type, name, meaning."""
    lines = [f"{title} ({layout.size()} bytes)", "", "| offset | type | name | meaning |", "|---|---|---|---|"]
    for name, kind, byte, bit, meaning in _cells(layout):
        offset = f"{byte}.{bit}" if kind == "BOOL" else str(byte)
        lines.append(f"| {offset} | {kind} | {name} | {meaning} |")
    return "\n".join(lines) + "\n"


def _udt_members(layout: _Layout) -> list[str]:
    """Members in declaration order with spares, so a non-optimised DB has our offsets."""
    by_byte: dict[int, list[tuple[str, str, int, str]]] = {}
    for name, kind, byte, bit, meaning in _cells(layout):
        by_byte.setdefault(byte, []).append((name, kind, bit, meaning))
    members: list[str] = []
    spare = 0
    byte = 0
    size = layout.size()
    while byte < size:
        cells = by_byte.get(byte, [])
        if cells and cells[0][1] != "BOOL":
            name, kind, _, meaning = cells[0]
            members.append(f"      {name} : {_SCL_TYPES[kind]};   // {meaning}")
            byte += SIZES[kind]
            continue
        if cells:
            bits = {bit: (name, meaning) for name, _, bit, meaning in cells}
            for bit in range(8):
                if bit in bits:
                    members.append(f"      {bits[bit][0]} : Bool;   // {byte}.{bit} {bits[bit][1]}")
                else:
                    members.append(f"      spare_{spare} : Bool;")
                    spare += 1
        else:
            members.append(f"      spare_{spare} : Byte;")
            spare += 1
        byte += 1
    return members


def scl_source(
    status: StatusLayout,
    command: CommandLayout,
    status_db: int,
    command_db: int,
    status_start: int = 0,
    command_start: int = 0,
) -> str:
    """TIA Portal external source: two UDTs and the non-optimised DBs holding them at their offsets.

    A block at offset 0 of its own DB is a DB of the UDT's type (as before); a
    block further in, or two blocks in one DB, becomes a DB with spare bytes
    placed so every field lands on the byte the YAML names.
    """
    out = io.StringIO()
    for udt, layout in (("anomalyd_Status", status), ("anomalyd_Command", command)):
        out.write(f'TYPE "{udt}"\nVERSION : 0.1\n   STRUCT\n')
        out.write("\n".join(_udt_members(layout)) + "\n")
        out.write("   END_STRUCT;\nEND_TYPE\n\n")
    blocks = [
        ("status", "anomalyd_Status", status_db, status_start, status.size(), "written by anomalyd, read by the PLC"),
        (
            "command",
            "anomalyd_Command",
            command_db,
            command_start,
            command.size(),
            "written by the PLC, read by anomalyd",
        ),
    ]
    if status_db != command_db and status_start == 0 and command_start == 0:
        for _role, udt, number, _start, _size, note in blocks:
            out.write(f"// Give this DB the number {number} ({note}); keep 'Optimized block access' OFF.\n")
            out.write(f"DATA_BLOCK \"{udt}_DB\"\n{{ S7_Optimized_Access := 'FALSE' }}\nVERSION : 0.1\nNON_RETAIN\n")
            out.write(f'"{udt}"\n\nBEGIN\n\nEND_DATA_BLOCK\n\n')
        return out.getvalue()
    for number in sorted({status_db, command_db}):
        inside = sorted((b for b in blocks if b[2] == number), key=lambda b: b[3])
        notes = "; ".join(f"{role} block at byte {start} ({note})" for role, _, _, start, _, note in inside)
        out.write(f"// Give this DB the number {number}: {notes}; keep 'Optimized block access' OFF.\n")
        out.write(f"DATA_BLOCK \"anomalyd_DB{number}\"\n{{ S7_Optimized_Access := 'FALSE' }}\nVERSION : 0.1\n")
        out.write("NON_RETAIN\n   STRUCT\n")
        at = 0
        for role, udt, _number, start, size, _note in inside:
            if start > at:
                out.write(f"      spare_{at} : Array[0..{start - at - 1}] of Byte;   // bytes {at}..{start - 1}\n")
            out.write(f'      {role} : "{udt}";   // bytes {start}..{start + size - 1}\n')
            at = start + size
        out.write("   END_STRUCT;\n\nBEGIN\n\nEND_DATA_BLOCK\n\n")
    return out.getvalue()


# Function codes per block and side of the link: who reads and who writes it.
_FUNCTIONS = {
    ("status", "client"): "anomalyd writes FC16 (write multiple registers); the PLC reads its own registers",
    ("command", "client"): "anomalyd reads FC03 (read holding registers); the PLC writes its own registers",
    ("status", "server"): "the PLC reads FC03 (read holding registers); writes are refused",
    ("command", "server"): "the PLC writes FC16 (or FC06 per register); anomalyd only reads",
}


def register_map(
    layout: _Layout, first_register: int, word_order: str, block: str, side: str = "client"
) -> list[dict[str, str]]:
    """Rows of the Modbus register map (holding registers, bit 15 = MSB).

    ``register`` is the 0-based protocol address (what goes on the wire), ``4xxxx``
    the same register in the 1-based Modicon notation many PLC tools use.
    """
    rows = []
    for name, kind, byte, bit, meaning in _cells(layout):
        register = first_register + byte // 2
        words = max(1, SIZES[kind] // 2)
        row = {
            "block": block,
            "register": str(register),  # the first register of the value
            "4xxxx": str(40001 + register),
            "registers": str(words),  # how many registers the value spans
            "bit": "",  # BOOL only: 0..15, bit 15 = MSB
            "mask": "",  # BOOL only: the bit's value
            "type": kind,
            "word_order": "",  # 32-bit only: which register holds the high word
            "name": name,
            "meaning": meaning,
        }
        if kind == "BOOL":
            # Byte 2k is the high byte of register k: S7-style byte order.
            reg_bit = bit + (8 if byte % 2 == 0 else 0)
            row.update(bit=str(reg_bit), mask=f"16#{1 << reg_bit:04X}")
        elif words == 2:
            row["word_order"] = "high word first" if word_order == "big" else "low word first"
        rows.append(row)
    return rows


def register_map_notes(config: object, side: str) -> str:
    """What a PLC programmer needs besides the rows: addressing, unit id, function codes."""
    unit = getattr(config, "unit", 1)
    host, port = getattr(config, "host", "?"), getattr(config, "port", "?")
    role = (
        f"anomalyd is the Modbus TCP client of the PLC at {host}:{port}, unit id {unit}"
        if side == "client"
        else f"anomalyd is a Modbus TCP server on {host}:{port} (any unit id); the PLC is the client"
    )
    return (
        f"{role}.\n\n"
        "- Holding registers only. `register` is the 0-based address sent on the wire; "
        "`4xxxx` is the same register in 1-based Modicon notation (40001 = register 0).\n"
        f"- Status block: {_FUNCTIONS[('status', side)]}.\n"
        f"- Command block: {_FUNCTIONS[('command', side)]}.\n"
        "- Columns: `register` is a value's first register, `registers` how many it spans (2 for a 32-bit "
        "value, `word_order` says which holds the high word); `bit` (0..15, 15 = MSB) and `mask` only for a BOOL, "
        "one bit of its register: AND the register with `mask`.\n"
        "- Read the whole status block in one request, so every field belongs to the same answer.\n"
        f"- {_alignment(config)}\n\n"
    )


def _alignment(config: object) -> str:  # a Modbus config
    odd = config.misaligned_32bit()  # type: ignore[attr-defined]
    if not odd:
        return "Every 32-bit value starts at an even register."
    return (
        "32-bit values at odd registers: " + ", ".join(odd) + ". A PLC that reads 32-bit values only at even "
        "registers (Modicon) needs `align_32bit: true`."
    )


def rows_csv(rows: list[dict[str, str]]) -> str:
    """Rows of one table (register map, OPC UA nodes) as CSV with a header."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def register_map_markdown(rows: list[dict[str, str]], notes: str = "") -> str:
    keys = list(rows[0])
    lines = [notes.rstrip("\n")] if notes else []
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"
