"""Labelling from the line with the real daemon: the page and the CLI, stored with who and when, taught."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from anomalyd.daemon.audit import AuditLog
from tests.conftest import ANOMALYD
from tests.harness import stop

pytestmark = pytest.mark.e2e  # every test here starts the daemon or a peer as a process


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ANOMALYD, *args], capture_output=True, text=True, timeout=300)


def post(port: int, body: object, content_type: str = "application/json") -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/label", json.dumps(body).encode(), {"Content-Type": content_type}
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_parts_are_labelled_on_the_page_and_by_cli_and_taught(
    daemon_factory, e2e_bundle: Path, sample_dir: Path, tmp_path: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir / "test", archive__ok_sample_every=1)
    answers = []
    for part in range(500, 512):
        res = r.plc.inspect_once(10.0, part_id=part)
        assert res is not None and res.attributed
        answers.append(res.status)
    rejected = next(s for s in answers if s.fail)
    passed = [s for s in answers if s.passed]
    # The page: a rejected part is a false reject; a passed one turns out to be an escape.
    assert post(r.page_port, {"inspection_id": rejected.inspection_id, "label": "good"})[0] == 200
    assert post(r.page_port, {"inspection_id": passed[0].inspection_id, "label": "defect"})[0] == 200
    assert post(r.page_port, {"inspection_id": 99999, "label": "good"})[0] == 409  # no such record
    assert post(r.page_port, {"inspection_id": passed[0].inspection_id, "label": "maybe"})[0] == 400
    assert post(r.page_port, {"inspection_id": 1, "label": "good"}, "text/plain")[0] == 415  # no form posts
    # The CLI, by the PLC's part number (an escape found downstream).
    out = cli("label", str(passed[1].part_id), "defect", "--part", "--data-dir", str(r.data), "--note", "customer")
    assert out.returncode == 0 and "escape" in out.stdout, out.stderr
    assert cli("label", "424242", "good", "--data-dir", str(r.data)).returncode == 1
    assert stop(r) == 0
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        rows = db.execute("SELECT inspection_id, label, actor FROM labels ORDER BY seq").fetchall()
    assert [(i, lab) for i, lab, _ in rows] == [
        (rejected.inspection_id, "good"),
        (passed[0].inspection_id, "defect"),
        (passed[1].inspection_id, "defect"),
    ]
    assert rows[0][2].startswith("operator page (127.0.0.1")
    labels = [e for e in AuditLog(r.data / "inspections.sqlite").recent(20) if e["action"] == "label"]
    assert len(labels) == 3
    # teach --labelled: defects for fit --defects, good ones (false rejects) for fit --good, with provenance.
    out_dir = tmp_path / "taught"
    out = cli("teach", "--data-dir", str(r.data), "--out", str(out_dir), "--labelled")
    assert out.returncode == 0, out.stderr
    assert len(list((out_dir / "defects" / "line").glob("*.png"))) == 2
    assert len(list((out_dir / "good").glob("*.png"))) == 1
    sources = [json.loads(line) for line in (out_dir / "sources.jsonl").read_text().splitlines()]
    assert {s["inspection_id"]: s["label"] for s in sources} == {i: lab for i, lab, _ in rows}
    # compare names the escapes and false rejects each bundle makes on the labelled parts
    out = cli("compare", str(e2e_bundle), str(e2e_bundle), "--data-dir", str(r.data))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert sorted(report["escapes_old"]) == sorted([passed[0].inspection_id, passed[1].inspection_id])
    assert report["false_rejects_new"] == [rejected.inspection_id]
