"""The install recipes: one CUDA major per recipe, never two faiss wheels in one environment."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return dict(data["project"]["optional-dependencies"])


def _names(requirements: list[str]) -> list[str]:
    return [re.split(r"[<>=;\[ ]", r, maxsplit=1)[0].lower() for r in requirements]


def test_each_gpu_extra_is_built_for_one_cuda_major_and_dev_brings_no_faiss() -> None:
    extras = _extras()
    assert "gpu" not in extras and "faiss-gpu" not in extras, "an extra whose CUDA major the resolver picks"
    for major in (12, 13):
        names = _names(extras[f"gpu-cu{major}"])
        assert names and all(n.endswith(f"-cu{major}") for n in names), names
    assert not [n for n in _names(extras["dev"]) if n.startswith("faiss")]
    assert "faiss-cpu" not in _names(extras["gpu-cu12"] + extras["gpu-cu13"])


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(
    ("cuda", "index", "extras"), [("12", "whl/cu128", "dev,gpu-cu12"), ("13", None, "dev,gpu-cu13")]
)
@pytest.mark.e2e
def test_the_makefile_recipes_match_torch_to_the_extras(cuda: str, index: str | None, extras: str) -> None:
    plan = subprocess.run(
        ["make", "-n", "-B", "venv", f"CUDA={cuda}", "VENV=/nonexistent/venv"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    torch_line = next(line for line in plan.splitlines() if '"torch' in line)
    assert (index in torch_line) if index else ("--index-url" not in torch_line), torch_line
    assert f'-e ".[{extras}]"' in plan and "faiss-cpu" not in plan
    wrong = subprocess.run(["make", "-n", "venv", "CUDA=11"], cwd=ROOT, capture_output=True, text=True)
    assert wrong.returncode != 0 and "12 or 13" in wrong.stderr
