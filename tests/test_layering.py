"""Imports flow one way (docs/development.md): a module that reaches upwards fails here, not in review."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "anomalyd"

# Who may not import whom: the model knows no engine, no training, no daemon; engines know no daemon;
# drivers know neither the model nor the daemon; nothing but the daemon itself and the CLI imports the daemon.
FORBIDDEN = {
    "model": ("anomalyd.engines", "anomalyd.training", "anomalyd.daemon", "anomalyd.cli"),
    "engines": ("anomalyd.training", "anomalyd.daemon", "anomalyd.cli"),
    "drivers": ("anomalyd.daemon", "anomalyd.engines", "anomalyd.training", "anomalyd.cli"),
    "training": ("anomalyd.daemon", "anomalyd.cli"),
    "evaluation": ("anomalyd.daemon", "anomalyd.cli"),
}


def _imports(path: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return names


def test_imports_flow_one_way() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        room = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        banned = FORBIDDEN.get(room, ())
        if room not in ("daemon",) and not room.startswith("cli"):
            banned = (*banned, "anomalyd.daemon")
        for name in _imports(path):
            if name.startswith(banned):
                wrong.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not wrong, "\n".join(wrong)
