"""Recipe switch time and memory per loaded recipe (a benchmark, not a test).

    python bench/recipe_switch.py [--switches 50] [--recipes 4] [--json FILE]

The real daemon as a subprocess with the simulated S7 PLC (in-process) and the
simulated camera, on the sample part's bundle (the demo's). It measures:

* preloaded switch: the PLC writes a new ``recipe_request``; time until the
  status block shows that recipe with ``trigger_ready`` = 1 (includes the PLC
  poll, 5 ms), and the frame-to-result time of the first part after a switch
  against parts without one;
* cold switch: a recipe added by a reload (SIGHUP) with a bundle not loaded yet;
  time from the signal until it can be triggered;
* memory: the daemon's RSS with 1 recipe and with ``--recipes`` recipes loaded
  (each recipe holds its own extractor session and memory bank).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from anomalyd.drivers.plc.layout import Status
from anomalyd.drivers.plc.sim import SimulatedPlc
from anomalyd.ports import free_port


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(
    work: Path, sample: Path, recipes: dict[str, dict[str, object]]
) -> tuple[subprocess.Popen[bytes], SimulatedPlc, Path]:
    port = free_port()
    plc = SimulatedPlc("s7", port=port)
    plc.start()
    config = {
        "camera": {"type": "simulated", "source": str(sample)},
        "plc": {"type": "s7", "port": port},
        "model": {"default_recipe": 1},
        "recipes": recipes,
        "daemon": {"data_dir": str(work / "data"), "heartbeat_ms": 100},
        "metrics": {"enabled": False},
        "page": {"enabled": False},
        "logging": {"format": "json", "level": "warning"},
    }
    path = work / "recipes.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    log = (work / "daemon.log").open("a")
    proc = subprocess.Popen([sys.executable, "-m", "anomalyd", "run", "--config", str(path)], stdout=log, stderr=log)
    if plc.wait_for(lambda s: s.ready, 120.0) is None:
        proc.kill()
        raise SystemExit(f"daemon not ready; see {work / 'daemon.log'}")
    time.sleep(1.0)  # let RSS settle after warm-up
    return proc, plc, path


def stop(proc: subprocess.Popen[bytes], plc: SimulatedPlc) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)
    plc.stop()


def pct(values: list[float]) -> dict[str, float]:
    return {"p50": round(float(np.percentile(values, 50)), 2), "p99": round(float(np.percentile(values, 99)), 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--switches", type=int, default=50)
    parser.add_argument("--recipes", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from anomalyd.demo import prepare

    work = Path(tempfile.mkdtemp(prefix="anomalyd-recipes-"))
    sample, bundle = prepare(work / "demo")
    sample = (sample / "test").resolve()
    copies = []
    for i in range(args.recipes + 1):  # a folder per recipe: each loads its own bundle
        copy = work / f"bundle{i}"
        shutil.copytree(bundle, copy)
        copies.append(copy.resolve())

    def recipe(i: int, image: float | None = None) -> dict[str, object]:
        r: dict[str, object] = {"name": f"variant {i}", "bundle": str(copies[i - 1])}
        if image is not None:
            r["thresholds"] = {"image": image}
        return r

    # Memory: one recipe, then N recipes.
    proc, plc, _ = start(work, sample, {"1": recipe(1)})
    one = rss_mib(proc.pid)
    stop(proc, plc)
    many_recipes = {str(i): recipe(i) for i in range(1, args.recipes + 1)}
    proc, plc, path = start(work, sample, many_recipes)
    many = rss_mib(proc.pid)

    # Preloaded switches, alternating 1 and 2, each followed by one part; and parts without a switch.
    switch_ms, first_part_ms, same_ms = [], [], []
    current = 1
    for i in range(args.switches):
        for _ in range(2):
            res = plc.inspect_once(10.0, recipe=current)
            if res is not None and res.status.error_code == 0:
                same_ms.append(res.status.latency_ms)
        target = 2 if current == 1 else 1
        t0 = time.perf_counter()
        plc.set_command(recipe_request=target)

        def switched(s: Status, t: int = target) -> bool:
            return s.recipe == t and s.trigger_ready

        if plc.wait_for(switched, 10.0) is None:
            print(f"switch {i} to {target} not done in 10 s", file=sys.stderr)
            return 1
        switch_ms.append((time.perf_counter() - t0) * 1000)
        res = plc.inspect_once(10.0, recipe=target)
        if res is not None and res.status.error_code == 0:
            first_part_ms.append(res.status.latency_ms)
        current = target

    # Cold: a reload adds a recipe whose bundle is not loaded yet.
    new = args.recipes + 1
    raw = yaml.safe_load(path.read_text())
    raw["recipes"][str(new)] = recipe(new)
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    plc.set_command(recipe_request=new)
    t0 = time.perf_counter()
    proc.send_signal(signal.SIGHUP)
    ok = plc.wait_for(lambda s: s.recipe == new and s.trigger_ready, 60.0)
    cold_ms = (time.perf_counter() - t0) * 1000 if ok else float("nan")
    cold_part = plc.inspect_once(10.0, recipe=new)
    stop(proc, plc)

    report = {
        "machine": f"{os.cpu_count()} cores",
        "preloaded_switch_ms": pct(switch_ms),
        "first_part_after_switch_ms": pct(first_part_ms),
        "parts_without_switch_ms": pct(same_ms),
        "cold_switch_ms": round(cold_ms, 1),
        "cold_first_part_ok": bool(cold_part and cold_part.status.error_code == 0),
        "rss_mib": {"1_recipe": round(one, 1), f"{args.recipes}_recipes": round(many, 1)},
        "rss_per_added_recipe_mib": round((many - one) / (args.recipes - 1), 1),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
