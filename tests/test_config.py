"""The YAML loader: valid defaults, and errors that name file, line and key."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from anomalyd.config_loader import ConfigError, load_config, parse_config
from anomalyd.drivers.plc.s7 import S7Config
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


@pytest.mark.e2e
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


@pytest.mark.e2e
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
@pytest.mark.e2e
def test_cli_help(command: str) -> None:
    out = subprocess.run([*ANOMALYD, command, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "usage: anomalyd" in out.stdout


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_log_lines_and_unwritten_records_never_share_a_line(tmp_path: Path) -> None:
    """Under systemd or the tests stdout and stderr are often one file: each line is one write."""
    code = (
        "import threading\n"
        "from anomalyd.log import configure_logging, get_logger\n"
        "from anomalyd.daemon.records import Record, write_unwritten\n"
        "configure_logging('info', 'json')\n"
        "def logs():\n"
        "    for i in range(3000): get_logger('t').info('inspection', id=i, pad='x' * 200)\n"
        "def spills():\n"
        "    for i in range(3000): write_unwritten(Record(i, 0, 'NG', 2.0, 1.0, 0, *[None] * 9, 'b', 'c', i))\n"
        "ts = [threading.Thread(target=f) for f in (logs, spills, logs)]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
    )
    log = tmp_path / "out.log"
    with log.open("a") as fh:
        subprocess.run([ANOMALYD[0], "-c", code], stdout=fh, stderr=subprocess.STDOUT, check=True, cwd=ROOT)
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events.count("inspection") == 6000 and events.count("record.unwritten") == 3000


def test_plc_trigger_without_a_plc_is_rejected() -> None:
    (line,) = issues("plc:\n  type: none\n")
    assert "daemon.trigger plc needs a PLC" in line


def test_duplicate_keys_name_both_lines() -> None:
    text = "thresholds:\n  image: 1.2\n  warn: 1.0\n  image: 5\n"
    assert issues(text) == ["line.yaml:4 thresholds.image: duplicate key (first at line 2)"]
    assert issues("daemon: {budget_ms: 80}\nthresholds: {}\ndaemon: {}\n") == [
        "line.yaml:3 daemon: duplicate key (first at line 1)"
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "# thresholds:\n#   image: 1.2\n"])
def test_empty_or_comment_only_file_is_refused(text: str) -> None:
    assert issues(text) == ["line.yaml: the file is empty (truncated?); write at least one section"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("thresholds:\n  image: .inf\n", "line.yaml:2 thresholds.image: Input should be a finite number"),
        ("thresholds:\n  image: .nan\n", "line.yaml:2 thresholds.image: Input should be a finite number"),
        ("daemon:\n  budget_ms: 1e999\n", "line.yaml:2 daemon.budget_ms: Input should be a finite number"),
        ("daemon:\n  heartbeat_ms: 1" + "0" * 40 + "\n", "line.yaml:2 daemon.heartbeat_ms: must be ≤ 60000"),
        ("daemon:\n  records_retention_days: 200000\n", "line.yaml:2 daemon.records_retention_days: must be ≤ 36500"),
        ("thresholds:\n  image: 1e9\n", "line.yaml:2 thresholds.image: must be ≤ 1000"),
    ],
)
def test_non_finite_and_overflowing_numbers_are_refused(text: str, message: str) -> None:
    found = issues(text)
    assert len(found) == 1 and found[0].startswith(message), found


@pytest.mark.e2e
def test_non_utf8_file_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("daemon:\n  budget_ms: 90\nthresholds:\n  image: 1.5  # réglé\n".encode("latin-1"))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert [str(i) for i in err.value.issues] == [f"{path}:4: not UTF-8 text (byte 53: 0xe9); save as UTF-8"]
    out = subprocess.run([*ANOMALYD, "check-config", str(path)], capture_output=True, text=True)
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_s7_blocks_in_one_db_must_not_overlap() -> None:
    text = "plc:\n  type: s7\n  status_db: 7\n  command_db: 7\n  command_start: 16\n"
    found = issues(text)
    assert len(found) == 1 and "line.yaml:1 plc: status block (DB7 bytes 0..33) overlaps" in found[0]
    assert "odd" not in issues("plc:\n  type: s7\n  status_start: 3\n")[0]
    assert "must be even" in issues("plc:\n  type: s7\n  status_start: 3\n")[0]


def test_reload_refuses_a_truncated_file(tmp_path: Path) -> None:
    from anomalyd.config_loader import config_sections
    from anomalyd.daemon.reloader import reload_config

    path = tmp_path / "a.yaml"
    path.write_text("plc: {type: none}\ndaemon: {trigger: free_run}\nthresholds:\n  image: 1.7\n", encoding="utf-8")
    current = load_config(path)
    sections = frozenset(config_sections(path))
    path.write_text("plc: {type: none}\ndaemon: {trigger: free_run}\n", encoding="utf-8")  # cut after line 2
    kept = reload_config(path, current, sections)
    assert not kept.applied and kept.config.thresholds.image == 1.7
    path.write_text("plc: {type: none}\ndaemon: {trigger: free_run}\nthresholds:\n  image: 1.9\n", encoding="utf-8")
    applied = reload_config(path, current, sections)
    assert applied.applied and applied.config.thresholds.image == 1.9


@pytest.mark.parametrize(
    ("plc", "key"),
    [("{type: modbus-server, unit: 3}", "unit"), ("{type: modbus-server, timeout_s: 2}", "timeout_s"),
     ("{type: opcua-server, command_layout: {part_id: 4}}", "command_layout")],
)  # fmt: skip
def test_a_setting_the_backend_cannot_honour_is_an_error_not_ignored(plc: str, key: str) -> None:
    from anomalyd.config_loader import ConfigError, parse_config

    with pytest.raises(ConfigError, match=rf"{key}: .*remove the key"):
        parse_config(f"plc: {plc}\n", "line.yaml")


@pytest.mark.e2e
def test_reading_a_config_loads_no_backend_runtime() -> None:
    """Every backend's settings sit in its own file, which imports its runtime only when it runs."""
    import subprocess
    import sys

    heavy = ["torch", "snap7", "asyncua", "pymodbus", "harvesters", "onnxruntime", "openvino", "tensorrt", "faiss"]
    code = (
        "import sys; from anomalyd.config_loader import parse_config; "
        "parse_config('plc: {type: opcua-server}\\nengine: {type: openvino}\\n"
        "camera: {type: harvesters}\\n', 'x.yaml');"
        f"print([m for m in {heavy!r} if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_registered_backend_is_a_config_type() -> None:
    """The unions come from the registries: a backend's file is all it takes to be a `type:`."""
    from anomalyd.drivers.camera.base import CAMERAS
    from anomalyd.drivers.plc.base import PLC_LINKS
    from anomalyd.engines.base import EXTRACTORS

    assert set(PLC_LINKS) == {"s7", "modbus", "modbus-server", "opcua-server", "none"}
    assert set(CAMERAS) == {"simulated", "harvesters"}
    assert set(EXTRACTORS) == {"auto", "torch", "onnxruntime", "tensorrt", "openvino"}
    for section, registry in (("plc", PLC_LINKS), ("camera", CAMERAS), ("engine", EXTRACTORS)):
        for key in registry:
            text = f"{section}: {{type: {key}}}\n" + ("daemon: {trigger: free_run}\n" if key == "none" else "")
            assert getattr(parse_config(text, "x.yaml"), section).type == key
    with pytest.raises(ConfigError) as err:
        parse_config("engine:\n  type: openvinoo\n", "x.yaml")
    assert "x.yaml:2 engine.type" in str(err.value) and "'openvino'" in str(err.value)


def test_every_path_setting_is_relative_to_the_file(tmp_path: Path) -> None:
    """One annotated type marks every path: nested, optional and listed ones are all resolved."""
    cfg_file = tmp_path / "etc" / "line.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(
        "camera: {type: harvesters, cti: [gentl/a.cti]}\n"
        "plc: {type: opcua-server, password_file: secret, username: plc}\n"
        "model: {bundle: b, trusted_keys: [k.pub], default_recipe: 1}\n"
        "recipes: {1: {bundle: r1}}\n"
        "mqtt: {tls: true, ca_file: ca.pem}\n",
        encoding="utf-8",
    )
    cfg = load_config(cfg_file)
    base = cfg_file.parent.resolve()
    assert cfg.camera.cti == [base / "gentl/a.cti"]  # type: ignore[attr-defined]
    assert cfg.plc.password_file == base / "secret"  # type: ignore[attr-defined]
    assert cfg.model.bundle == base / "b" and cfg.model.trusted_keys == [base / "k.pub"]
    assert cfg.recipes[1].bundle == base / "r1" and cfg.mqtt.ca_file == base / "ca.pem"
    assert cfg.daemon.data_dir == base / "var"  # a default path as well
    assert cfg.plc.certificate is None  # type: ignore[attr-defined]
