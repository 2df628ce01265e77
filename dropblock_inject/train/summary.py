"""What an ablation prints and writes at the end: the table, ``summary.json``/``.md`` and ``ablation.png``."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from dropblock_inject.train.checkpoints import write_file
from dropblock_inject.train.stats import LEVEL, ArmSummary, Summary, mean_interval

__all__ = ["SUMMARY_FILES", "format_summary", "plot_ablation", "write_summary"]

SUMMARY_FILES = ("summary.json", "summary.md", "ablation.png")


def format_summary(summary: Summary, description: str) -> str:
    """The table as printed (and as ``summary.md`` holds it): one row per arm, then one verdict per arm.

    Args:
        summary: The statistics.
        description: What was trained, for the heading (model, data, size, epochs).
    """
    seeds = sorted({s for a in summary.arms for s in a.seeds})
    lines = [
        f"Ablation: {description}; {len(seeds)} seeds ({_ranges(seeds)}), paired",
        f"Held-out accuracy and loss of the last epoch (no selection on the held-out split); mean over seeds "
        f"[{_pct(LEVEL)} t interval]",
        "",
        _markdown_table(summary),
        "",
    ]
    if summary.comparisons:
        m = len(summary.comparisons)
        joint = f"; the intervals hold jointly over {m} comparisons ({_pct(summary.comparisons[0].level)} each)"
        lines.append(f"Δ: accuracy minus {summary.baseline}'s on the same seed (same initial weights, data order and "
                     f"augmentation), in points{joint if m > 1 else ''}.")  # fmt: skip
        lines += [c.sentence() for c in summary.comparisons]
    lines += [f"{arm}: unavailable: {why}" for arm, why in summary.unavailable.items()]
    return "\n".join(lines)


def _markdown_table(summary: Summary) -> str:
    header = ("arm", "seeds", "accuracy %", "loss", "realised drop", f"Δ points vs {summary.baseline}", "won",
              "verdict")  # fmt: skip
    rows = [header, tuple("---" for _ in header)]
    for a in summary.arms:
        c = summary.comparison(a.arm)
        delta = f"{c.difference:+.2f} [{c.ci[0]:+.2f}, {c.ci[1]:+.2f}]" if c and math.isfinite(c.ci[0]) else ""
        won = f"{c.wins}/{len(c.seeds)}" if c else ""
        verdict = c.verdict if c else "baseline"
        rows.append((a.arm, str(len(a.seeds)), _mean_ci(a.accuracy, a.accuracy_ci, 2), _mean_ci(a.loss, a.loss_ci, 3),
                     _realised(a), delta, won, verdict))  # fmt: skip
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def _mean_ci(mean: float, ci: tuple[float, float], digits: int) -> str:
    if not math.isfinite(ci[0]):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _realised(arm: ArmSummary) -> str:
    if not arm.realised_by_stage:
        return f"{arm.realised:.3f}"
    return ", ".join(f"{size} {rate:.3f}" for size, rate in arm.realised_by_stage.items())


def _ranges(seeds: Sequence[int]) -> str:
    """``0-4, 7`` for the seeds 0, 1, 2, 3, 4, 7."""
    parts: list[list[int]] = []
    for s in seeds:
        if parts and s == parts[-1][-1] + 1:
            parts[-1].append(s)
        else:
            parts.append([s])
    return ", ".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


def _pct(level: float) -> str:
    return f"{100 * level:.4g} %"


def write_summary(folder: str, summary: Summary, table: str, rows: Sequence[Mapping[str, Any]],
                  curves: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]) -> list[str]:  # fmt: skip
    """Write ``summary.json`` (the statistics, ``extra`` and the runs), ``summary.md`` (``table``) and
    ``ablation.png``; returns their paths."""
    doc = {**extra, **summary.to_dict(), "runs": list(rows)}
    files = [write_file(folder, SUMMARY_FILES[0], json.dumps(doc, indent=2, default=str).encode())]
    files.append(write_file(folder, SUMMARY_FILES[1], (table + "\n").encode()))
    files.append(write_file(folder, SUMMARY_FILES[2], plot_ablation(summary, rows, curves)))
    return files


def plot_ablation(summary: Summary, rows: Sequence[Mapping[str, Any]], curves: Sequence[Mapping[str, Any]]) -> bytes:
    """``ablation.png``: each seed's accuracy as a dot per arm (a seed's dots joined), with the mean and
    its interval; and the held-out accuracy per epoch of each arm, mean and interval band."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display backend

    fig = Figure(figsize=(12, 4.6), layout="constrained")
    dots, lines = fig.subplots(1, 2, width_ratios=(1, 1.3))
    arms = [a.arm for a in summary.arms]
    _plot_seeds(dots, summary, rows)
    _plot_curves(lines, arms, curves)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _plot_seeds(ax: Any, summary: Summary, rows: Sequence[Mapping[str, Any]]) -> None:
    arms = [a.arm for a in summary.arms]
    acc = {(r["arm"], r["seed"]): 100 * r["val_acc"] for r in rows}
    for seed in sorted({s for a in summary.arms for s in a.seeds}):
        xs = [i for i, arm in enumerate(arms) if (arm, seed) in acc]
        ax.plot(xs, [acc[(arms[i], seed)] for i in xs], color="0.8", lw=0.8, zorder=1)
        ax.scatter(xs, [acc[(arms[i], seed)] for i in xs], s=14, color="0.45", zorder=2)
    for i, a in enumerate(summary.arms):
        low, high = a.accuracy_ci if math.isfinite(a.accuracy_ci[0]) else (a.accuracy, a.accuracy)
        ax.errorbar(i + 0.18, a.accuracy, yerr=[[a.accuracy - low], [high - a.accuracy]], fmt="o", color=f"C{i}",
                    capsize=4, zorder=3)  # fmt: skip
    ax.set_xticks(range(len(arms)), arms, rotation=20, ha="right")
    ax.set_ylabel("held-out accuracy, last epoch (%)")
    ax.set_title(f"each seed (grey; a seed's runs joined); mean and {_pct(LEVEL)} interval")


def _plot_curves(ax: Any, arms: Sequence[str], curves: Sequence[Mapping[str, Any]]) -> None:
    for i, arm in enumerate(arms):
        per_epoch: dict[int, list[float]] = {}
        for c in curves:
            if c["arm"] == arm:
                per_epoch.setdefault(c["epoch"], []).append(100 * c["val_acc"])
        epochs = sorted(per_epoch)
        mean = [float(np.mean(per_epoch[e])) for e in epochs]
        ax.plot(epochs, mean, "o-", ms=3, color=f"C{i}", label=arm)
        bands = [mean_interval(per_epoch[e]) for e in epochs]
        if all(math.isfinite(b[0]) for b in bands):
            ax.fill_between(epochs, [b[0] for b in bands], [b[1] for b in bands], color=f"C{i}", alpha=0.15, lw=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(f"held-out accuracy per epoch: mean and {_pct(LEVEL)} interval over seeds")
    ax.legend(loc="lower right", fontsize="small")
