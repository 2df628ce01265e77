"""The statistics of an ablation, from scipy.stats: means and paired differences with t intervals.

Per arm: the mean held-out accuracy (in %) and loss over seeds with a 95 % t confidence interval.
Per arm against the baseline (``none``): the mean of the per-seed differences (the seed fixes the
initial weights, the data order and the augmentation, so most of the run-to-run noise cancels),
its t interval, and the share of seeds won. With several arms against one baseline the
difference intervals are simultaneous: each at ``1 - 0.05 / m`` (Bonferroni), so that all ``m``
hold together with 95 % confidence and a sweep of many arms does not find a winner by chance.

The verdict never says more than that interval: ``better`` or ``worse`` only when it excludes 0,
otherwise "no difference detectable" with how many seeds would detect a 0.5-point difference with
80 % power at the spread observed (a paired t-test's power, from the noncentral t distribution).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np

__all__ = ["LEVEL", "ArmSummary", "Comparison", "Summary", "mean_interval", "paired", "seeds_to_detect", "summarise"]

LEVEL = 0.95  # the confidence of every interval (simultaneous for the paired differences)
DETECT_POINTS = 0.5  # the difference, in accuracy points, that the seed estimate is for
POWER = 0.8
MAX_SEEDS = 100_000
Verdict = Literal["better", "worse", "no difference detectable", "too few seeds"]


def mean_interval(values: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The t confidence interval of the mean of ``values`` (scipy's ``ttest_1samp``); a point when they are equal.

    Example:
        >>> [round(v, 3) for v in mean_interval([90.0, 91.0, 92.5])]
        [88.041, 94.292]
    """
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return (math.nan, math.nan)
    if np.ptp(x) == 0:
        return (float(x[0]), float(x[0]))
    from scipy import stats  # here: scipy.stats takes a second to import, which the command line need not pay

    ci = stats.ttest_1samp(x, 0.0).confidence_interval(level)
    return (float(ci.low), float(ci.high))


def paired(arm: Sequence[float], baseline: Sequence[float], level: float = LEVEL) -> tuple[float, tuple[float, float]]:
    """The mean of ``arm - baseline`` (paired by position) and its t interval (scipy's ``ttest_rel``).

    Example:
        >>> mean, (low, high) = paired([91.0, 92.0, 93.5], [90.0, 91.0, 92.0])
        >>> round(mean, 3), round(low, 3), round(high, 3)
        (1.167, 0.45, 1.884)
    """
    a, b = np.asarray(arm, dtype=float), np.asarray(baseline, dtype=float)
    d = np.round(a - b, 9)  # accuracies are counts / n: drop float noise, so equal differences are equal
    if len(d) < 2:
        return (float(d.mean()) if len(d) else math.nan, (math.nan, math.nan))
    if np.ptp(d) == 0:
        return (float(d[0]), (float(d[0]), float(d[0])))
    from scipy import stats

    ci = stats.ttest_rel(a, b).confidence_interval(level)
    return (float(d.mean()), (float(ci.low), float(ci.high)))


def seeds_to_detect(sd: float, effect: float = DETECT_POINTS, alpha: float = 1 - LEVEL, power: float = POWER) -> int:
    """The fewest seeds at which a two-sided paired t-test at ``alpha`` finds a true mean difference
    ``effect`` with probability ``power``, when the paired differences have standard deviation ``sd``.

    Returns ``MAX_SEEDS + 1`` when even ``MAX_SEEDS`` are not enough.

    Example:
        >>> seeds_to_detect(1.0)  # sd 1 point: 34 seeds find a 0.5-point difference 80 % of the time
        34
    """
    if sd <= 0:
        return 2
    lo, hi = 1, 2
    while _power(hi, sd, effect, alpha) < power:
        if hi > MAX_SEEDS:
            return MAX_SEEDS + 1
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # the power grows with n: bisect for the first n that reaches it
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if _power(mid, sd, effect, alpha) >= power else (mid, hi)
    return hi


def _power(n: int, sd: float, effect: float, alpha: float) -> float:
    from scipy import stats

    df = n - 1
    nc = effect / (sd / math.sqrt(n))
    crit = stats.t.ppf(1 - alpha / 2, df)
    return float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))


@dataclass
class ArmSummary:
    """One arm over its seeds: accuracy in %, loss, realised drop (last epoch), each a mean with its interval."""

    arm: str
    seeds: list[int]
    accuracy: float
    accuracy_ci: tuple[float, float]
    loss: float
    loss_ci: tuple[float, float]
    realised: float
    realised_by_stage: dict[str, float] = field(default_factory=dict)


@dataclass
class Comparison:
    """An arm against the baseline, paired by seed; differences in accuracy points."""

    arm: str
    baseline: str
    seeds: list[int]
    difference: float
    ci: tuple[float, float]
    level: float
    sd: float
    wins: int
    ties: int
    verdict: Verdict
    seeds_needed: int | None

    def sentence(self) -> str:
        """The verdict as one line that says no more than the interval."""
        n = len(self.seeds)
        if self.verdict == "too few seeds":
            return f"{self.arm} vs {self.baseline}: {n} paired seed(s); at least 2 are needed for an interval"
        head = (f"{self.arm} vs {self.baseline}: {self.difference:+.2f} points ({_percent(self.level)} CI "
                f"{self.ci[0]:+.2f} to {self.ci[1]:+.2f}; won {self.wins}/{n} seeds)")  # fmt: skip
        if self.verdict != "no difference detectable":
            return f"{head}: {self.verdict}"
        if self.sd == 0:
            return f"{head}: no difference detectable; every seed gave the same difference"
        need = f"{self.seeds_needed}" if self.seeds_needed <= MAX_SEEDS else f"more than {MAX_SEEDS}"
        return (f"{head}: no difference detectable with {n} seeds; about {need} seeds would detect a "
                f"{DETECT_POINTS:g}-point difference ({100 * POWER:.0f} % power) at the observed spread "
                f"(sd {self.sd:.2f})")  # fmt: skip


@dataclass
class Summary:
    """Every arm's summary and every arm against the baseline (None: no arm to compare with)."""

    baseline: str | None
    arms: list[ArmSummary]
    comparisons: list[Comparison]
    unavailable: dict[str, str] = field(default_factory=dict)

    def comparison(self, arm: str) -> Comparison | None:
        return next((c for c in self.comparisons if c.arm == arm), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "level": LEVEL,
            "baseline": self.baseline,
            "arms": [asdict(a) for a in self.arms],
            "comparisons": [{**asdict(c), "sentence": c.sentence()} for c in self.comparisons],
            "unavailable": self.unavailable,
        }


def summarise(rows: Sequence[dict[str, Any]], arms: Sequence[str], baseline: str | None = "none") -> Summary:
    """Summarise finished runs: one row per (arm, seed) with ``val_acc`` (a fraction), ``val_loss``,
    ``realised_drop`` and ``realised_by_stage`` (as :func:`~dropblock_inject.train.meter.format_realised`
    writes it).

    Args:
        rows: The runs (several rows for one (arm, seed): the last counts).
        arms: The arms, in the order to show them; arms without rows are left out.
        baseline: The arm the others are compared with; the first arm when it is absent.

    Example:
        >>> rows = [{"arm": a, "seed": s, "val_acc": acc, "val_loss": 0.3, "realised_drop": 0.0,
        ...          "realised_by_stage": ""} for a, s, acc in [("none", 0, 0.90), ("none", 1, 0.92),
        ...          ("dropblock", 0, 0.91), ("dropblock", 1, 0.94)]]
        >>> s = summarise(rows, ["none", "dropblock"])
        >>> round(s.arms[0].accuracy, 2), s.comparisons[0].wins, s.comparisons[0].verdict
        (91.0, 2, 'no difference detectable')
    """
    by_arm = _by_arm(rows)
    present = [a for a in arms if a in by_arm]
    base = baseline if baseline in by_arm else (present[0] if present else None)
    summaries = [_arm_summary(a, by_arm[a]) for a in present]
    others = [a for a in present if a != base]
    level = 1 - (1 - LEVEL) / max(1, len(others))
    comparisons = [_compare(a, base, by_arm, level) for a in others] if base else []
    return Summary(base, summaries, comparisons)


def _by_arm(rows: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    by_arm: dict[str, dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_arm.setdefault(str(row["arm"]), {})[int(row["seed"])] = row
    return {arm: dict(sorted(runs.items())) for arm, runs in by_arm.items()}


def _arm_summary(arm: str, runs: dict[int, dict[str, Any]]) -> ArmSummary:
    acc = [100 * float(r["val_acc"]) for r in runs.values()]
    loss = [float(r["val_loss"]) for r in runs.values()]
    stages: dict[str, list[float]] = {}
    for r in runs.values():
        for item in str(r.get("realised_by_stage") or "").split():
            size, _, rate = item.partition("=")
            stages.setdefault(size, []).append(float(rate))
    realised = float(np.mean([float(r.get("realised_drop") or 0.0) for r in runs.values()]))
    return ArmSummary(arm, list(runs), float(np.mean(acc)), mean_interval(acc), float(np.mean(loss)),
                      mean_interval(loss), realised, {k: float(np.mean(v)) for k, v in stages.items()})  # fmt: skip


def _compare(arm: str, base: str, by_arm: dict[str, dict[int, dict[str, Any]]], level: float) -> Comparison:
    seeds = sorted(set(by_arm[arm]) & set(by_arm[base]))
    a = [100 * float(by_arm[arm][s]["val_acc"]) for s in seeds]
    b = [100 * float(by_arm[base][s]["val_acc"]) for s in seeds]
    mean, ci = paired(a, b, level)
    d = np.round(np.subtract(a, b), 9)
    sd = float(np.std(d, ddof=1)) if len(d) > 1 else math.nan
    verdict: Verdict
    if len(seeds) < 2:
        verdict = "too few seeds"
    else:
        verdict = "better" if ci[0] > 0 else "worse" if ci[1] < 0 else "no difference detectable"
    needed = seeds_to_detect(sd, alpha=1 - level) if verdict == "no difference detectable" else None
    return Comparison(arm, base, seeds, mean, ci, level, sd, int((d > 0).sum()), int((d == 0).sum()), verdict, needed)


def _percent(level: float) -> str:
    return f"{100 * level:.4g} %"
