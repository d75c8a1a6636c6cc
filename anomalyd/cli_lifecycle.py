"""Learning from the line: teach, compare, promote, rollback, audit.

``teach`` copies archived frames into a candidate good set (with where each came
from); ``fit --good OLD --good CANDIDATES --into BUNDLES`` makes a new, immutable,
versioned bundle; ``compare OLD NEW`` shows what would change; ``promote`` points
the line's bundle link at the new bundle and reloads the daemon, which switches
between parts; ``rollback`` points it back. Each step is in the audit log.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

from anomalyd.errors import AnomalydError, StartupError


def _db(data_dir: Path) -> Path:
    path = data_dir / "inspections.sqlite"
    if not path.is_file():
        raise AnomalydError(f"{path}: no records database (is --data-dir the daemon's data_dir?)")
    return path


def _ids(text: str) -> list[int]:
    """``1,2,7-9`` → [1, 2, 7, 8, 9]."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part:
            lo, hi = (int(v) for v in part.split("-", 1))
            out += list(range(lo, hi + 1))
        elif part.strip():
            out.append(int(part))
    return out


def _when(text: str) -> int:
    """An ISO time, or an age like ``8h`` / ``30m`` / ``2d`` → time_ns."""
    if m := re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip()):
        seconds = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int((dt.datetime.now().timestamp() - seconds) * 1e9)
    return int(dt.datetime.fromisoformat(text).timestamp() * 1e9)


# ---------------------------------------------------------------- teach
def cmd_teach(args: argparse.Namespace) -> int:
    from anomalyd.daemon.audit import AuditLog
    from anomalyd.daemon.records import archived_records

    db = _db(args.data_dir)
    labels: dict[int, tuple[str, str, int]] = {}
    ids: list[int] | None = _ids(args.ids) if args.ids else None
    if args.labelled:
        from anomalyd.daemon.labels import current_labels

        labels = current_labels(db)  # type: ignore[assignment]
        ids = sorted(labels) if ids is None else sorted(set(ids) & set(labels))
    rows = archived_records(
        db,
        ids=ids,
        since_ns=_when(args.since) if args.since else None,
        until_ns=_when(args.until) if args.until else None,
        verdict=args.verdict,
        recipe=args.recipe,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    copied, missing = 0, 0
    with (args.out / "sources.jsonl").open("a", encoding="utf-8") as sources:
        for row in rows:
            src = Path(row["archive_path"])
            if not src.is_file():
                missing += 1  # the archive quota removed it
                continue
            label = labels.get(row["inspection_id"])
            # --labelled: defects/line/ for fit --defects, good/ (false rejects) for fit --good
            folder = args.out if label is None else args.out / ("defects/line" if label[0] == "defect" else "good")
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{row['inspection_id']:010d}{src.suffix}"
            shutil.copy2(src, target)
            keys = ("inspection_id", "part_id", "time_ns", "verdict", "score", "recipe", "bundle_id", "source")
            entry = {"file": str(target.relative_to(args.out)), "archive": str(src), **{k: row[k] for k in keys}}
            if label is not None:
                entry.update(label=label[0], labelled_by=label[1], labelled_at_ns=label[2])
            sources.write(json.dumps(entry) + "\n")
            copied += 1
    filters = {
        k: getattr(args, k) for k in ("ids", "since", "until", "verdict", "recipe", "labelled") if getattr(args, k)
    }
    AuditLog(db).append("teach", {"out": str(args.out.resolve()), "copied": copied, "filters": filters})
    print(f"{copied} images → {args.out} (sources.jsonl says where each came from); {missing} no longer archived")
    return 0 if copied else 1


# ---------------------------------------------------------------- label
def cmd_label(args: argparse.Namespace) -> int:
    from anomalyd.daemon.labels import add_labels

    records = add_labels(_db(args.data_dir), _ids(args.ids), args.label, by_part=args.part, note=args.note or "")
    for inspection_id, part_id, verdict in records:
        kind = "escape" if args.label == "defect" and verdict != "NG" else None
        kind = kind or ("false reject" if args.label == "good" and verdict == "NG" else "confirmed")
        print(f"inspection {inspection_id} (part {part_id}, {verdict}): {args.label} — {kind}")
    return 0


# ---------------------------------------------------------------- compare
def _archived(data_dir: Path, last: int) -> list[tuple[int, Path]]:
    with sqlite3.connect(f"file:{_db(data_dir)}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT inspection_id, archive_path FROM inspections WHERE archive_path IS NOT NULL "
            "ORDER BY inspection_id DESC LIMIT ?",
            (last,),
        ).fetchall()
    return [(i, Path(p)) for i, p in reversed(rows) if Path(p).is_file()]


def cmd_compare(args: argparse.Namespace) -> int:
    import numpy as np

    from anomalyd.cli_signing import trusted_from
    from anomalyd.config import SearchConfig
    from anomalyd.decision import fails
    from anomalyd.engines.auto_engine import AutoEngineConfig
    from anomalyd.engines.select import open_inspector
    from anomalyd.model.bundle import load_bundle
    from anomalyd.model.images import read_rgb

    trusted = trusted_from(args)
    bundles = {"old": load_bundle(args.old, trusted_keys=trusted), "new": load_bundle(args.new, trusted_keys=trusted)}
    inspectors = {k: open_inspector(b, AutoEngineConfig(), SearchConfig()) for k, b in bundles.items()}
    thresholds = {k: args.threshold or b.suggested_threshold for k, b in bundles.items()}
    items: list[dict[str, Any]] = []
    from anomalyd.daemon.labels import current_labels

    line_labels = current_labels(_db(args.data_dir))  # parts a person labelled on the line
    for inspection_id, path in _archived(args.data_dir, args.last):
        said = line_labels.get(inspection_id)
        label = None if said is None else said[0] == "defect"
        items.append({"inspection_id": inspection_id, "file": str(path), "label": label})
    if args.labelled:
        from anomalyd.evaluation.dataset import labelled_images

        files, labels = labelled_images(args.labelled)
        items += [
            {"inspection_id": None, "file": str(f), "label": bool(lab)} for f, lab in zip(files, labels, strict=True)
        ]
    if not items:
        raise AnomalydError("nothing to compare: no archived images and no --labelled folder")
    for item in items:
        frame = read_rgb(Path(item["file"]))
        for k, inspector in inspectors.items():
            score = inspector.inspect(frame).score
            item[f"{k}_score"] = round(score, 4)
            item[f"{k}_ng"] = fails(score, thresholds[k])  # the line's rule: a NaN score fails
    line = [i for i in items if i["inspection_id"] is not None]
    labelled = [i for i in items if i["label"] is not None]
    report: dict[str, Any] = {
        "old": {"bundle": bundles["old"].bundle_id, "threshold": thresholds["old"]},
        "new": {"bundle": bundles["new"].bundle_id, "threshold": thresholds["new"]},
        "line_images": len(line),
        "ng_old": sum(i["old_ng"] for i in line),
        "ng_new": sum(i["new_ng"] for i in line),
        "ng_to_ok": [i["inspection_id"] for i in line if i["old_ng"] and not i["new_ng"]],
        "ok_to_ng": [i["inspection_id"] for i in line if not i["old_ng"] and i["new_ng"]],
    }
    if labelled:
        defects = [i for i in labelled if i["label"]]
        goods = [i for i in labelled if not i["label"]]
        for k in ("old", "new"):
            report[f"labelled_{k}"] = {
                "defects_caught": f"{sum(i[f'{k}_ng'] for i in defects)}/{len(defects)}",
                "good_rejected": f"{sum(i[f'{k}_ng'] for i in goods)}/{len(goods)}",
            }
        report["defects_escaping_new"] = [i["file"] for i in defects if not i["new_ng"]]
        for k in ("old", "new"):  # what a plant counts, on the parts people labelled
            report[f"escapes_{k}"] = [i["inspection_id"] or i["file"] for i in defects if not i[f"{k}_ng"]]
            report[f"false_rejects_{k}"] = [i["inspection_id"] or i["file"] for i in goods if i[f"{k}_ng"]]
    print(json.dumps(report, indent=2))
    if args.report:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        args.report.mkdir(parents=True, exist_ok=True)
        (args.report / "compare.json").write_text(json.dumps({**report, "items": items}, indent=2) + "\n")
        fig, ax = plt.subplots(figsize=(7, 4))
        top = max(max(i["old_score"], i["new_score"]) for i in items)
        bins = [float(b) for b in np.linspace(0, max(top, 2 * max(thresholds.values())), 40)]
        ax.hist([i["old_score"] for i in items], bins, alpha=0.5, label=f"old {report['old']['bundle']}")
        ax.hist([i["new_score"] for i in items], bins, alpha=0.5, label=f"new {report['new']['bundle']}")
        for k, style in (("old", "--"), ("new", "-")):
            ax.axvline(thresholds[k], color="k", linestyle=style, label=f"{k} threshold")
        ax.set_xlabel("score")
        ax.set_ylabel("images")
        ax.legend()
        fig.savefig(args.report / "scores.png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        print(f"report → {args.report / 'compare.json'}, {args.report / 'scores.png'}")
    for inspector in inspectors.values():
        inspector.close()
    return 0


# ---------------------------------------------------------------- promote / rollback
def _history(link: Path) -> Path:
    return link.with_name(link.name + ".history")


def _point(link: Path, target: Path) -> None:
    """Make ``link`` point at ``target`` in one rename: the daemon never sees it missing."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _reload(data_dir: Path) -> str:
    pid_file = data_dir / "anomalyd.pid"
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return "daemon not running here: the change applies at its next start"
    return f"daemon {pid} reloading: the new bundle takes over between parts"


def _switch(args: argparse.Namespace, action: str, target: Path) -> int:
    from anomalyd.daemon.audit import AuditLog, current_user
    from anomalyd.model.bundle import load_bundle

    link: Path = args.link
    if link.exists() and not link.is_symlink():
        raise AnomalydError(
            f"{link} is a folder, not a link; point model.bundle (or the recipe's bundle) at a link "
            "(docs/technician.md)"
        )
    from anomalyd.cli_signing import trusted_from

    new = load_bundle(target, trusted_keys=trusted_from(args))  # never promote what cannot load
    old_target = Path(os.readlink(link)) if link.is_symlink() else None
    try:
        old_id = load_bundle(old_target, verify=False).bundle_id if old_target and old_target.exists() else None
    except AnomalydError:
        old_id = None  # the bundle being replaced is damaged: that is no reason to keep it
    to = str(target.resolve())
    detail = {"link": str(link), "from": str(old_target) if old_target else None, "to": to}
    detail.update(bundle_from=old_id, bundle_to=new.bundle_id)
    # The entry first: a change that cannot be audited does not happen (the link stays).
    audit = AuditLog(args.data_dir / "inspections.sqlite")
    audit.record(action, detail)
    try:
        _point(link, target.resolve())
    except OSError as exc:
        audit.append(f"{action}_failed", {**detail, "error": str(exc)})
        raise AnomalydError(f"{link}: cannot be re-pointed ({exc.strerror}); nothing changed") from None
    entry = {
        "time": dt.datetime.now().isoformat(timespec="seconds"),
        "user": current_user(),
        "action": action,
        "from": detail["from"],
        "to": to,
    }
    with _history(link).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
    print(f"{action}: {link} → {to} (bundle {new.bundle_id}; was {old_id})")
    print(_reload(args.data_dir) if not args.no_reload else "not reloaded (--no-reload)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    return _switch(args, "promote", args.bundle)


def read_history(history: Path) -> list[dict[str, Any]]:
    """The promote/rollback history of a link; a damaged file is one line naming it (exit 2)."""
    if not history.is_file():
        return []
    entries: list[dict[str, Any]] = []
    try:
        text = history.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise StartupError(f"{history}: not a text file; restore it or remove it (rollback needs it)") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise StartupError(f"{history}:{number}: damaged entry ({exc.msg}); repair or remove the line") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("from", ""), str | None):
            raise StartupError(f"{history}:{number}: not a history entry (a JSON object with from/to)")
        entries.append(entry)
    return entries


def cmd_rollback(args: argparse.Namespace) -> int:
    history = _history(args.link)
    entries = read_history(history)
    current = str(Path(os.readlink(args.link))) if args.link.is_symlink() else None
    for entry in reversed(entries):
        previous = entry.get("from")
        if previous and previous != current and Path(previous).is_dir():
            return _switch(args, "rollback", Path(previous))
    raise AnomalydError(f"{args.link}: no earlier bundle to roll back to ({history} has none that still exists)")


# ---------------------------------------------------------------- audit
def cmd_audit(args: argparse.Namespace) -> int:
    from anomalyd.daemon.audit import AuditLog

    audit = AuditLog(_db(args.data_dir))
    if args.verify:
        verdict = audit.verify()
        if verdict.ok:
            print(f"audit chain whole: {verdict.entries} entries")
            return 0
        print(f"audit chain broken: {verdict.problem}", file=sys.stderr)
        return 1
    entries = audit.recent(args.limit)
    for e in reversed(entries):
        when = dt.datetime.fromtimestamp(e["time"]).isoformat(sep=" ", timespec="seconds")
        print(f"{e['seq']:>6}  {when}  {e['actor']:<18} {e['action']:<10} {json.dumps(e['detail'], sort_keys=True)}")
    return 0


def add_lifecycle_commands(sub: Any) -> None:
    from anomalyd.cli_signing import add_trusted_key_option

    p = sub.add_parser("teach", help="copy archived frames into a candidate good set, keeping where each came from")
    p.add_argument("--data-dir", type=Path, required=True, help="the daemon's data_dir")
    p.add_argument("--out", type=Path, required=True, help="candidate folder (fit --good it)")
    p.add_argument("--ids", help="inspection ids: 4711,4712,4800-4810 (e.g. the false rejects)")
    p.add_argument("--since", help="ISO time or age (8h, 30m, 2d): e.g. the last shift")
    p.add_argument("--until", help="ISO time or age")
    p.add_argument("--verdict", choices=["OK", "WARN", "NG"], help="only parts with this verdict")
    p.add_argument("--recipe", type=int, help="only parts of this recipe")
    p.add_argument(
        "--labelled",
        action="store_true",
        help="the labelled parts: defects into OUT/defects/line (fit --defects OUT/defects), good ones into OUT/good",
    )
    p.set_defaults(func=cmd_teach)

    p = sub.add_parser("label", help="say what parts really were: defect (confirmed, or an escape) or good")
    p.add_argument("ids", help="inspection ids (4711,4800-4810), or part ids with --part")
    p.add_argument("label", choices=["defect", "good"])
    p.add_argument("--part", action="store_true", help="the ids are the PLC's part ids (their newest inspection)")
    p.add_argument("--data-dir", type=Path, required=True, help="the daemon's data_dir")
    p.add_argument("--note", help="a few words kept with the label")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("compare", help="score recent archived images (and labelled ones) with two bundles")
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--last", type=int, default=500, help="how many recent archived inspections")
    p.add_argument("--labelled", type=Path, help="good/ and defect folders (e.g. known defects)")
    p.add_argument("--threshold", type=float, help="one threshold for both (default: each bundle's)")
    p.add_argument("--report", type=Path, help="folder for compare.json and scores.png")
    add_trusted_key_option(p)
    p.set_defaults(func=cmd_compare)

    for name, fn, text in (
        ("promote", cmd_promote, "point the line's bundle link at BUNDLE and reload the daemon"),
        ("rollback", cmd_rollback, "point the bundle link back at the bundle before and reload"),
    ):
        p = sub.add_parser(name, help=text)
        if name == "promote":
            p.add_argument("bundle", type=Path)
        p.add_argument("--link", type=Path, required=True, help="the link model.bundle (or a recipe) points at")
        p.add_argument("--data-dir", type=Path, required=True, help="the daemon's data_dir (audit log, pid)")
        p.add_argument("--no-reload", action="store_true", help="do not signal the daemon")
        add_trusted_key_option(p)
        p.set_defaults(func=fn)

    p = sub.add_parser("audit", help="print the audit log (append-only)")
    p.add_argument("--data-dir", type=Path, required=True)
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--verify", action="store_true", help="check the hash chain: exit 0 whole, 1 naming the break")
    p.set_defaults(func=cmd_audit)
