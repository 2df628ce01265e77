"""``train.stats``: intervals equal scipy's, the verdict claims no more than they support, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from dropblock_inject.train.stats import (
    LEVEL,
    mean_interval,
    paired,
    seeds_to_detect,
    summarise,
)

ACC_NONE = [0.9053, 0.8997, 0.9192, 0.9109, 0.8969]
ACC_ARM = [0.9136, 0.9025, 0.9248, 0.9081, 0.9081]


def rows(arms: dict[str, list[float]]) -> list[dict]:
    return [
        {"arm": arm, "seed": seed, "val_acc": acc, "val_loss": 1.0 - acc, "realised_drop": 0.0, "realised_by_stage": ""}
        for arm, accs in arms.items()
        for seed, acc in enumerate(accs)
    ]


class TestIntervals:
    def test_mean_interval_is_scipys_t_interval(self) -> None:
        x = [100 * a for a in ACC_NONE]
        expected = stats.t.interval(LEVEL, len(x) - 1, loc=np.mean(x), scale=stats.sem(x))
        assert mean_interval(x) == pytest.approx(expected, rel=1e-12)

    def test_paired_difference_is_scipys_ttest_rel(self) -> None:
        a, b = [100 * v for v in ACC_ARM], [100 * v for v in ACC_NONE]
        mean, ci = paired(a, b)
        d = np.subtract(a, b)
        assert mean == pytest.approx(d.mean(), rel=1e-12)
        expected = stats.t.interval(LEVEL, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
        assert ci == pytest.approx(expected, rel=1e-12)
        # the same interval as a one-sample interval of the differences: pairing, not two samples
        assert ci == pytest.approx(mean_interval(d), rel=1e-12)

    def test_known_numbers(self) -> None:
        mean, (low, high) = paired([91.0, 92.0, 93.5], [90.0, 91.0, 92.0])
        # d = 1, 1, 1.5: mean 7/6, sd 0.2887, t(0.975, 2) = 4.3027: 7/6 -/+ 4.3027 * 0.2887 / sqrt(3)
        half = stats.t.ppf(0.975, 2) * np.std([1, 1, 1.5], ddof=1) / math.sqrt(3)
        assert (mean, low, high) == pytest.approx((7 / 6, 7 / 6 - half, 7 / 6 + half), rel=1e-12)

    def test_equal_values_give_a_point_and_no_warning(self, recwarn) -> None:
        assert mean_interval([90.25, 90.25, 90.25]) == (90.25, 90.25)
        assert paired([91.0, 92.0], [90.0, 91.0]) == (1.0, (1.0, 1.0))
        assert not recwarn.list

    def test_one_value_has_no_interval(self) -> None:
        assert all(math.isnan(v) for v in mean_interval([90.0]))

    @pytest.mark.parametrize(("sd", "expected"), [(1.0, 34), (0.5, 10), (2.0, 128)])
    def test_seeds_to_detect_reaches_the_power_and_one_fewer_does_not(self, sd, expected) -> None:
        def power(n: int) -> float:
            crit = stats.t.ppf(0.975, n - 1)
            nc = 0.5 / (sd / math.sqrt(n))
            return stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc)

        n = seeds_to_detect(sd)
        assert n == expected
        assert power(n) >= 0.8 > power(n - 1)


class TestVerdict:
    def test_a_large_effect_is_better(self) -> None:
        s = summarise(rows({"none": ACC_NONE, "dropblock": [a + 0.05 for a in ACC_NONE]}), ["none", "dropblock"])
        c = s.comparison("dropblock")
        assert c.verdict == "better"
        assert c.wins == 5
        assert "better" in c.sentence()

    def test_a_large_loss_is_worse(self) -> None:
        s = summarise(rows({"none": ACC_NONE, "dropout": [a - 0.05 for a in ACC_NONE]}), ["none", "dropout"])
        assert s.comparison("dropout").verdict == "worse"

    def test_a_positive_mean_inside_the_noise_is_not_better(self) -> None:
        s = summarise(rows({"none": ACC_NONE, "dropblock": ACC_ARM}), ["none", "dropblock"])
        c = s.comparison("dropblock")
        assert c.difference > 0  # a point estimate would call it better
        assert c.ci[0] < 0 < c.ci[1]
        assert c.verdict == "no difference detectable"
        assert c.seeds_needed == seeds_to_detect(c.sd)
        assert f"no difference detectable with 5 seeds; about {c.seeds_needed} seeds" in c.sentence()

    def test_several_arms_get_simultaneous_intervals(self) -> None:
        arms = {"none": ACC_NONE, "a": ACC_ARM, "b": ACC_ARM, "c": ACC_ARM}
        s = summarise(rows(arms), list(arms))
        assert [c.level for c in s.comparisons] == pytest.approx([1 - 0.05 / 3] * 3)
        d = [100 * (x - y) for x, y in zip(ACC_ARM, ACC_NONE)]
        expected = stats.t.interval(1 - 0.05 / 3, 4, loc=np.mean(d), scale=stats.sem(d))
        assert s.comparison("a").ci == pytest.approx(expected, rel=1e-9)

    def test_pairs_by_seed_and_skips_unpaired_seeds(self) -> None:
        r = rows({"none": ACC_NONE, "dropblock": ACC_ARM})
        r = [x for x in r if not (x["arm"] == "dropblock" and x["seed"] == 4)]
        c = summarise(r, ["none", "dropblock"]).comparison("dropblock")
        assert c.seeds == [0, 1, 2, 3]

    def test_too_few_seeds_says_so(self) -> None:
        c = summarise(rows({"none": ACC_NONE[:1], "dropblock": ACC_ARM[:1]}), ["none", "dropblock"]).comparisons[0]
        assert c.verdict == "too few seeds"
        assert "at least 2" in c.sentence()

    def test_without_none_the_first_arm_is_the_baseline(self) -> None:
        s = summarise(rows({"dropout": ACC_NONE, "dropblock": ACC_ARM}), ["dropout", "dropblock"])
        assert s.baseline == "dropout"
        assert [c.arm for c in s.comparisons] == ["dropblock"]


@pytest.mark.slow
class TestCalibration:
    def test_null_effect_is_called_better_at_the_nominal_rate(self) -> None:
        # 2000 null experiments of 5 paired seeds: "better" (interval above 0) at 2.5 %;
        # sd of the rate sqrt(0.025 * 0.975 / 2000) = 0.0035, so 4 sd is 0.014 (a z interval would give ~6 %).
        rng = np.random.default_rng(0)
        calls = 0
        for _ in range(2000):
            base = 90 + rng.normal(0, 1.0, 5)
            arm = base + rng.normal(0, 0.6, 5)  # no effect, only noise
            _, (low, _high) = paired(arm, base)
            calls += low > 0
        assert abs(calls / 2000 - 0.025) < 0.014

    def test_bonferroni_keeps_the_family_wise_rate(self) -> None:
        # 1000 null experiments with 3 arms against none, at the level summarise gives 3 comparisons: any
        # "better" at most 2.5 % (about 2.4 %). sd sqrt(0.025 * 0.975 / 1000) = 0.0049: 4 sd above 0.025 is
        # 0.045; unadjusted 95 % intervals give about 6.5 %.
        level = summarise(rows({"none": ACC_NONE, "a": ACC_ARM, "b": ACC_ARM, "c": ACC_ARM}), ["none", *"abc"])
        level = level.comparisons[0].level
        rng = np.random.default_rng(1)
        any_better = 0
        for _ in range(1000):
            base = 90 + rng.normal(0, 1.0, 5)
            lows = [paired(base + rng.normal(0, 0.6, 5), base, level)[1][0] for _ in range(3)]
            any_better += max(lows) > 0
        assert any_better / 1000 < 0.045
