"""The YAML loader: valid defaults, and errors that name file, line and key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from anomalyd.config import S7Config
from anomalyd.config_loader import ConfigError, load_config, parse_config
from tests.conftest import ANOMALYD

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "config" / "anomalyd.yaml"


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "line.yaml")
    return [str(i) for i in err.value.issues]


def test_default_config_is_valid() -> None:
    config = load_config(DEFAULT)
    assert isinstance(config.plc, S7Config)
    assert config.metrics.host == "127.0.0.1"
    assert config.daemon.budget_ms == 100
    # relative paths resolve against the file's folder
    assert config.model.bundle.is_absolute()


def test_example_configs_are_valid() -> None:
    examples = sorted((ROOT / "config" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        load_config(path)


def test_unknown_key_names_line_and_key() -> None:
    text = "camera:\n  type: simulated\n  sorce: foo\n"
    assert issues(text) == [
        "line.yaml:3 camera.sorce: unknown key (check the spelling; `anomalyd check-config --schema` lists the keys)"
    ]


def test_negative_threshold_names_line_and_key() -> None:
    text = "thresholds:\n  warn: 0.5\n\n  image: -1\n"
    assert issues(text) == ["line.yaml:4 thresholds.image: must be > 0 (got -1)"]


def test_wrong_type_inside_a_union_section() -> None:
    text = "plc:\n  type: s7\n  host: 10.0.0.5\n  port: seven\n"
    (line,) = issues(text)
    assert line.startswith("line.yaml:4 plc.port: ") and "'seven'" in line


def test_out_of_range_and_several_errors_at_once() -> None:
    text = "daemon:\n  heartbeat_ms: 10\nmetrics:\n  port: 70000\n"
    assert issues(text) == [
        "line.yaml:2 daemon.heartbeat_ms: must be ≥ 50 (got 10)",
        "line.yaml:4 metrics.port: must be ≤ 65535 (got 70000)",
    ]


def test_unknown_backend_type() -> None:
    (line,) = issues("plc:\n  type: profinet\n")
    assert line.startswith("line.yaml:2 plc") and "profinet" in line


def test_broken_yaml_syntax_names_line() -> None:
    (line,) = issues("camera:\n  type: simulated\n   source: [unclosed\n")
    assert line.startswith("line.yaml:3") and "YAML syntax" in line


def test_cross_field_rule() -> None:
    (line,) = issues("thresholds:\n  image: 1.0\n  warn: 1.2\n")
    assert line == "line.yaml:1 thresholds: warn (1.2) must be below image (1.0)"


def test_overlapping_plc_layout_is_rejected() -> None:
    (line,) = issues("plc:\n  type: s7\n  status_layout:\n    score: 4\n")
    assert line.startswith("line.yaml:3 plc.status_layout") and "overlaps" in line


def test_check_config_cli(tmp_path: Path) -> None:
    ok = subprocess.run([*ANOMALYD, "check-config", str(DEFAULT)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    text = DEFAULT.read_text()
    typo = tmp_path / "typo.yaml"
    typo.write_text(text.replace("  budget_ms: 100", "  budget_msec: 100"))
    bad = subprocess.run([*ANOMALYD, "check-config", str(typo)], capture_output=True, text=True)
    assert bad.returncode == 2
    line = next(i for i, t in enumerate(text.splitlines(), 1) if t.startswith("  budget_ms:"))
    assert f"{typo}:{line} daemon.budget_msec: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr
    negative = tmp_path / "negative.yaml"
    negative.write_text(text.replace("  image:   ", "  image: -1"))
    bad = subprocess.run([*ANOMALYD, "check-config", str(negative)], capture_output=True, text=True)
    assert bad.returncode == 2
    assert "thresholds.image: must be > 0 (got -1)" in bad.stderr


def test_schema_documents_every_field() -> None:
    out = subprocess.run([*ANOMALYD, "check-config", "--schema"], capture_output=True, text=True, check=True)
    schema = json.loads(out.stdout)
    undocumented = []
    for name, definition in schema["$defs"].items():
        for field, prop in definition.get("properties", {}).items():
            if field != "type" and "Layout" not in name and not prop.get("description"):
                undocumented.append(f"{name}.{field}")
    assert undocumented == []


@pytest.mark.parametrize(
    "command", ["fit", "score", "eval", "build-engine", "plc-layout", "plc-sim", "run", "check-config"]
)
def test_cli_help(command: str) -> None:
    out = subprocess.run([*ANOMALYD, command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: anomalyd" in out.stdout


def test_json_log_lines_parse() -> None:
    code = (
        "from anomalyd.log import configure_logging, get_logger\n"
        "configure_logging('info', 'json')\n"
        "get_logger('t').info('inspection', id=3, verdict='NG')\n"
        "get_logger('t').debug('hidden')\n"
    )
    out = subprocess.run([ANOMALYD[0], "-c", code], capture_output=True, text=True, check=True)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(lines) == 1
    assert lines[0]["event"] == "inspection" and lines[0]["id"] == 3 and lines[0]["level"] == "info"


def test_plc_trigger_without_a_plc_is_rejected() -> None:
    (line,) = issues("plc:\n  type: none\n")
    assert "daemon.trigger plc needs a PLC" in line
