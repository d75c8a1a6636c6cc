"""CLI command of the daemon: run."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

# Exit status for a start-up the operator must fix (config, bundle, camera settings);
# the systemd unit does not restart on it (RestartPreventExitStatus=2), so a bad
# edit cannot become a crash loop.
EXIT_CONFIG = 2


def cmd_run(args: argparse.Namespace) -> int:
    from anomalyd.daemon.service import run_daemon
    from anomalyd.drivers.camera.base import CameraError
    from anomalyd.engines.base import EngineError
    from anomalyd.errors import StartupError
    from anomalyd.model.bundle import BundleError
    from anomalyd.model.signing import SignatureError

    try:
        return run_daemon(args.config)
    except (BundleError, CameraError, EngineError, SignatureError, StartupError) as exc:
        # One line a person can act on; systemd does not restart on 2 (RestartPreventExitStatus=2).
        print(f"anomalyd run: cannot start: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def add_daemon_commands(sub: Any) -> None:
    p = sub.add_parser("run", help="run the inspection daemon (systemd: Type=notify)")
    p.add_argument("--config", type=Path, default=Path("/etc/anomalyd/anomalyd.yaml"), help="config file")
    p.set_defaults(func=cmd_run)
