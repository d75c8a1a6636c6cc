"""Shared fixtures: data the project makes itself, a fitted bundle, free loopback ports."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from anomalyd.model.fit import FitSettings, fit
from anomalyd.sample import write_sample

ANOMALYD = [sys.executable, "-m", "anomalyd"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic part in MVTec layout: 24 good to fit on, 4 good + 2 of each defect to test."""
    return write_sample(tmp_path_factory.mktemp("sample"), train=24, test_good=4, per_defect=2, seed=3)


@pytest.fixture(scope="session")
def bundle_dir(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle fitted with the real Lite0 ImageNet weights on the sample part."""
    out = tmp_path_factory.mktemp("bundle")
    fit(sample_dir / "train" / "good", out, FitSettings(coreset_ratio=0.02))
    return out
