"""bench/gpu_accept.py checks itself here (--allow-cpu): one process per path, a line per result as it ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # every test here starts the daemon or a peer as a process

ROOT = Path(__file__).resolve().parents[1]


def _accept(bundle: Path, images: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_accept.py"), "--bundle", str(bundle), "--images", str(images),
         "--out", str(out), "--runs", "20", "--allow-cpu", *extra],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_gpu_accept_runs_each_path_apart_and_an_abort_is_one_failed_line(
    e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    done = _accept(e2e_bundle, sample_dir / "test", tmp_path / "a", "--require", "tensorrt,onnxruntime",
                   "--abort-in", "onnxruntime+faiss")  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    lines = [json.loads(x) for x in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    by_name = {r["name"]: r for r in lines}
    assert len(lines) == 19 and by_name["reference"]["status"] == "pass"
    aborted = by_name["onnxruntime+faiss"]
    assert aborted["status"] == "fail" and "killed by SIGABRT" in aborted["failures"][0]
    # Everything after the abort ran and was written: the run was not lost.
    assert by_name["fit"]["status"] == "pass" and by_name["auto"]["status"] == "pass"
    passed = by_name["onnxruntime+torch"]
    assert passed["status"] == "pass" and passed["features_batch9_vs_cpu"] <= 1e-3  # a batch above the profile
    assert by_name["tensorrt-fp16+torch"]["status"] == "missing" and by_name["tensorrt-fp16+torch"]["reason"]
    problems = json.loads((tmp_path / "a" / "summary.json").read_text())["problems"]
    assert any(p.startswith("required tensorrt: not passed (") for p in problems)
    assert not any(p.startswith("required onnxruntime") for p in problems)
    assert "NOT ACCEPTED" in done.stdout

    clean = _accept(e2e_bundle, sample_dir / "test", tmp_path / "b")
    assert clean.returncode == 0 and "ACCEPTED" in clean.stdout, clean.stdout + clean.stderr
    auto = {r["name"]: r for r in map(json.loads, (tmp_path / "b" / "results.jsonl").read_text().splitlines())}["auto"]
    # auto was timed in turns beside the fastest CPU path that passed, in its own process.
    assert auto["against"] in ("onnxruntime+torch", "onnxruntime+faiss") and auto["against_p50_ms"] > 0
    table = (tmp_path / "b" / "table.md").read_text()
    assert "| onnxruntime+torch | pass |" in table and "| torch-fp16-graph+torch | missing |" in table
