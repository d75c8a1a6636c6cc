"""Recipes with the real daemon and a real S7 server: switched by the PLC between parts, never during one."""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from pathlib import Path

import yaml

from anomalyd.daemon.handshake import ErrorCode
from tests.harness import Running, stop, wait_until

# Two settings of the sample part: recipe 1 passes everything, recipe 2 fails everything,
# so which recipe judged a part is visible in its verdict as well as in its record.
RECIPES = {
    "1": {"name": "lenient", "thresholds": {"image": 100.0}},
    "2": {"name": "strict", "thresholds": {"image": 0.01}},
}


def _recipes(bundle: Path, **extra: dict[str, object]) -> dict[str, dict[str, object]]:
    out = {n: {**r, "bundle": str(bundle)} for n, r in RECIPES.items()}
    out.update({n: {**r, "bundle": str(bundle)} for n, r in extra.items()})
    return out


def _recipe_rows(r: Running) -> dict[int, tuple[int, int, str]]:
    with sqlite3.connect(r.data / "inspections.sqlite") as db:
        rows = db.execute("SELECT inspection_id, recipe, part_id, verdict FROM inspections").fetchall()
    return {row[0]: (row[1], row[2], row[3]) for row in rows}


def test_the_plc_switches_recipes_between_parts(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, recipes=_recipes(e2e_bundle), model__default_recipe=1)
    status = r.plc.read_status()
    assert status.recipe == 1 and status.trigger_ready  # recipe_request 0 = the default recipe
    answers = []
    for part, recipe in enumerate([1, 1, 2, 2, 1, 2, 0], start=100):
        res = r.plc.inspect_once(10.0, part_id=part, recipe=recipe)
        assert res is not None and res.attributed, f"part {part}"
        answers.append((part, recipe or 1, res.status))
    for part, recipe, s in answers:
        assert s.passed == (recipe == 1) and s.error_code == 0, (part, recipe, s)
    final = r.plc.read_status().inspection_id
    assert stop(r) == 0
    rows = _recipe_rows(r)
    assert [rows[s.inspection_id][:2] for _, _, s in answers] == [(recipe, part) for part, recipe, _ in answers]
    assert len(rows) == final


def test_an_unknown_recipe_is_answered_fail_never_with_the_old_one(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, recipes=_recipes(e2e_bundle), model__default_recipe=1)
    assert r.plc.inspect_once(10.0, part_id=1, recipe=1).status.passed  # type: ignore[union-attr]
    r.plc.set_command(recipe_request=9)
    status = r.plc.wait_for(lambda s: s.recipe == 9, 2.0)
    # trigger_ready = 1: a PLC that follows the interlock triggers, and is answered at once with code 12.
    assert status is not None and status.trigger_ready and not status.recipe_changing
    refused = r.plc.inspect_once(5.0, part_id=2, interlock=True)
    assert refused is not None and refused.attributed
    s = refused.status
    assert s.fail and not s.passed and s.error and s.error_code == ErrorCode.RECIPE_UNAVAILABLE
    back = r.plc.inspect_once(10.0, part_id=3, recipe=1)
    assert back is not None and back.status.passed
    assert stop(r) == 0
    assert _recipe_rows(r)[s.inspection_id] == (9, 2, "NG")


def test_a_switch_requested_during_an_inspection_waits_for_the_next_part(
    daemon_factory, e2e_bundle: Path, sample_dir: Path
) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, recipes=_recipes(e2e_bundle), model__default_recipe=1)
    assert r.plc.wait_for(lambda s: s.trigger_ready, 5.0)
    before = r.plc.read_status()
    r.plc.set_command(trigger=True, part_id=50, recipe_request=1)
    assert r.plc.wait_for(lambda s: s.busy or s.result_toggle != before.result_toggle, 5.0)
    r.process.send_signal(signal.SIGSTOP)  # hold the inspection of part 50 ...
    r.plc.set_command(recipe_request=2)  # ... while the PLC asks for the strict recipe
    time.sleep(0.2)
    r.process.send_signal(signal.SIGCONT)
    answer = r.plc.wait_for(lambda s: s.result_toggle != before.result_toggle, 10.0)
    r.plc.set_command(trigger=False)
    assert answer is not None and answer.part_id == 50
    assert answer.error_code in (0, ErrorCode.OVER_BUDGET)
    if answer.error_code == 0:
        assert answer.passed  # judged by recipe 1, the one latched with its trigger
    nxt = r.plc.inspect_once(10.0, part_id=51, recipe=2)
    assert nxt is not None and nxt.attributed and nxt.status.fail and nxt.status.error_code == 0
    assert stop(r) == 0
    rows = _recipe_rows(r)
    assert rows[answer.inspection_id][:2] == (1, 50) and rows[nxt.status.inspection_id][:2] == (2, 51)


def test_a_reload_adds_a_recipe_without_a_restart(daemon_factory, e2e_bundle: Path, sample_dir: Path) -> None:
    r = daemon_factory(e2e_bundle, sample_dir, recipes=_recipes(e2e_bundle), model__default_recipe=1)
    pid = r.process.pid
    assert r.plc.inspect_once(10.0, part_id=1, recipe=1) is not None
    r.plc.set_command(recipe_request=3)
    assert r.plc.wait_for(lambda s: s.recipe == 3, 2.0)  # unknown so far: a trigger now gets code 12
    raw = yaml.safe_load(r.config.read_text())
    raw["recipes"]["3"] = {"name": "added", "bundle": str(e2e_bundle), "thresholds": {"image": 0.02}}
    r.config.write_text(yaml.safe_dump(raw))
    r.process.send_signal(signal.SIGHUP)
    log_file = r.config.parent / "daemon.log"

    def loaded_3() -> bool:  # recipe 3 is there (until then a trigger for it is answered 12 or 13 at once)
        lines = [json.loads(x) for x in log_file.read_text().splitlines() if x.startswith("{")]
        return any(e.get("event") == "recipe.loaded" and e.get("recipe") == 3 for e in lines)

    wait_until(loaded_3, 60.0, "recipe 3 loaded")
    assert r.plc.wait_for(lambda s: s.trigger_ready and not s.recipe_changing, 5.0) is not None
    res = r.plc.inspect_once(30.0, part_id=2, recipe=3)  # waits for recipe_changing to fall, then triggers
    assert res is not None and res.attributed and res.status.fail and res.status.error_code == 0
    assert r.process.pid == pid and r.process.poll() is None
    assert stop(r) == 0
    log = (r.config.parent / "daemon.log").read_text()
    assert '"recipe.loaded"' in log and "recipes_loading" in log
