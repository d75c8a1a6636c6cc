"""Harvesters buffer check: N frames from the GenTL producer, RSS and open fds before and after.

    python bench/camera_buffers.py [--frames 10000] [--cti PATH]

Uses the `viky.cti` producer that the genicam wheel ships unless --cti is given.
A buffer that was not re-queued would stall acquisition after the producer's
buffer count (a handful) and leak its memory; this prints both figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=10_000)
    parser.add_argument("--cti", type=Path)
    args = parser.parse_args()

    import genicam

    from anomalyd.drivers.camera.harvesters import HarvestersCamera, HarvestersCameraConfig

    cti = args.cti or Path(genicam.__file__).parent / "viky.cti"
    config = HarvestersCameraConfig(cti=[cti], nodes={"Width": 400, "Height": 400, "AcquisitionFrameRate": 100.0})
    camera = HarvestersCamera(config)
    camera.open()
    for _ in range(200):  # let the allocator and the producer settle
        camera.grab(3.0)
    start = {"rss_mib": rss_mib(), "fds": len(os.listdir("/proc/self/fd"))}
    t0 = time.monotonic()
    ids = set()
    for _ in range(args.frames):
        ids.add(camera.grab(3.0).frame_id)
    elapsed = time.monotonic() - t0
    end = {"rss_mib": rss_mib(), "fds": len(os.listdir("/proc/self/fd"))}
    camera.close()
    report = {
        "frames": args.frames,
        "distinct_frame_ids": len(ids),
        "seconds": round(elapsed, 1),
        "rss_mib": {"start": round(start["rss_mib"], 1), "end": round(end["rss_mib"], 1)},
        "fds": {"start": start["fds"], "end": end["fds"]},
    }
    print(json.dumps(report, indent=2))
    grew = end["rss_mib"] - start["rss_mib"] > 0.05 * start["rss_mib"] or end["fds"] != start["fds"]
    return 1 if grew or len(ids) != args.frames else 0


if __name__ == "__main__":
    sys.exit(main())
