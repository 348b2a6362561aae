"""Paired tests: the t-test against its textbook formula and scipy, the Wilcoxon test
against an exact enumeration, joining on case id, and the markdown table."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from brats_tf.evaluation import stats
from brats_tf.errors import ConfigError

BASELINE = np.array([0.70, 0.75, 0.80, 0.60, 0.85, 0.90, 0.65, 0.72])
DIFFERENCES = np.array([0.02, 0.05, -0.01, 0.04, 0.03, 0.06, 0.015, 0.035])   # distinct |d|: no ties
CANDIDATE = BASELINE + DIFFERENCES


def rows(values_by_region, ids=None):
    ids = ids or [f"case_{i}" for i in range(len(next(iter(values_by_region.values()))))]
    return [{"Label": case_id, **{f"Dice_{r}": float(v[i]) for r, v in values_by_region.items()}}
            for i, case_id in enumerate(ids)]


def all_regions(values):
    return {"ET": values, "TC": values * 0.9, "WT": values * 0.95}


def test_t_test_matches_textbook_formula_and_scipy():
    result = stats.paired_tests(rows(all_regions(BASELINE)), rows(all_regions(CANDIDATE)))[0]
    d = CANDIDATE - BASELINE
    t = d.mean() / (d.std(ddof=1) / math.sqrt(d.size))
    assert result.t_statistic == pytest.approx(t, rel=1e-9)
    assert result.t_pvalue == pytest.approx(scipy_stats.t.sf(t, d.size - 1), rel=1e-9)     # one-tailed
    assert result.t_pvalue == pytest.approx(
        scipy_stats.ttest_rel(CANDIDATE, BASELINE, alternative="greater").pvalue, rel=1e-12)
    two_sided = stats.paired_tests(rows(all_regions(BASELINE)), rows(all_regions(CANDIDATE)),
                                   alternative="two-sided")[0]
    assert two_sided.t_pvalue == pytest.approx(2 * result.t_pvalue, rel=1e-9)
    assert result.n == 8 and result.region == "ET"
    assert result.mean_difference == pytest.approx(d.mean())


def exact_wilcoxon_greater(d):
    """P(W+ >= observed) over all 2^n sign flips: the exact null distribution."""
    ranks = scipy_stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    flips = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=d.size)]
    return observed, np.mean(np.array(flips) >= observed - 1e-9)


def test_wilcoxon_matches_exact_enumeration():
    result = stats.paired_tests(rows(all_regions(BASELINE)), rows(all_regions(CANDIDATE)))[0]
    statistic, p = exact_wilcoxon_greater(CANDIDATE - BASELINE)
    assert result.wilcoxon_statistic == pytest.approx(statistic)
    assert result.wilcoxon_pvalue == pytest.approx(p, rel=1e-9)
    assert result.wilcoxon_pvalue == pytest.approx(
        scipy_stats.wilcoxon(CANDIDATE, BASELINE, alternative="greater").pvalue)


def test_regions_come_in_the_requested_order_with_their_own_data():
    results = stats.paired_tests(rows(all_regions(BASELINE)), rows(all_regions(CANDIDATE)),
                                 regions=("WT", "ET", "TC"))
    assert [r.region for r in results] == ["WT", "ET", "TC"]
    assert results[0].baseline_mean == pytest.approx(BASELINE.mean() * 0.95)
    assert results[2].baseline_mean == pytest.approx(BASELINE.mean() * 0.9)


def test_rows_are_joined_on_case_id_not_position():
    baseline = rows(all_regions(BASELINE))
    candidate = rows(all_regions(CANDIDATE))
    reversed_candidate = candidate[::-1]
    in_order = stats.paired_tests(baseline, candidate)[0]
    shuffled = stats.paired_tests(baseline, reversed_candidate)[0]
    assert shuffled.t_pvalue == pytest.approx(in_order.t_pvalue, rel=1e-12)
    # Joined by position instead, the answer would differ:
    positional = scipy_stats.ttest_rel([r["Dice_ET"] for r in reversed_candidate], BASELINE,
                                       alternative="greater").pvalue
    assert abs(positional - in_order.t_pvalue) > 1e-3


def test_different_case_sets_are_refused_unless_intersection():
    baseline = rows(all_regions(BASELINE))
    candidate = rows(all_regions(CANDIDATE))[:6] + [{"Label": "extra", "Dice_ET": 1.0, "Dice_TC": 1.0,
                                                     "Dice_WT": 1.0}]
    with pytest.raises(ConfigError, match=r"2 case\(s\) \(case_6, case_7\) only in baseline.*1 case\(s\) \(extra\)"):
        stats.paired_tests(baseline, candidate)
    result = stats.paired_tests(baseline, candidate, use_intersection=True)[0]
    assert result.n == 6
    expected = scipy_stats.ttest_rel(CANDIDATE[:6], BASELINE[:6], alternative="greater").pvalue
    assert result.t_pvalue == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ConfigError, match="no case in common"):
        stats.paired_tests(baseline, [{"Label": "x", "Dice_ET": 1.0}], use_intersection=True)


def test_degenerate_differences_give_nan_not_a_crash():
    same = stats.paired_tests(rows(all_regions(BASELINE)), rows(all_regions(BASELINE)))[0]
    assert math.isnan(same.t_pvalue) and math.isnan(same.wilcoxon_pvalue) and not same.significant
    one = stats.paired_tests(rows({"ET": [0.5], "TC": [0.5], "WT": [0.5]}),
                             rows({"ET": [0.7], "TC": [0.7], "WT": [0.7]}))[0]
    assert one.n == 1 and math.isnan(one.t_pvalue)


def test_bad_arguments_are_config_errors():
    baseline, candidate = rows(all_regions(BASELINE)), rows(all_regions(CANDIDATE))
    with pytest.raises(ConfigError, match="alternative"):
        stats.paired_tests(baseline, candidate, alternative="bigger")
    with pytest.raises(ConfigError, match="metric"):
        stats.paired_tests(baseline, candidate, metric="Jaccard")
    with pytest.raises(ConfigError, match="no column Hausdorff95_ET"):
        stats.paired_tests(baseline, candidate, metric="Hausdorff95")


def test_pvalue_formatting_and_significance_marks():
    assert stats.format_pvalue(0.0054) == "0.0054"
    assert stats.format_pvalue(0.0054, bold_if_significant=True) == "**0.0054**"
    assert stats.format_pvalue(0.1058, bold_if_significant=True) == "0.1058"
    assert stats.format_pvalue(0.05, bold_if_significant=True) == "0.0500"      # 5% is not < 5%
    assert stats.format_pvalue(3e-6) == "<0.0001"
    assert stats.format_pvalue(math.nan) == "n/a"


def test_comparison_markdown_lists_every_region():
    results = stats.paired_tests(rows(all_regions(BASELINE)), rows(all_regions(CANDIDATE)))
    table = stats.comparison_markdown(results, "3D", "2D-3D")
    body = [line for line in table.splitlines() if line.startswith("| ") and "Region" not in line]
    assert [line.split("|")[1].strip() for line in body] == ["ET", "TC", "WT"]
    assert "p (paired t-test, one-tailed)" in table and "n = 8 cases" in table
    assert stats.format_pvalue(results[0].t_pvalue, True) in body[0]
    csv_lines = stats.comparison_csv_text(results).splitlines()
    assert csv_lines[0].startswith("region,metric,n,") and len(csv_lines) == 4


def test_mean_over_runs_averages_each_case_and_keeps_the_cases_every_run_scored():
    from brats_tf.evaluation.stats import mean_over_runs
    runs = [[{"Label": "a", "Dice_WT": 0.5, "Note": "x"}, {"Label": "b", "Dice_WT": 1.0, "Note": "y"}],
            [{"Label": "b", "Dice_WT": 0.0, "Note": "y"}, {"Label": "a", "Dice_WT": 0.7, "Note": "x"}],
            [{"Label": "a", "Dice_WT": 0.3, "Note": "x"}, {"Label": "b", "Dice_WT": 0.5, "Note": "y"},
             {"Label": "c", "Dice_WT": 0.9, "Note": "z"}]]
    assert mean_over_runs(runs) == [{"Label": "a", "Dice_WT": pytest.approx(0.5), "Note": "x"},
                                    {"Label": "b", "Dice_WT": pytest.approx(0.5), "Note": "y"}]
