"""Structured logging: JSON lines for journald, readable lines on a terminal."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog once per process; safe to call again on reload.

    Third-party loggers (asyncua, pymodbus, asyncio) and uncaught exceptions in
    threads go through the same renderer: in JSON mode every line is JSON, a
    traceback is the ``exception`` field of its line.
    """
    stream = stream or sys.stdout
    json_lines = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    _route_stdlib(renderer, stream, _LEVELS[level])
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (print() makes two): a line from another writer on the
        # same file (stderr's record.unwritten) can then never land inside it.
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> Any:
    """The one logger factory used everywhere: ``get_logger(__name__)``."""
    return structlog.get_logger(logger_name=name)


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The one handler of the root logger (replaced, not added again, on reload)."""


def _route_stdlib(renderer: Any, stream: TextIO, level: int) -> None:
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    handler = _Handler(stream)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    # Libraries speak at warning and above (asyncua's info lines are per request); ours as configured.
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)

    def thread_hook(args: Any) -> None:
        logging.getLogger("anomalyd.thread").error(
            "thread.uncaught_exception",
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
            extra={"thread_name": getattr(args.thread, "name", None)},
        )

    threading.excepthook = thread_hook
