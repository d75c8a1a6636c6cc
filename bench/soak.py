"""Soak: the real daemon for N inspections while the line misbehaves (a benchmark, not a test).

    python bench/soak.py [--inspections 10000] [--plc-restart-every 1000] [--camera-timeout-every 500]
                         [--stall-every 50] [--enable-toggle-every 200]

The daemon runs as a subprocess (`anomalyd run`) with the simulated camera; the
PLC is the simulated S7 PLC that `anomalyd plc-sim` runs, here in-process so the
schedule can stop and restart it. Fault schedule: the PLC server stopped for
2 s and restarted (DBs zeroed, as after a power cycle) every K inspections; a
camera timeout every M frames; every 2,500 inspections a bad YAML edit + SIGHUP,
then the good file restored + SIGHUP; every H grabs the camera driver hangs past
the deadline; every S parts the daemon is stopped
(SIGSTOP) while it inspects, for 1.5× the budget, and the next part is triggered
at once without waiting for ``trigger_ready``; every E parts ``enable`` is 0 for
one trigger.

Attribution, not counts: the PLC writes a fresh ``part_id`` with every trigger and
checks the answer it latches against it, and at the end against the record of
that inspection (its part_id, verdict, error code and the model's own verdict of
the frame). It prints misattributed answers and false passes (a pass that is not
the on-time OK verdict of the part's own frame) and exits non-zero if either is
above 0, a trigger went unanswered, a result was lost or RSS drifted more than 5 %.
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

from anomalyd.drivers.plc.layout import Status
from anomalyd.drivers.plc.sim import SimulatedPlc
from anomalyd.ports import free_port


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": int(fields["VmRSS"].split()[0]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def restart_plc(plc: SimulatedPlc, port: int) -> SimulatedPlc:
    """Power-cycle the PLC: off for 2 s (20 heartbeat periods), back with zeroed DBs."""
    plc.stop()
    time.sleep(2.0)
    fresh = SimulatedPlc("s7", port=port)
    fresh.next_part_id = plc.next_part_id
    fresh.start()
    return fresh


def stalled_inspection(
    plc: SimulatedPlc, daemon: subprocess.Popen[bytes], part_id: int, stop_s: float
) -> Status | None:
    """Trigger ``part_id``, SIGSTOP the daemon as soon as it is busy with it, SIGCONT after ``stop_s``."""
    if plc.wait_for(lambda s: s.trigger_ready and not s.trigger_ack, 5.0) is None:
        return None
    before = plc.read_status()
    plc.set_command(trigger=True, result_ack=False, part_id=part_id)
    if plc.wait_for(lambda s: s.busy or s.result_toggle != before.result_toggle, 2.0) is not None:
        daemon.send_signal(signal.SIGSTOP)
        time.sleep(stop_s)
        daemon.send_signal(signal.SIGCONT)
    status = plc.wait_for(lambda s: s.result_toggle != before.result_toggle and s.result_valid, 5.0)
    plc.set_command(trigger=False)
    if status is not None:
        plc.set_command(result_ack=True)
        plc.wait_for(lambda s: not s.result_valid, 1.0)
        plc.set_command(result_ack=False)
    return status


def check_attribution(
    answers: list[tuple[int, Status, str]], records: dict[int, dict[str, object]]
) -> dict[str, object]:
    """Each latched answer against the part it was triggered for and the record of its inspection."""
    misattributed = false_passes = late = refused = 0
    by_kind: Counter[str] = Counter()
    codes_by_kind: dict[str, Counter[int]] = {}
    for part_id, status, kind in answers:
        by_kind[kind] += 1
        codes_by_kind.setdefault(kind, Counter())[status.error_code] += 1
        row = records.get(status.inspection_id)
        if status.part_id != part_id or row is None or row["part_id"] != part_id:
            misattributed += 1
            continue
        if row["error_code"] != status.error_code or (row["verdict"] == "NG") != status.fail:
            misattributed += 1  # the record says something else than the PLC was told
            continue
        late += int(row["late"])  # type: ignore[call-overload]
        refused += int(row["refused"])  # type: ignore[call-overload]
        own_ok = row["late"] == 0 and row["refused"] == 0 and row["model_verdict"] in ("OK", "WARN")
        if status.passed and (status.error or not own_ok):
            false_passes += 1
    return {
        "answers_checked": len(answers),
        "misattributed": misattributed,
        "false_passes": false_passes,
        "late_results_recorded_not_published": late,
        "refused_triggers_answered": refused,
        "error_codes_by_schedule": {k: {str(c): n for c, n in sorted(v.items())} for k, v in codes_by_kind.items()},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inspections", type=int, default=10_000)
    parser.add_argument("--plc-restart-every", type=int, default=1000)
    parser.add_argument("--camera-timeout-every", type=int, default=500)
    parser.add_argument("--reload-every", type=int, default=2500)
    parser.add_argument("--stall-every", type=int, default=50, help="SIGSTOP the daemon mid-inspection (0: never)")
    parser.add_argument("--enable-toggle-every", type=int, default=200, help="enable = 0 for one trigger (0: never)")
    parser.add_argument("--budget-ms", type=float, default=100.0)
    parser.add_argument(
        "--hang-every", type=int, default=97, help="the camera driver hangs past the deadline every N grabs (0: never)"
    )
    parser.add_argument("--baseline-after", type=int, default=300, help="take start RSS/fds/threads after this many")
    parser.add_argument(
        "--memory",
        choices=["local", "global"],
        default="local",
        help="the sample part's bundle: position-aware (the demo's) or a global PatchCore bank (searched by faiss)",
    )
    parser.add_argument("--work", type=Path, help="folder for bundle, data and logs (default: a temp folder)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from anomalyd.demo import prepare

    work = args.work or Path(tempfile.mkdtemp(prefix="anomalyd-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    sample, bundle = prepare(work / "demo", args.memory)
    port = free_port()
    heartbeat_ms = 100
    good_config = {
        "camera": {
            "type": "simulated",
            "source": str(sample.resolve()),
            "faults": {
                "timeout_every": args.camera_timeout_every,
                "hang_every": args.hang_every,
                "hang_ms": 100 + 2 * args.budget_ms,  # past grab timeout + budget: the deadline answers
            },
        },
        "plc": {"type": "s7", "port": port, "timeout_s": 0.3, "reconnect_max_s": 0.1},
        "model": {"bundle": str(bundle.resolve())},
        "daemon": {
            "data_dir": str((work / "data").resolve()),
            "heartbeat_ms": heartbeat_ms,
            "grab_timeout_ms": 100,
            "budget_ms": args.budget_ms,
        },
        "archive": {"quota_mb": 64},
        "metrics": {"port": 0},
        "page": {"port": 0},
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
    unanswered = 0
    done = 0
    stalls = 0
    answers: list[tuple[int, Status, str]] = []  # part_id sent, answer latched, what the schedule did
    last_id = plc.read_status().inspection_id
    part_id = 0
    retrigger_now = False
    while done < args.inspections:
        part_id += 1
        stall = bool(args.stall_every) and done % args.stall_every == args.stall_every - 1
        disabled = (
            bool(args.enable_toggle_every) and done % args.enable_toggle_every == args.enable_toggle_every // 2 + 1
        )
        kind = "stall" if stall else "disabled" if disabled else "retrigger" if retrigger_now else "normal"
        if stall:
            status = stalled_inspection(plc, daemon, part_id, 1.5 * args.budget_ms / 1000.0)
            stalls += status is not None
        else:
            if disabled:
                plc.set_command(enable=False)
                plc.wait_for(lambda s: not s.trigger_ready, 1.0)
            result = plc.inspect_once(timeout_s=5.0, part_id=part_id, interlock=not (disabled or retrigger_now))
            if disabled:
                plc.set_command(enable=True)
            status = result.status if result is not None else None
        if status is None:
            unanswered += 1
            retrigger_now = False
            continue
        # After a stall or a deadline NG the next part is triggered at once, without waiting for
        # trigger_ready, as a fast line does: the late inspection may still be running.
        retrigger_now = stall or status.error_code == 2
        answers.append((part_id, status, kind))
        done += 1
        last_id = status.inspection_id
        if done == args.baseline_after:
            baseline = proc_stats(daemon.pid)
        if done % args.plc_restart_every == 0 and done < args.inspections:
            plc = restart_plc(plc, port)
            t0 = time.monotonic()

            def recovered(s: Status, i: int = last_id) -> bool:
                return s.ready and s.inspection_id == i

            if plc.wait_for(recovered, 30.0) is None:
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
        db.row_factory = sqlite3.Row
        records = {int(r["inspection_id"]): dict(r) for r in db.execute("SELECT * FROM inspections")}
    attribution = check_attribution(answers, records)
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
        "triggers_without_answer": unanswered,
        "stalls_injected": stalls,
        **attribution,
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
    failed = (
        lost != 0
        or unanswered != 0
        or attribution["misattributed"] != 0
        or attribution["false_passes"] != 0
        or not drift < 5.0
        or exit_code != 0
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
