"""Shared fixtures: data the project makes itself, a fitted bundle, free loopback ports; the two test layers.

Layers: a test that starts a process (the daemon, a CLI, a broker, Prometheus, Node,
Chromium) is ``e2e``, and the guard below fails one that does so unmarked; a test
that runs the real network in-process (any fitted bundle) is marked ``model``
here by the fixtures it uses. ``make test-fast`` runs the rest: the in-process
specifications with fakes, in under a minute.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from anomalyd.ports import free_port  # noqa: F401  (the tests import it from here)
from anomalyd.sample import write_sample
from anomalyd.training.fit import FitSettings, fit

ANOMALYD = [sys.executable, "-m", "anomalyd"]
# Fixtures that fit or load a real bundle: a test using one is in the `model` layer.
MODEL_FIXTURES = {"bundle_dir", "e2e_bundle", "bundle_b", "local_bundle", "head_bundle", "learned_bundle"}
# Fixtures that start a process (the daemon, a broker, OPC UA stations): a test using one is `e2e`.
E2E_FIXTURES = {"daemon_factory", "broker", "stations"}
# What libraries run on their own to learn about the machine (joblib: lscpu, platform: uname, Harvesters: git):
# not a process the test starts.
LIBRARY_PROBES = {"lscpu", "uname", "git", "nproc"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if MODEL_FIXTURES & used:
            item.add_marker(pytest.mark.model)
        if E2E_FIXTURES & used:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(autouse=True)
def _layer_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A test that starts a process must say so (``e2e``): the fast layer stays in-process and fast."""
    started: list[str] = []
    real_init = subprocess.Popen.__init__

    def init(self: subprocess.Popen[bytes], args: object, *rest: object, **kwargs: object) -> None:
        command = [str(a) for a in args] if isinstance(args, list | tuple) else str(args).split()
        if Path(command[0]).name not in LIBRARY_PROBES:
            started.append(" ".join(command))
        real_init(self, args, *rest, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess.Popen, "__init__", init)
    yield
    if started and request.node.get_closest_marker("e2e") is None:
        pytest.fail(f"started a process ({started[0][:120]}) but is not marked e2e", pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Probe and engine measurements of this run kept in its own folder, not in the user's ~/.cache."""
    import os

    folder = tmp_path_factory.mktemp("cache")
    before = os.environ.get("ANOMALYD_CACHE_DIR")
    os.environ["ANOMALYD_CACHE_DIR"] = str(folder)  # the daemons the tests start inherit it
    yield folder
    if before is None:
        os.environ.pop("ANOMALYD_CACHE_DIR", None)
    else:
        os.environ["ANOMALYD_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic part in MVTec layout: 24 good to fit on, 4 good + 2 of each defect to test."""
    return write_sample(tmp_path_factory.mktemp("sample"), train=24, test_good=4, per_defect=2, seed=3)


@pytest.fixture(scope="session")
def e2e_bundle(sample_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle with its threshold set on separate validation parts (as `fit --val` does)."""
    from anomalyd.evaluation.dataset import labelled_images

    validation = write_sample(tmp_path_factory.mktemp("validation"), train=0, test_good=6, per_defect=2, seed=11)
    out = tmp_path_factory.mktemp("e2e_bundle")
    fit(sample_dir / "train" / "good", out, FitSettings(coreset_ratio=0.02), labelled_images(validation))
    return out


@pytest.fixture(scope="session")
def bundle_dir(e2e_bundle: Path) -> Path:
    """The session's one fitted bundle (the same 24 images were fitted twice before): copy it to change it."""
    return e2e_bundle


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
