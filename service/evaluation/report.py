"""Writing an evaluation: ``report.json``, ``report.md`` and PNG plots (matplotlib, Agg canvas).

Plots per category: ``plots/<category>_roc.png`` (image ROC) and
``plots/<category>_hist.png`` (score histograms of test good vs test defect images,
calibration scores as a line, the calibrated threshold drawn). Random-weight runs
say DEMO in every file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

COLUMNS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("aupro", "AUPRO@{limit}"),
    ("image_f1_max", "image F1-max"),
    ("false_reject_rate", "false-reject rate"),
    ("recall_at_threshold", "recall"),
)


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{100 * x:.1f} %" if pct else f"{x:.3f}"


def _markdown(report: dict[str, Any], plot_files: dict[str, list[str]]) -> str:
    lim = report["aupro_fpr_limit"]
    cal = report["calibration"]
    target = cal["target_false_reject_rate"]
    lines = ["# Evaluation report", ""]
    if report["demo"]:
        lines += [f"> **{report['warning']}.** Every figure below comes from random weights.", ""]
    lines += [
        f"- dataset: `{report['dataset']['root']}` ({report['dataset']['layout']} layout)",
        f"- method: `{report['method']}`, model `{report['model']}`, weights `{report['weights']}`",
        f"- references: {report['references']} golden images per category "
        + (f"({report['reference_selection']})" if report["references"] else "(zero-shot)"),
        f"- threshold: calibrated per category on {cal['images']} (at most {cal['max_images']}), "
        f"target false-reject rate {100 * target:g} %; {cal['bound']}. "
        f"The false-reject rate and recall are measured on the test images at that threshold.",
        f"- pixel metrics on maps and masks resized to {report['map_size']} x {report['map_size']}; "
        f"AUPRO integrated up to FPR {lim} and divided by it (anomalib convention)",
        "",
    ]
    head = ["category", "good", "defect"] + [c[1].format(limit=lim) for c in COLUMNS] + ["threshold"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    pct = {"false_reject_rate", "recall_at_threshold"}
    for name, c in report["categories"].items():
        cells = [name, str(c["n_test_good"]), str(c["n_test_defect"])]
        cells += [_fmt(c.get(k), k in pct) for k, _ in COLUMNS]
        cells.append(_fmt(c.get("threshold")))
        lines.append("| " + " | ".join(cells) + " |")
    m = report["mean"]
    cells = ["**mean**", "", ""] + [_fmt(m.get(k), k in pct) for k, _ in COLUMNS] + [""]
    lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Means are over the categories where the figure is defined.", ""]
    notes = [(n, note) for n, c in report["categories"].items() for note in c.get("notes", [])]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}: {note}" for n, note in notes] + [""]
    if plot_files:
        lines += ["## Plots", ""]
        for name, files in plot_files.items():
            lines.append(f"- {name}: " + ", ".join(f"[{Path(f).name}]({quote(f)})" for f in files))
        lines.append("")
    run = report["run"]
    lines.append(
        f"Run: {run['images_scored']} images scored, {run['images_from_cache']} from the cache, "
        f"{run['seconds']:.1f} s."
    )
    return "\n".join(lines) + "\n"


def _plots(name: str, raw: dict[str, Any], out_dir: Path, demo: bool) -> list[str]:
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    scores, labels = raw["scores"], raw["labels"]
    tag = "  [DEMO: random weights]" if demo else ""
    files: list[str] = []
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)

    if labels.min() != labels.max():
        fpr, tpr, _ = roc_curve(labels, scores)
        fig = Figure(figsize=(4.5, 4.5), dpi=100)
        ax = fig.add_subplot()
        ax.plot(fpr, tpr, lw=2)
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.set(xlabel="false positive rate (good images)", ylabel="true positive rate (defect images)")
        auc = roc_auc_score(labels, scores)
        ax.set_title(f"{name}: image ROC, AUROC {auc:.3f}{tag}", fontsize=9)
        fig.tight_layout()
        path = plot_dir / f"{name}_roc.png"
        fig.savefig(path)
        files.append(str(path.relative_to(out_dir)))

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.add_subplot()
    good, bad, cal = scores[labels == 0], scores[labels == 1], raw["calibration_scores"]
    everything = np.concatenate(
        [scores, cal] + ([[raw["threshold"]]] if raw["threshold"] is not None else [])
    )
    lo, hi = float(everything.min()), float(everything.max())
    pad = max(1e-3, 0.05 * (hi - lo))
    bins = np.linspace(lo - pad, hi + pad, 41).tolist()
    if good.size:
        ax.hist(
            good, bins=bins, density=True, alpha=0.55, label=f"test good ({good.size})", color="tab:green"
        )
    if bad.size:
        ax.hist(bad, bins=bins, density=True, alpha=0.55, label=f"test defect ({bad.size})", color="tab:red")
    if cal.size:
        ax.hist(
            cal,
            bins=bins,
            density=True,
            histtype="step",
            lw=1.5,
            label=f"calibration good ({cal.size})",
            color="k",
        )
    if raw["threshold"] is not None:
        ax.axvline(
            raw["threshold"], color="tab:blue", ls="--", lw=2, label=f"threshold {raw['threshold']:.4f}"
        )
    ax.set(xlabel="image score", ylabel="density")
    ax.set_title(f"{name}: scores{tag}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = plot_dir / f"{name}_hist.png"
    fig.savefig(path)
    files.append(str(path.relative_to(out_dir)))
    return files


def write_report(
    report: dict[str, Any], raws: dict[str, dict[str, Any]], out_dir: Path, *, plots: bool = True
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and the plots under ``out_dir``; return the file list.

    ``report`` gains nothing; the returned dict (``json``, ``markdown``, ``plots``) holds
    paths relative to ``out_dir`` and is also stored in ``report.json`` under ``files``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_files: dict[str, list[str]] = {}
    if plots:
        for name, raw in raws.items():
            plot_files[name] = _plots(name, raw, out_dir, report["demo"])
    files = {"json": "report.json", "markdown": "report.md", "plots": plot_files}
    doc = {**report, "files": files}
    (out_dir / "report.json").write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(_markdown(report, plot_files), encoding="utf-8")
    return files
