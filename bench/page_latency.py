"""Does the operator page cost the line anything? Frame-to-result p99 with and without it.

    python bench/page_latency.py [--parts 600] [--json FILE]

The real daemon as a subprocess, the simulated S7 PLC triggering as fast as the
handshake allows, the simulated camera. Phases alternate (page closed, page open,
closed, open; --parts parts each): while "open", a client holds the page's event
stream and, like the browser, fetches the heatmap and the thumbnail of every
result. The figure is the daemon's own frame-to-result time (``latency_ms`` in
the status block) of error-free parts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

from anomalyd.drivers.plc.sim import SimulatedPlc
from anomalyd.ports import free_port


class PageClient(threading.Thread):
    """What a browser does: hold /api/events, fetch the overlay and thumbnail of each result."""

    def __init__(self, base: str) -> None:
        super().__init__(daemon=True)
        self.base = base
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.stop = threading.Event()
        self.results = 0
        self.images = 0

    def run(self) -> None:
        with self.opener.open(self.base + "/api/events", timeout=30) as stream:
            event = ""
            for raw in stream:
                if self.stop.is_set():
                    return
                line = raw.decode().strip()
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event == "result":
                    item = json.loads(line[6:])
                    self.results += 1
                    if item.get("has_image"):
                        for kind in ("overlay", "thumb"):
                            url = f"{self.base}/api/image/{item['inspection_id']}/{kind}.jpg"
                            try:
                                self.opener.open(url, timeout=5).read()
                                self.images += 1
                            except OSError:
                                pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=600, help="parts per phase (4 phases)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from anomalyd.demo import prepare

    work = Path(tempfile.mkdtemp(prefix="anomalyd-page-"))
    sample, bundle = prepare(work / "demo")
    port, page_port = free_port(), free_port()
    config = {
        "camera": {"type": "simulated", "source": str((sample / "test").resolve())},
        "plc": {"type": "s7", "port": port},
        "model": {"bundle": str(bundle.resolve())},
        "daemon": {"data_dir": str(work / "data")},
        "archive": {"enabled": False},
        "metrics": {"enabled": False},
        "page": {"port": page_port},
        "logging": {"format": "json", "level": "warning"},
    }
    path = work / "page.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    plc = SimulatedPlc("s7", port=port)
    plc.start()
    log = (work / "daemon.log").open("w")
    daemon = subprocess.Popen([sys.executable, "-m", "anomalyd", "run", "--config", str(path)], stdout=log, stderr=log)
    if plc.wait_for(lambda s: s.ready, 120.0) is None:
        daemon.kill()
        print("daemon not ready", file=sys.stderr)
        return 2
    for _ in range(30):  # warm-up
        plc.inspect_once(10.0)
    phases: dict[str, list[float]] = {"closed": [], "open": []}
    clients = []
    for phase in ("closed", "open", "closed", "open"):
        client = None
        if phase == "open":
            client = PageClient(f"http://127.0.0.1:{page_port}")
            client.start()
            clients.append(client)
            time.sleep(0.5)
        for _ in range(args.parts):
            res = plc.inspect_once(10.0)
            if res is not None and res.status.error_code == 0:
                phases[phase].append(res.status.latency_ms)
        if client is not None:
            client.stop.set()
    daemon.send_signal(signal.SIGTERM)
    daemon.wait(timeout=20)
    plc.stop()

    def pct(v: list[float]) -> dict[str, float]:
        return {"p50": round(float(np.percentile(v, 50)), 2), "p99": round(float(np.percentile(v, 99)), 2)}

    closed, opened = pct(phases["closed"]), pct(phases["open"])
    ratio = round(opened["p99"] / closed["p99"], 3)
    report = {
        "machine": f"{os.cpu_count()} cores",
        "parts_per_state": {k: len(v) for k, v in phases.items()},
        "page_closed_ms": closed,
        "page_open_streaming_ms": opened,
        "p99_ratio_open_over_closed": ratio,
        "results_streamed": sum(c.results for c in clients),
        "images_fetched": sum(c.images for c in clients),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if ratio <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
