"""Evaluation report: metrics.json, a Markdown table, per-part scores.csv, ROC curves, histograms, heatmaps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from anomalyd.decision import Label, fails
from anomalyd.evaluation.evaluate import Scored
from anomalyd.evaluation.metrics import roc_curve
from anomalyd.model.images import read_rgb
from anomalyd.overlay import overlay_heatmap


def _fmt(value: object) -> str:
    return "n/a" if value is None else f"{value:.4f}"  # type: ignore[str-format]


def markdown_table(metrics: dict, name: str) -> str:  # type: ignore[type-arg]
    rows = [f"| {name} | image AUROC | pixel AUROC | AUPRO | escapes at threshold |", "|---|---|---|---|---|"]
    for kind, m in [("**all**", metrics), *metrics["per_defect"].items()]:
        esc = m.get("escape_rate", (m.get("at_threshold") or {}).get("escape_rate"))
        rows.append(
            f"| {kind} | {_fmt(m['image_auroc'])} | {_fmt(m['pixel_auroc'])} | {_fmt(m['aupro'])} | {_fmt(esc)} |"
        )
    at = metrics.get("at_threshold")
    if at:
        rows += [
            "",
            f"At the bundle's threshold {at['threshold']}: **false rejects {at['false_reject_rate']:.1%}** of good "
            f"parts ({at['false_rejects']}), **escapes {at['escape_rate']:.1%}** of defective parts ({at['escapes']}).",
        ]
    oracle = metrics.get("at_2pct_false_rejects")
    if oracle:
        rows += [
            "",
            f"With a threshold set on these good parts to reject at most 2 % of them ({oracle['threshold']:.4g}, "
            f"an oracle): false rejects {oracle['false_reject_rate']:.1%}, escapes {oracle['escape_rate']:.1%}.",
        ]
    attributed = metrics.get("attribution")
    if attributed:
        a = attributed
        both = a["rejected_with_peak_on_defect"]
        rows += [
            "",
            f"Rejected **for the defect** (map's peak on the defect's mask): {both} of {a['defective_with_masks']}"
            f" defective parts ({a['caught_for_the_defect_rate']:.1%}); {a['rejected'] - both} more were rejected"
            " with the peak elsewhere in the frame.",
        ]
    by_area = metrics.get("escapes_by_area")
    if by_area:
        rows += [
            "",
            "| defect area (mask, frame pixels) | defective parts | escapes | map's peak on the defect |",
            "|---|---|---|---|",
        ]
        rows += [
            f"| {b['area']} | {b['parts']} | {b['escapes']} ({b['escape_rate']:.0%}) | {b['peak_on_defect']} |"
            for b in by_area
        ]
    return "\n".join(rows) + "\n"


def write_report(out: Path, metrics: dict, scored: list[Scored], threshold: float, name: str) -> None:  # type: ignore[type-arg]
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    (out / "metrics.md").write_text(markdown_table(metrics, name), encoding="utf-8")
    write_scores_csv(out / "scores.csv", scored, threshold)
    labels = np.array([s.sample.is_defect for s in scored])
    scores = np.array([s.score for s in scored])

    fig, ax = plt.subplots(figsize=(5, 5))
    curve = roc_curve(labels, scores)
    ax.plot(curve.x, curve.y, label=f"all (AUROC {metrics['image_auroc']:.3f})")
    for kind in metrics["per_defect"]:
        mask = np.array([(not s.sample.is_defect) or s.sample.defect_type == kind for s in scored])
        c = roc_curve(labels[mask], scores[mask])
        ax.plot(c.x, c.y, alpha=0.6, label=kind)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{name}: image ROC")
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(out / "roc.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = list(np.linspace(0, max(scores.max(), threshold) * 1.05, 40))
    ax.hist(scores[~labels], bins=bins, alpha=0.6, label="good")
    ax.hist(scores[labels], bins=bins, alpha=0.6, label="defect")
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.set(xlabel="normalised score", ylabel="images", title=f"{name}: scores")
    ax.legend()
    fig.savefig(out / "scores.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    _heatmap_grid(out / "heatmaps.png", scored, threshold)


def write_scores_csv(path: Path, scored: list[Scored], threshold: float) -> None:
    """One row per part, highest score first: which parts the threshold lets through or rejects.

    ``outcome`` is what a plant counts: ``escape`` (a defective part passed),
    ``false_reject`` (a good part failed), or ``ok``. ``defect_pixels`` is the
    mask's area (empty without a mask), so escapes can be sorted by size.
    """
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "defect_type", "defect_pixels", "score", "verdict", "outcome"])
        for s in sorted(scored, key=lambda s: -s.score):
            fail = fails(s.score, threshold)  # the daemon's rule: at the threshold, or not a number, is NG
            wrong = fail != s.sample.is_defect
            outcome = ("escape" if s.sample.is_defect else "false_reject") if wrong else "ok"
            area = "" if s.defect_pixels is None else str(s.defect_pixels)
            verdict = str(Label.NG if fail else Label.OK)
            w.writerow([str(s.sample.path), s.sample.defect_type, area, f"{s.score:.4f}", verdict, outcome])


def _heatmap_grid(path: Path, scored: list[Scored], threshold: float = 1.1, per_kind: int = 3) -> None:
    """A few images per defect type (and good), with their maps over them."""
    chosen: list[Scored] = []
    for kind in sorted({s.sample.defect_type for s in scored}):
        chosen += [s for s in scored if s.sample.defect_type == kind][:per_kind]
    cols = per_kind
    rows = int(np.ceil(len(chosen) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, s in zip(axes.ravel(), chosen, strict=False):
        frame = read_rgb(s.sample.path)
        if s.frame_map is not None:
            ax.imshow(overlay_heatmap(frame, s.frame_map, threshold, s.score))
        else:
            ax.imshow(frame)
        ax.set_title(f"{s.sample.defect_type} {s.score:.2f}", fontsize=8)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
