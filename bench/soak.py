"""Soak: the real daemon for N inspections while the line misbehaves (a benchmark, not a test).

    python bench/soak.py [--inspections 10000] [--plc-restart-every 1000] [--camera-timeout-every 500]

The daemon runs as a subprocess (`anomalyd run`) with the simulated camera; the
PLC is the simulated S7 PLC that `anomalyd plc-sim` runs, here in-process so the
schedule can stop and restart it. Fault schedule: the PLC server stopped for
2 s and restarted (DBs zeroed, as after a power cycle) every K inspections; a
camera timeout every M frames; every 2,500 inspections a bad YAML edit + SIGHUP,
then the good file restored + SIGHUP. At the end it prints the figures and exits
non-zero if a result was lost or RSS drifted more than 5 %.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import yaml

from anomalyd.drivers.plc.sim import SimulatedPlc


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inspections", type=int, default=10_000)
    parser.add_argument("--plc-restart-every", type=int, default=1000)
    parser.add_argument("--camera-timeout-every", type=int, default=500)
    parser.add_argument("--reload-every", type=int, default=2500)
    parser.add_argument("--baseline-after", type=int, default=300, help="take start RSS/fds/threads after this many")
    parser.add_argument("--work", type=Path, help="folder for bundle, data and logs (default: a temp folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from anomalyd.demo import prepare

    work = args.work or Path(tempfile.mkdtemp(prefix="anomalyd-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    sample, bundle = prepare(work / "demo")
    port = free_port()
    heartbeat_ms = 100
    good_config = {
        "camera": {
            "type": "simulated",
            "source": str(sample.resolve()),
            "faults": {"timeout_every": args.camera_timeout_every},
        },
        "plc": {"type": "s7", "port": port, "timeout_s": 0.3, "reconnect_max_s": 0.1},
        "model": {"bundle": str(bundle.resolve())},
        "daemon": {"data_dir": str((work / "data").resolve()), "heartbeat_ms": heartbeat_ms, "grab_timeout_ms": 100},
        "archive": {"quota_mb": 64},
        "metrics": {"port": 0},
        "logging": {"format": "json", "level": "warning"},
    }
    config = work / "soak.yaml"
    config.write_text(yaml.safe_dump(good_config), encoding="utf-8")
    log = (work / "daemon.log").open("w")
    plc = SimulatedPlc("s7", port=port)
    plc.start()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "anomalyd", "run", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT
    )
    if plc.wait_for(lambda s: s.ready, 120.0) is None:
        print("daemon never became ready; see", work / "daemon.log", file=sys.stderr)
        daemon.kill()
        return 2
    started = time.monotonic()
    baseline: dict[str, float] = {}
    reconnects: list[float] = []
    lost_triggers = 0
    done = 0
    last_id = plc.read_status().inspection_id
    while done < args.inspections:
        result = plc.inspect_once(timeout_s=5.0)
        if result is None:
            lost_triggers += 1
            continue
        done += 1
        last_id = result.status.inspection_id
        if done == args.baseline_after:
            baseline = proc_stats(daemon.pid)
        if done % args.plc_restart_every == 0 and done < args.inspections:
            plc.stop()
            time.sleep(2.0)  # the PLC is off for 20 heartbeat periods
            plc = SimulatedPlc("s7", port=port)
            plc.start()
            t0 = time.monotonic()
            if plc.wait_for(lambda s, i=last_id: s.ready and s.inspection_id == i, 30.0) is None:
                print("PLC restart not recovered within 30 s", file=sys.stderr)
                break
            reconnects.append(time.monotonic() - t0)
        if args.reload_every and done % args.reload_every == 0:
            config.write_text(config.read_text() + "thresholds:\n  image: -1\n", encoding="utf-8")
            daemon.send_signal(signal.SIGHUP)
            time.sleep(0.3)
            config.write_text(yaml.safe_dump(good_config), encoding="utf-8")
            daemon.send_signal(signal.SIGHUP)
        if done % 1000 == 0:
            print(f"{done} inspections, {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    end = proc_stats(daemon.pid)
    elapsed = time.monotonic() - started
    daemon.send_signal(signal.SIGTERM)
    exit_code = daemon.wait(timeout=10)
    plc.stop()

    with sqlite3.connect(work / "data" / "inspections.sqlite") as db:
        rows = db.execute(
            "SELECT inspection_id, error_code, latency_ms FROM inspections ORDER BY inspection_id"
        ).fetchall()
    ids = [r[0] for r in rows]
    codes = Counter(int(r[1]) for r in rows)
    latencies = np.array([r[2] for r in rows if r[1] == 0])
    lost = len(set(range(1, last_id + 1)) - set(ids))  # every id the PLC saw must have its row
    drift = (end["rss_mib"] - baseline["rss_mib"]) / baseline["rss_mib"] * 100 if baseline else float("nan")
    rejected = (work / "daemon.log").read_text().count('"reload.rejected"')
    report = {
        "inspections": done,
        "elapsed_s": round(elapsed, 1),
        "final_inspection_id": last_id,
        "sqlite_rows": len(rows),
        "results_lost": lost,
        "triggers_without_result": lost_triggers,
        "deadline_misses": codes.get(2, 0),
        "errors_by_code": {str(k): v for k, v in sorted(codes.items()) if k},
        "frame_to_result_ms": {
            "p50": round(float(np.percentile(latencies, 50)), 1),
            "p99": round(float(np.percentile(latencies, 99)), 1),
            "max": round(float(latencies.max()), 1),
        },
        "rss_mib": {
            "start": round(baseline.get("rss_mib", 0), 1),
            "end": round(end["rss_mib"], 1),
            "drift_pct": round(drift, 2),
        },
        "fds": {"start": baseline.get("fds"), "end": end["fds"]},
        "threads": {"start": baseline.get("threads"), "end": end["threads"]},
        "plc_restarts": len(reconnects),
        "reconnect_s": {
            "p50": round(float(np.median(reconnects)), 3) if reconnects else None,
            "max": round(max(reconnects), 3) if reconnects else None,
            "heartbeat_periods_max": round(max(reconnects) / (heartbeat_ms / 1000), 1) if reconnects else None,
        },
        "bad_reloads_rejected": rejected,
        "daemon_exit_code": exit_code,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    failed = lost != 0 or not drift < 5.0 or exit_code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
