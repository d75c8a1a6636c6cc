"""Shared fixtures: data the project makes itself, a fitted bundle, free loopback ports."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalyd.model.fit import FitSettings, fit
from anomalyd.ports import free_port  # noqa: F401  (the tests import it from here)
from anomalyd.sample import write_sample

ANOMALYD = [sys.executable, "-m", "anomalyd"]


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


@pytest.fixture(scope="session")
def e2e_bundle(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with its threshold set on separate validation parts (as `fit --val` does)."""
    from anomalyd.cli_model import _val_images

    validation = write_sample(tmp_path_factory.mktemp("validation"), train=0, test_good=6, per_defect=2, seed=11)
    out = tmp_path_factory.mktemp("e2e_bundle")
    fit(sample_dir / "train" / "good", out, FitSettings(coreset_ratio=0.02), _val_images(validation))
    return out


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[object]:
    """Starts the real daemon (and its simulated S7 PLC); kills what is left at the end."""
    from tests.harness import Running, start_daemon

    started: list[Running] = []

    def factory(*args: object, **kwargs: object) -> Running:
        r = start_daemon(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
        started.append(r)
        return r

    yield factory
    for r in started:
        if r.process.poll() is None:
            r.process.kill()
            r.process.wait()
        r.plc.stop()
