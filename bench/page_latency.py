"""Does the operator page cost the line anything? Frame-to-result p99 with and without it.

    python bench/page_latency.py [--parts 600] [--clients 200] [--json FILE]

The real daemon as a subprocess, the simulated S7 PLC triggering as fast as the
handshake allows, the simulated camera. Phases alternate (page closed, page open,
closed, open; --parts parts each): while "open", a client holds the page's event
stream and, like the browser, fetches the heatmap and the thumbnail of every
result, and ``--clients`` more hold event streams the way browsers' EventSource
does (reconnecting 3 s after a refusal; beyond ``page.max_clients`` the daemon
answers 503). The figure is the daemon's own frame-to-result time
(``latency_ms`` in the status block) of error-free parts, and the deadline
misses (code 2) per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import socket
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


class StreamSwarm(threading.Thread):
    """Many EventSource clients in one thread: hold /api/events, read and drop; retry 3 s after a refusal."""

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port, self.count = port, count
        self.stop = threading.Event()
        self.served = 0
        self.refused = 0
        self.bytes = 0

    def _open(self, sel: selectors.BaseSelector) -> None:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        s.sendall(b"GET /api/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n")
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ, {"head": b"", "counted": False})

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        retry_at: list[float] = []
        for _ in range(self.count):
            self._open(sel)
        while not self.stop.is_set():
            now = time.monotonic()
            for t in [t for t in retry_at if t <= now]:
                retry_at.remove(t)
                self._open(sel)
            for key, _ in sel.select(0.2):
                s, state = key.fileobj, key.data
                try:
                    chunk = s.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                self.bytes += len(chunk)
                if not state["counted"] and chunk:
                    state["counted"] = True
                    if chunk.startswith(b"HTTP/1.1 200"):
                        self.served += 1
                    else:
                        self.refused += 1
                if not chunk or chunk.startswith(b"HTTP/1.1 503"):
                    sel.unregister(s)
                    s.close()  # type: ignore[union-attr]
                    retry_at.append(time.monotonic() + 3.0)
        for key in list(sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=600, help="parts per phase (4 phases)")
    parser.add_argument("--clients", type=int, default=200, help="more event-stream clients while the page is open")
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
    misses = {"closed": 0, "open": 0}
    clients = []
    swarms: list[StreamSwarm] = []
    for phase in ("closed", "open", "closed", "open"):
        client = None
        if phase == "open":
            client = PageClient(f"http://127.0.0.1:{page_port}")
            client.start()
            clients.append(client)
            time.sleep(0.5)
            swarm = StreamSwarm(page_port, args.clients)
            swarm.start()
            swarms.append(swarm)
            time.sleep(1.0)
        for _ in range(args.parts):
            res = plc.inspect_once(10.0)
            if res is not None and res.status.error_code == 0:
                phases[phase].append(res.status.latency_ms)
            elif res is not None and res.status.error_code == 2:
                misses[phase] += 1
        if client is not None:
            client.stop.set()
            swarms[-1].stop.set()
            swarms[-1].join(5)
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
        "deadline_misses": misses,
        "extra_clients": args.clients,
        "streams_served": sum(w.served for w in swarms),
        "streams_refused_503": sum(w.refused for w in swarms),
        "results_streamed": sum(c.results for c in clients),
        "images_fetched": sum(c.images for c in clients),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0 if ratio <= 1.10 and misses["open"] <= misses["closed"] else 1


if __name__ == "__main__":
    sys.exit(main())
