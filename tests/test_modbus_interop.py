"""Modbus as a PLC programmer meets it: jsmodbus (Node), driven by the register map's CSV alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ANOMALYD, free_port
from tests.harness import launch, station_config, wait_until

pytestmark = pytest.mark.e2e  # every test here starts the daemon or a peer as a process

ROOT = Path(__file__).resolve().parents[1]
INTEROP = ROOT / "tests" / "interop"
MODULES = ROOT / ".cache" / "interop"


def _jsmodbus() -> Path:
    """jsmodbus from npm, installed once into .cache/interop; a skip with the reason where it cannot be."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed (Debian: apt-get install nodejs npm)")
    if not (MODULES / "node_modules" / "jsmodbus").is_dir():
        MODULES.mkdir(parents=True, exist_ok=True)
        shutil.copy(INTEROP / "package.json", MODULES / "package.json")
        done = subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--prefix", str(MODULES)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            pytest.skip(f"npm could not install jsmodbus: {done.stderr.strip().splitlines()[-1:]}")
    return MODULES / "node_modules"


def test_jsmodbus_runs_the_handshake_from_the_aligned_map_alone(
    e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    modules = _jsmodbus()
    port = free_port()
    link = {"type": "modbus-server", "port": port, "align_32bit": True, "word_order": "little"}
    config, _ = station_config(
        tmp_path, e2e_bundle, sample_dir / "test", link, metrics={"enabled": False}, page={"enabled": False}
    )
    subprocess.run(
        [*ANOMALYD, "plc-layout", "--config", str(config), "--out", str(tmp_path / "map")],
        check=True,
        capture_output=True,
    )
    table = (tmp_path / "map" / "modbus_registers.csv").read_text()
    for line in table.splitlines()[1:]:
        _block, register, _, registers = line.split(",")[:4]
        assert registers == "1" or int(register) % 2 == 0, f"a 32-bit value at an odd register: {line}"
    assert "status,18,40019,2,,,REAL,low word first,latency_ms," in table  # moved from register 9
    daemon = launch(config, tmp_path / "daemon.log")
    try:

        def listening() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return True
            except OSError:
                return False

        wait_until(listening, 90.0, "the daemon serving Modbus")
        plc = subprocess.run(
            ["node", str(INTEROP / "modbus_plc.js"), "127.0.0.1", str(port),
             str(tmp_path / "map" / "modbus_registers.csv"), "8", "70000"],
            capture_output=True, text=True, timeout=180, env=dict(os.environ, NODE_PATH=str(modules)),
        )  # fmt: skip
        assert plc.returncode == 0, plc.stderr + (tmp_path / "daemon.log").read_text()[-2000:]
        answers = [json.loads(line) for line in plc.stdout.splitlines()]
        assert len(answers) == 8
        database = tmp_path / "data" / "inspections.sqlite"
        wait_until(lambda: len(sqlite3.connect(database).execute("SELECT 1 FROM inspections").fetchall()) >= 8)
        with sqlite3.connect(database) as db:
            records = {
                row[0]: row[1:]
                for row in db.execute("SELECT inspection_id, part_id, verdict, score, latency_ms FROM inspections")
            }
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    f32 = lambda x: struct.unpack(">f", struct.pack(">f", x))[0]  # noqa: E731  (what a REAL holds)
    for a in answers:
        part_id, verdict, score, latency_ms = records[a["inspection_id"]]
        assert a["part_id"] == a["sent_part_id"] == part_id, "every answer names the part it answers"
        assert a["pass"] == (verdict != "NG") and a["fail"] == (verdict == "NG") and a["error_code"] == 0
        assert a["score"] == f32(score), "the REAL on the wire is the record's score, bit for bit"
        assert a["latency_ms"] == pytest.approx(latency_ms, rel=1e-6) and 0 < a["latency_ms"] < 2000
    assert [a["inspection_id"] for a in answers] == list(
        range(answers[0]["inspection_id"], answers[0]["inspection_id"] + 8)
    )
