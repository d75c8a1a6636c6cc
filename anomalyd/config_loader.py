"""Reading the YAML: one loader used everywhere, errors that name file, line and key."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from anomalyd.config import AppConfig
from anomalyd.settings import resolve_paths


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file, located for a person to fix."""

    file: str
    line: int | None
    key: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where} {self.key}: {self.message}" if self.key else f"{where}: {self.message}"


class ConfigError(Exception):
    """The file is not a valid configuration; ``issues`` says where and why."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _index_lines(node: yaml.Node, path: tuple[str, ...], out: dict[tuple[str, ...], int]) -> None:
    """Map every key path of the YAML tree to its 1-based line number."""
    out.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*path, str(key.value))
            out[child] = key.start_mark.line + 1
            _index_lines(value, child, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _index_lines(value, (*path, str(i)), out)


def _duplicates(node: yaml.Node, path: tuple[str, ...], filename: str, out: list[ConfigIssue]) -> None:
    """A key written twice in one mapping: YAML keeps the last silently; we name both lines."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key, value in node.value:
            name, line = str(key.value), key.start_mark.line + 1
            if name in seen:
                where = ".".join((*path, name))
                out.append(ConfigIssue(filename, line, where, f"duplicate key (first at line {seen[name]})"))
            else:
                seen[name] = line
            _duplicates(value, (*path, name), filename, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            _duplicates(value, (*path, str(i)), filename, out)


def _locate(loc: tuple[Any, ...], data: Any) -> tuple[str, ...]:
    """Pydantic's error location → the key path as written in the YAML.

    Discriminated unions insert the tag (``plc.s7.host``) and some validators add
    a class name; segments that are not keys of the data are dropped.
    """
    path: list[str] = []
    node = data
    for part in loc:
        key = str(part)
        if isinstance(node, dict) and key in node:
            node = node[key]
            path.append(key)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            path.append(key)
        elif isinstance(node, dict) and (node.get("type") == key or key[:1].isupper() or "[" in key):
            continue  # a union tag or a model name
        else:
            path.append(key)  # an unknown key is reported at its own name
            node = None
    return tuple(path)


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be ≥ {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be ≤ {le}",
    "extra_forbidden": "unknown key (check the spelling; `anomalyd check-config --schema` lists the keys)",
    "missing": "required key is missing",
    "union_tag_invalid": "unknown type {tag} (one of: {expected_tags})",
    "union_tag_not_found": "needs a `type:` key (`anomalyd check-config --schema` lists the backends)",
}


def _num(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _message(err: Any) -> str:
    template = _MESSAGES.get(err["type"])
    ctx = {k: _num(v) for k, v in err.get("ctx", {}).items()}
    text = template.format(**ctx) if template else err["msg"]
    text = text.removeprefix("Value error, ")
    if err["type"] not in ("extra_forbidden", "missing", "union_tag_invalid") and not isinstance(
        err.get("input"), dict
    ):
        text += f" (got {err.get('input')!r})"
    return text


def parse_config(text: str, filename: str = "<config>", base_dir: Path | None = None) -> AppConfig:
    """Validate YAML text; raise :class:`ConfigError` naming line and key of each problem."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(filename, line, "", f"YAML syntax: {problem}")]) from None
    if data is None:
        # An empty file would mean "all defaults": a truncated or unsaved file must not reset thresholds.
        raise ConfigError(
            [ConfigIssue(filename, None, "", "the file is empty (truncated?); write at least one section")]
        )
    if not isinstance(data, dict) or root is None:
        raise ConfigError([ConfigIssue(filename, 1, "", "the file must be a mapping of sections")])
    duplicates: list[ConfigIssue] = []
    _duplicates(root, (), filename, duplicates)
    if duplicates:
        raise ConfigError(duplicates)
    lines: dict[tuple[str, ...], int] = {}
    _index_lines(root, (), lines)
    try:
        config = AppConfig.model_validate(data)
    except ValidationError as exc:
        issues = []
        for err in exc.errors():
            path = _locate(err["loc"], data)
            if err["type"] == "union_tag_invalid":
                path = (*path, "type")
            line = next((lines[path[:n]] for n in range(len(path), -1, -1) if path[:n] in lines), None)
            issues.append(ConfigIssue(filename, line, ".".join(path), _message(err)))
        raise ConfigError(issues) from None
    # Relative paths in the file are relative to its folder (every field typed ConfigPath).
    return resolve_paths(config, base_dir) if base_dir else config


def load_config(path: Path | str) -> AppConfig:
    """Read and validate a config file (the one loader used everywhere)."""
    path = Path(path)
    return parse_config(read_config_text(path), str(path), path.parent.resolve())


def read_config_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(path), None, "", f"cannot read: {exc.strerror}")]) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            [
                ConfigIssue(
                    str(path), line, "", f"not UTF-8 text (byte {exc.start}: {raw[exc.start]:#04x}); save as UTF-8"
                )
            ]
        ) from None


def config_sections(path: Path | str) -> set[str]:
    """The top-level sections written in the file (not those left to their defaults)."""
    data = yaml.safe_load(read_config_text(Path(path)))
    return set(data) if isinstance(data, dict) else set()
