"""Metrics as Prometheus' own tools read them (promtool, a real Prometheus) and the Grafana dashboard's queries."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from anomalyd.daemon.metrics import LabelledOutcomes, Metrics
from tests.conftest import ANOMALYD, free_port
from tests.harness import Running, wait_until

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "config" / "grafana" / "anomalyd-fleet.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
_NAME = re.compile(r"\banomalyd_[a-z0-9_]+")


def _exported_names() -> set[str]:
    """Every series name the daemon can export: from its registry, the collector of labelled outcomes too."""
    metrics = Metrics()
    metrics.registry.register(LabelledOutcomes(Path("/nonexistent/inspections.sqlite")))
    names: set[str] = set()
    for family in metrics.registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(family.type, [""])
        names.update(family.name + s for s in suffixes)
    return names


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queries += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return queries


def test_every_dashboard_query_names_exported_metrics_and_every_metric_is_documented() -> None:
    exported = _exported_names()
    used = {name for q in _dashboard_queries() for name in _NAME.findall(q)}
    assert used and used <= exported, f"dashboard names metrics the daemon never exports: {sorted(used - exported)}"
    docs = (ROOT / "docs" / "monitoring.md").read_text(encoding="utf-8")
    families = {re.sub(r"(_total|_bucket|_sum|_count)$", "", n) for n in exported}
    undocumented = sorted(f for f in families if f not in docs)
    assert not undocumented, f"metrics missing from docs/monitoring.md: {undocumented}"
    for old in ("anomalyd_latency_ms", "anomalyd_certificate_days_left"):  # the renames are listed
        assert old in docs


def _inspect_and_label(r: Running) -> list[int]:
    ids = []
    for _ in range(4):
        answer = r.plc.inspect_once(10.0)
        assert answer is not None and answer.attributed
        ids.append(answer.status.inspection_id)
    r.plc.set_command(enable=False)  # one refused trigger: error and missed-trigger series exist
    assert r.plc.wait_for(lambda s: not s.trigger_ready, 2.0)
    assert r.plc.inspect_once(5.0, interlock=False) is not None
    r.plc.set_command(enable=True)
    r.wait_rows(5)
    subprocess.run(
        [*ANOMALYD, "label", str(ids[0]), "defect", "--data-dir", str(r.data)], check=True, capture_output=True
    )
    return ids


def _scrape(r: Running) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/metrics", timeout=5).read().decode()


@pytest.mark.e2e
@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: apt-get install prometheus)")
def test_the_daemons_metrics_pass_promtool_and_a_real_prometheus_answers_the_dashboard(
    daemon_factory,  # type: ignore[no-untyped-def]
    e2e_bundle: Path,
    sample_dir: Path,
    tmp_path: Path,
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir / "test", daemon__line="line7")
    _inspect_and_label(r)
    body = _scrape(r)
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True)  # type: ignore[list-item]
    assert lint.returncode == 0 and not (lint.stdout + lint.stderr).strip(), lint.stdout + lint.stderr
    assert "_created" not in body and not re.search(r"^anomalyd_\w*_ms\b", body, re.M)
    stages = set(re.findall(r'anomalyd_stage_duration_seconds_count\{stage="(\w+)"\}', body))
    assert stages == {"preprocess", "extract", "search", "map"}, "stages only: a sum over them means something"
    assert re.search(r"anomalyd_frame_to_result_seconds_count 4\.0", body)  # the refused trigger is not timed
    assert re.search(r'anomalyd_build_info\{line="line7",python="[\d.]+",version="[\w.]+"\} 1\.0', body)
    wait_until(lambda: "anomalyd_labelled_parts 1.0" in _scrape(r), 15.0, "the label counted")
    assert re.search(r"anomalyd_labelled_escapes [01]\.0", _scrape(r))

    if PROMETHEUS is None:
        pytest.skip("prometheus (the server) is not installed: promtool passed, the dashboard was not evaluated")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: anomalyd, static_configs: [{{targets: ['127.0.0.1:{r.metrics_port}']}}]}}]\n",
        encoding="utf-8",
    )
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"),
    )  # fmt: skip

    def query(expr: str) -> list[object]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        reply = json.loads(urllib.request.urlopen(url, timeout=5).read())
        assert reply["status"] == "success", (expr, reply)
        return reply["data"]["result"]  # type: ignore[no-any-return]

    def scraped() -> bool:
        try:
            return bool(query("count_over_time(up[1m]) >= 3"))
        except OSError:
            return False

    try:
        wait_until(scraped, 60.0, "three scrapes by Prometheus")
        _inspect_and_label(r)  # parts between scrapes: rates and increases have something to show
        wait_until(lambda: query("sum(anomalyd_inspections_total) >= 10"), 30.0, "the new parts scraped")
        for expr in _dashboard_queries():
            if expr.startswith("label_values("):
                assert query("group by (instance) (anomalyd_build_info)"), "the line picker finds the daemon"
                continue
            expr = expr.replace("$instance", ".*")
            for name in set(_NAME.findall(expr)):
                assert query(f"count({{__name__={name!r}}})") != [], f"{name} has no series in Prometheus"
            query(expr)  # evaluates (a query error fails in query())
        assert query("anomalyd_labelled_parts >= 1"), "the label reached Prometheus"
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=10)
