"""`make demo`: the whole product on one machine, no hardware.

Generates the synthetic sample part, fits a bundle on its good images, starts a
simulated S7 PLC on loopback, runs the real daemon as a subprocess with the
simulated camera, shows every inspection as the PLC sees it, and stops by itself.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

import yaml

from anomalyd.drivers.plc.sim import SIDES, SimResult, SimulatedPlc
from anomalyd.ports import free_port


def prepare(root: Path, memory: Literal["local", "global"] = "local") -> tuple[Path, Path]:
    """Sample data and a fitted bundle under ``root`` (reused when already there).

    ``memory="global"`` fits a PatchCore bank instead (searched by ``search: auto``:
    faiss where installed), for benchmarks that exercise that search.
    """
    from anomalyd.sample import write_sample
    from anomalyd.training.fit import FitSettings, fit

    sample, validation = root / "sample", root / "validation"
    bundle = root / ("bundle" if memory == "local" else f"bundle-{memory}")
    if not (sample / "test").is_dir():
        print(f"· generating the sample part → {sample}")
        write_sample(sample, train=40, test_good=10, per_defect=4, seed=0)
        write_sample(validation, train=0, test_good=6, per_defect=2, seed=1)
    if not (bundle / "manifest.json").is_file():
        # The sample part sits in a nest (its ink mark is always at 3 o'clock): a position-aware
        # memory catches a missing or moved mark, which a global PatchCore bank lets through.
        kind = "position-aware" if memory == "local" else memory
        print(f"· fitting a {kind} bundle on {sample / 'train' / 'good'} (threshold from {validation})")
        from anomalyd.evaluation.dataset import labelled_images

        manifest = fit(sample / "train" / "good", bundle, FitSettings(memory=memory), labelled_images(validation))
        print(
            f"  bundle {manifest['bundle_id']}: {manifest['memory_bank_size']} memory patches, "
            f"fit {manifest['fit_seconds']} s"
        )
    return sample, bundle


def write_config(root: Path, sample: Path, bundle: Path, plc_port: int, page_port: int, protocol: str = "s7") -> Path:
    """Two recipes of the sample part: 1 at the bundle's threshold, 2 stricter (10 % lower)."""
    from anomalyd.model.bundle import load_bundle

    suggested = load_bundle(bundle).suggested_threshold
    config = {
        "camera": {"type": "simulated", "source": str(sample.resolve()), "order": "sequential"},
        "plc": {"type": SIDES[protocol].link, "host": "127.0.0.1", "port": plc_port},
        "model": {"bundle": str(bundle.resolve()), "default_recipe": 1},
        "recipes": {
            1: {"name": "washer, standard", "bundle": str(bundle.resolve())},
            2: {
                "name": "washer, strict",
                "bundle": str(bundle.resolve()),
                "thresholds": {"image": round(0.9 * suggested, 4)},
            },
        },
        "page": {"host": "127.0.0.1", "port": page_port},
        "daemon": {"trigger": "plc", "data_dir": str((root / "data").resolve()), "heartbeat_ms": 250},
        "metrics": {"enabled": True, "host": "127.0.0.1", "port": 0},
        "logging": {"level": "warning", "format": "json"},
    }
    path = root / "anomalyd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def lookup_source(db: Path, inspection_id: int) -> str:
    """Which sample file the daemon inspected for this id (from its records)."""
    for _ in range(50):
        try:
            with sqlite3.connect(str(db), timeout=1.0) as conn:
                row = conn.execute(
                    "SELECT source FROM inspections WHERE inspection_id = ?", (inspection_id,)
                ).fetchone()
        except sqlite3.Error:
            row = None
        if row:
            return str(row[0] or "")
        time.sleep(0.02)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anomalyd-demo", description=__doc__)
    parser.add_argument("--root", type=Path, default=Path("var/demo"))
    parser.add_argument("--parts", type=int, default=0, help="inspections to run (default: every sample image twice)")
    parser.add_argument("--every-ms", type=float, default=150.0, help="PLC trigger period")
    parser.add_argument(
        "--plc",
        choices=["s7", "opcua"],
        default=os.environ.get("DEMO_PLC", "s7"),
        help="s7: a simulated S7 PLC serves the DBs; opcua: the daemon serves OPC UA and the PLC is its client",
    )
    args = parser.parse_args(argv)

    root = args.root
    root.mkdir(parents=True, exist_ok=True)
    sample, bundle = prepare(root)
    parts = args.parts or 2 * sum(1 for _ in (sample / "test").rglob("*.png"))
    plc_port, page_port = free_port(), free_port()
    config = write_config(root, sample, bundle, plc_port, page_port, args.plc)

    plc = SimulatedPlc(args.plc, port=plc_port)
    plc.start()
    where = (
        f"simulated S7 PLC on 127.0.0.1:{plc_port}"
        if args.plc == "s7"
        else f"daemon serves OPC UA on opc.tcp://127.0.0.1:{plc_port}/anomalyd; the simulated PLC is its client"
    )
    print(f"· {where}; starting the daemon: anomalyd run --config {config}")
    print(f"· operator page: http://127.0.0.1:{page_port}/ (open it while the demo runs)")
    print(f"· the PLC runs recipe 1 (standard) for the first {parts // 2} parts, then switches to recipe 2 (strict)")
    daemon = subprocess.Popen([sys.executable, "-m", "anomalyd", "run", "--config", str(config)])
    db = root / "data" / "inspections.sqlite"
    seen: dict[str, int] = {"right": 0, "wrong": 0, "misattributed": 0}
    latencies: list[float] = []

    def show(result: SimResult | None) -> None:
        if result is None:
            print("   (no result within 5 s)")
            return
        s = result.status
        source = lookup_source(db, s.inspection_id)
        truth = Path(source).parent.name if source else "?"
        verdict = "OK" if s.passed else "NG"
        expected = "OK" if truth == "good" else "NG"
        mark = "✓" if verdict == expected else "✗"
        if not result.attributed:  # the answer names another part: never expected, always shown
            mark = f"✗ answer of part {s.part_id}"
            seen["misattributed"] += 1
        seen["right" if verdict == expected else "wrong"] += 1
        latencies.append(s.latency_ms)
        print(
            f"{s.inspection_id:>5} {result.part_id:>6} {recipe_of(result.part_id):>6}  {verdict:<3} {mark}  "
            f"{s.score:7.3f}  {s.latency_ms:7.1f} ms  "
            f"{truth:<8} {Path(source).name}",
            flush=True,
        )

    def recipe_of(part_id: int) -> int:
        return 1 if part_id <= parts // 2 else 2

    stop = threading.Event()
    try:
        print(f"{'id':>5} {'part':>6} {'recipe':>6}  verdict  {'score':>6}  {'latency':>10}  image")
        received = plc.run(args.every_ms, show, stop, count=parts, wait_ready_s=120.0, recipe_for=recipe_of)
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = -9
        plc.stop()
    if received == 0:
        print("the daemon never became ready; see its log above", file=sys.stderr)
        return 1
    lat = sorted(latencies)
    p50 = lat[len(lat) // 2]
    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
    archive = (root / "data" / "archive").resolve()
    print(
        f"\n{received} inspections: {seen['right']} verdicts as expected, {seen['wrong']} not, "
        f"{seen['misattributed']} answers naming another part; "
        f"frame-to-result p50 {p50:.1f} ms, p99 {p99:.1f} ms; daemon exit code {code}"
    )
    print(f"records: {db.resolve()}\nheatmaps of NG parts: {archive}")
    return 0 if code == 0 and seen["misattributed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
