"""The real daemon as a subprocess beside a simulated S7 PLC, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from anomalyd.drivers.plc.sim import SimulatedPlc
from tests.conftest import ANOMALYD, free_port


@dataclass
class Running:
    process: subprocess.Popen[str]
    config: Path
    plc: SimulatedPlc
    data: Path
    metrics_port: int
    notify: socket.socket | None = None
    raw: dict[str, object] = field(default_factory=dict)
    page_port: int = 0

    def rows(self) -> list[tuple[int, str, int, str]]:
        with sqlite3.connect(self.data / "inspections.sqlite") as db:
            return db.execute(
                "SELECT inspection_id, verdict, error_code, source FROM inspections ORDER BY inspection_id"
            ).fetchall()

    def wait_rows(self, count: int, timeout: float = 10.0) -> list[tuple[int, str, int, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.rows() if (self.data / "inspections.sqlite").exists() else []
            if len(rows) >= count:
                return rows
            time.sleep(0.05)
        raise AssertionError(f"only {len(rows)} of {count} records")

    def restart(self, log_name: str = "daemon2.log", timeout: float = 90.0) -> Path:
        """Start the daemon again on the same config (after a kill or a stop); wait until the PLC sees ready."""
        log = self.config.parent / log_name
        self.process = launch(self.config, log)
        assert self.plc.wait_for(lambda s: s.ready, timeout) is not None, log.read_text()[-2000:]
        return log

    def write_config(self, **changes: object) -> None:
        data = json.loads(json.dumps(self.raw))
        for key, value in changes.items():
            section, name = key.split("__")
            data.setdefault(section, {})[name] = value
        self.config.write_text(yaml.safe_dump(data), encoding="utf-8")

    def notifications(self) -> list[str]:
        assert self.notify is not None
        out = []
        self.notify.settimeout(0.05)
        try:
            while True:
                out += self.notify.recv(4096).decode().splitlines()
        except (TimeoutError, BlockingIOError):
            return out


def station_config(
    tmp_path: Path, bundle: Path, source: Path, plc: dict[str, object], name: str = "anomalyd.yaml", **overrides: object
) -> tuple[Path, dict[str, dict[str, object]]]:
    """The one test station's config file: the simulated camera, the bundle, the PLC side given, JSON logs.

    ``overrides``: ``section__key=value``, or ``section={...}`` merged into the section (replacing it when
    it names another ``type``, e.g. another PLC link).
    """
    raw: dict[str, dict[str, object]] = {
        "camera": {"type": "simulated", "source": str(source)},
        "plc": dict(plc),
        "model": {"bundle": str(bundle)},
        "daemon": {"data_dir": str(tmp_path / "data"), "heartbeat_ms": 100, "budget_ms": 2000},
        "metrics": {"port": free_port()},
        "page": {"port": free_port()},
        "logging": {"format": "json"},
    }
    for key, value in overrides.items():
        if "__" in key:
            section, field_name = key.split("__")
            raw.setdefault(section, {})[field_name] = value
        elif isinstance(value, dict) and "type" in value and raw.get(key, {}).get("type") != value["type"]:
            raw[key] = dict(value)
        elif isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value  # type: ignore[assignment]
    config = tmp_path / name
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return config, raw


def launch(config: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The daemon as a process on ``config``, its output appended to ``log``."""
    return subprocess.Popen(
        [*ANOMALYD, "run", "--config", str(config)],
        stdout=log.open("a"),
        stderr=subprocess.STDOUT,
        text=True,
        env=env or dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def start_daemon(tmp_path: Path, bundle: Path, source: Path, notify: bool = False, **overrides: object) -> Running:
    """The daemon against a simulated S7 PLC, started and ready."""
    plc_port = free_port()
    plc = SimulatedPlc("s7", port=plc_port)
    plc.start()
    link = {"type": "s7", "port": plc_port, "timeout_s": 0.5, "reconnect_max_s": 0.5}
    config, raw = station_config(tmp_path, bundle, source, link, **overrides)
    metrics_port, page_port = int(raw["metrics"]["port"]), int(raw["page"].get("port", 0))  # type: ignore[call-overload]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    sock = None
    if notify:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env.update(NOTIFY_SOCKET=path, WATCHDOG_USEC="2000000")
    process = launch(config, tmp_path / "daemon.log", env)
    running = Running(process, config, plc, tmp_path / "data", metrics_port, sock, raw, page_port)
    if plc.wait_for(lambda s: s.ready, 90.0) is None:
        process.kill()
        plc.stop()
        raise AssertionError("daemon never became ready:\n" + (tmp_path / "daemon.log").read_text()[-3000:])
    return running


def stop(r: Running, timeout: float = 30.0) -> int:
    """SIGTERM and wait for the exit (a loaded CI machine may need more than a few seconds to flush)."""
    r.process.send_signal(signal.SIGTERM)
    return r.process.wait(timeout=timeout)


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} not within {timeout} s")
