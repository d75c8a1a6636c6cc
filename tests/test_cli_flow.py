"""The technician's path on the command line, as real processes: fit, score, eval (and the refusals)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ANOMALYD

pytestmark = pytest.mark.e2e  # every test here starts the daemon or a peer as a process


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ANOMALYD, *args], capture_output=True, text=True, timeout=600)


def test_fit_score_eval_from_the_command_line(sample_dir: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    out = run("fit", "--good", str(sample_dir / "train" / "good"), "--out", str(bundle), "--coreset-ratio", "0.02")
    assert out.returncode == 0, out.stderr
    assert json.loads((bundle / "manifest.json").read_text())["created"].endswith("+00:00")
    named = json.loads((bundle / "manifest.json").read_text())["calibration"]["highest_holdout"]["image"]
    assert f"highest held-back good part, {named} " in out.stdout
    assert Path(named).parent == sample_dir / "train" / "good"
    out = run("score", "--bundle", str(bundle), str(sample_dir / "test"), "--out", str(tmp_path / "heat"))
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[1:]]
    verdicts = {Path(r[0]).parent.name: [] for r in rows}
    for r in rows:
        verdicts[Path(r[0]).parent.name].append(r[2])
    assert verdicts["good"].count("NG") <= 1  # at most one good part rejected
    defects = [v for folder, vs in verdicts.items() if folder != "good" for v in vs]
    assert defects.count("NG") >= len(defects) - 2  # the defects fail (one faint scratch may pass)
    assert len(list((tmp_path / "heat").glob("*.png"))) == len(rows)
    report = tmp_path / "report"
    out = run("eval", str(sample_dir), "--bundle", str(bundle), "--report", str(report))
    assert out.returncode == 0, out.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["image_auroc"] > 0.9 and (report / "scores.csv").is_file()
    # eval --fit never overwrites a bundle (as fit refuses to)
    out = run("eval", str(sample_dir), "--fit", "--bundle", str(bundle))
    assert out.returncode == 1 and "never overwritten" in out.stderr
