"""SIGHUP: re-read the YAML, keep the old values on a bad edit, name what needs a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from anomalyd.config import RELOADABLE, AppConfig, config_hash
from anomalyd.config_loader import ConfigError, ConfigIssue, parse_config, read_config_text
from anomalyd.daemon.recipes import recipe_specs
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
        text = read_config_text(path)  # read once: the sections and the config come from the same bytes
        new = parse_config(text, str(path), path.parent.resolve())
        data = yaml.safe_load(text)
        now = frozenset(data) if isinstance(data, dict) else frozenset()
        gone = sorted(sections - now)
        if gone:
            issue = ConfigIssue(str(path), None, gone[0], "section missing, it was in the file (truncated?)")
            raise ConfigError([issue])
        merged = {name: getattr(new if name in RELOADABLE else current, name) for name in AppConfig.model_fields}
        try:
            # The merged whole, through every cross-field rule (e.g. model.default_recipe among the recipes).
            applied = AppConfig.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            key = ".".join(str(x) for x in err["loc"]) or "recipes"
            why = str(err["msg"]).removeprefix("Value error, ")
            raise ConfigError([ConfigIssue(str(path), None, key, f"{why} (with the values in force)")]) from None
    except (ConfigError, yaml.YAMLError, OSError) as exc:
        issues = exc.issues if isinstance(exc, ConfigError) else [ConfigIssue(str(path), None, "", str(exc))]
        for issue in issues:
            log.error("reload.rejected", issue=str(issue), file=issue.file, line=issue.line, key=issue.key)
        log.error("reload.kept_old_config", thresholds=current.thresholds.model_dump())
        return Reload(current, applied=False, sections=sections)
    restart = [
        name
        for name in AppConfig.model_fields
        if name not in RELOADABLE and getattr(new, name) != getattr(current, name)
    ]
    return Reload(applied, applied=True, needs_restart=restart, sections=now)


def reload_entries(
    old: AppConfig, new: AppConfig, bundles_in_use: dict[int, str]
) -> list[tuple[str, dict[str, object]]]:
    """What a reload from ``old`` to ``new`` would change, old → new, as audit entries (before it is applied).

    A pure function of the two configs and ``bundles_in_use`` (each loaded recipe's bundle
    folder as resolved when it was loaded, so a bundle link moved to another folder is audited).
    """
    entries: list[tuple[str, dict[str, object]]] = []
    new_hash = config_hash(new)
    before, now = old.thresholds.model_dump(), new.thresholds.model_dump()
    if now != before:
        changed = {k: {"old": before[k], "new": now[k]} for k in now if now[k] != before.get(k)}
        entries.append(("thresholds", {"changed": changed, "config_hash": new_hash}))
    old_recipes = {n: r.model_dump(mode="json") for n, r in old.recipes.items()}
    after = {n: r.model_dump(mode="json") for n, r in new.recipes.items()}
    _, specs = recipe_specs(new)
    moved = {
        n: {"old": bundles_in_use[n], "new": str(s.bundle.resolve())}
        for n, s in specs.items()
        if n in bundles_in_use and bundles_in_use[n] != str(s.bundle.resolve())
    }
    if after != old_recipes or moved:
        detail: dict[str, object] = {
            "added": sorted(set(after) - set(old_recipes)),
            "removed": sorted(set(old_recipes) - set(after)),
            "changed": {
                n: {"old": old_recipes[n], "new": after[n]}
                for n in after
                if n in old_recipes and after[n] != old_recipes[n]
            },
            "bundles_moved": moved,
            "config_hash": new_hash,
        }
        entries.append(("recipes", detail))
    return entries
