"""SIGHUP: re-read the YAML, keep the old values on a bad edit, name what needs a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from anomalyd.config import RELOADABLE, AppConfig
from anomalyd.config_loader import ConfigError, ConfigIssue, config_sections, load_config
from anomalyd.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Reload:
    """The outcome of one reload: the config now in force and what could not be applied."""

    config: AppConfig
    applied: bool
    needs_restart: list[str] = field(default_factory=list)
    sections: frozenset[str] = frozenset()  # the sections written in the file now in force


def reload_config(path: Path, current: AppConfig, sections: frozenset[str] = frozenset()) -> Reload:
    """The reloadable sections of the file at ``path`` over ``current``; ``current`` on a bad edit.

    ``sections`` are those the file had when ``current`` was read: a section that
    has vanished since (a truncated or half-saved file) is refused rather than
    silently reset to its defaults.
    """
    try:
        new = load_config(path)
        now = frozenset(config_sections(path))
        gone = sorted(sections - now)
        if gone:
            issue = ConfigIssue(str(path), None, gone[0], "section missing, it was in the file (truncated?)")
            raise ConfigError([issue])
    except ConfigError as exc:
        for issue in exc.issues:
            log.error("reload.rejected", issue=str(issue), file=issue.file, line=issue.line, key=issue.key)
        log.error("reload.kept_old_config", thresholds=current.thresholds.model_dump())
        return Reload(current, applied=False, sections=sections)
    restart = [
        name
        for name in AppConfig.model_fields
        if name not in RELOADABLE and getattr(new, name) != getattr(current, name)
    ]
    applied = current.model_copy(update={name: getattr(new, name) for name in RELOADABLE})
    return Reload(applied, applied=True, needs_restart=restart, sections=now)
