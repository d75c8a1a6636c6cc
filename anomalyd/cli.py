"""The ``anomalyd`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from anomalyd import __version__
from anomalyd.cli_model import add_model_commands
from anomalyd.config import AppConfig
from anomalyd.config_loader import ConfigError, load_config
from anomalyd.errors import StartupError


class UsageError(Exception):
    """A problem with what was asked on the command line: printed, exit 2."""


def progress_bars(label: str, total: int) -> Callable[[int], None]:
    """A tqdm bar on stderr (quiet when stderr is not a terminal, to keep logs clean)."""
    from tqdm import tqdm

    bar = tqdm(
        total=total, desc=label, unit="img" if label != "coreset" else "pt", leave=True, disable=None, file=sys.stderr
    )

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance


def cmd_check_config(args: argparse.Namespace) -> int:
    if args.schema:
        print(json.dumps(AppConfig.model_json_schema(by_alias=True), indent=2))
        return 0
    if args.file is None:
        raise UsageError("check-config needs FILE (or --schema)")
    load_config(args.file)
    print(f"{args.file}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomalyd",
        description="Inspect every part on a line and tell the PLC pass or fail (PatchCore anomaly detection).",
    )
    parser.add_argument("--version", action="version", version=f"anomalyd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check-config", help="validate a YAML config; exit 0 if valid, 2 with file:line key: why")
    p.add_argument("file", type=Path, nargs="?", help="config file")
    p.add_argument("--schema", action="store_true", help="print the JSON schema of the config (every key)")
    p.set_defaults(func=cmd_check_config)

    add_model_commands(sub, progress_bars)
    from anomalyd.cli_plc import add_plc_commands

    add_plc_commands(sub)
    from anomalyd.cli_daemon import add_daemon_commands

    add_daemon_commands(sub)
    from anomalyd.cli_lifecycle import add_lifecycle_commands

    add_lifecycle_commands(sub)
    from anomalyd.cli_signing import add_signing_commands

    add_signing_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":  # the daemon configures logging from its YAML
        from anomalyd.log import configure_logging

        # Tools keep stdout for their results; notes such as the engine chosen go to stderr.
        configure_logging("info", "console", stream=sys.stderr)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return 2
    except StartupError as exc:  # something a person must fix first: not worth a retry (systemd stops)
        print(f"anomalyd {args.command}: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"anomalyd {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the boundary: one clear line, no traceback, for known failures
        from anomalyd.errors import KNOWN_ERRORS

        if isinstance(exc, KNOWN_ERRORS):
            print(f"anomalyd {args.command}: {exc}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
