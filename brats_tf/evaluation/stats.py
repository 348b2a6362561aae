"""Paired statistical tests of per-case metrics (METHOD §7, [M] Table 4).

Paired tests join two evaluations on case id, never on position, and run per region
the paper's paired one-tailed t-test (`scipy.stats.ttest_rel(candidate, baseline,
alternative="greater")`) and the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`,
zero differences dropped, scipy's default), at a 5% significance level. Evaluation
CSVs are read with `metrics.read_evaluation_csv`.
"""

import csv
import io
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from brats_tf.errors import ConfigError
from brats_tf.io.files import write_text
from brats_tf.evaluation.evaluate import format_number, read_evaluation_csv
from brats_tf.evaluation.metrics import METRICS

ALTERNATIVES = ("greater", "less", "two-sided")
SIGNIFICANCE = 0.05
PAPER_REGIONS = ("ET", "TC", "WT")   # the paper's table order: enhancing core, tumor core, whole


@dataclass(frozen=True)
class PairedTest:
    """One region's comparison of a candidate with a baseline over the same cases."""
    region: str
    metric: str
    n: int
    baseline_mean: float
    candidate_mean: float
    t_statistic: float
    t_pvalue: float
    wilcoxon_statistic: float
    wilcoxon_pvalue: float
    alternative: str

    @property
    def mean_difference(self):
        return self.candidate_mean - self.baseline_mean

    @property
    def significant(self):
        """Paired t-test significant at 5% (the paper's criterion)."""
        return bool(self.t_pvalue < SIGNIFICANCE)


def join_cases(baseline_rows, candidate_rows, use_intersection=False, names=("baseline", "candidate")):
    """Pairs rows by case id: (sorted case ids, baseline rows, candidate rows).

    Different case sets are refused (ConfigError naming the differences) unless
    use_intersection, which keeps the common cases.
    """
    baseline = {row["Label"]: row for row in baseline_rows}
    candidate = {row["Label"]: row for row in candidate_rows}
    only_baseline = sorted(set(baseline) - set(candidate))
    only_candidate = sorted(set(candidate) - set(baseline))
    if (only_baseline or only_candidate) and not use_intersection:
        raise ConfigError(
            f"the evaluations cover different cases: {_some(only_baseline)} only in {names[0]}, "
            f"{_some(only_candidate)} only in {names[1]}; pass --use_intersection to compare the common cases")
    ids = sorted(set(baseline) & set(candidate))
    if not ids:
        raise ConfigError(f"{names[0]} and {names[1]} have no case in common")
    return ids, [baseline[i] for i in ids], [candidate[i] for i in ids]


def mean_over_runs(runs):
    """Per-case metric rows averaged over several runs on the same cases (e.g. training
    seeds): each numeric field's mean, for the cases every run scored, in the first run's order."""
    by_case = [{r["Label"]: r for r in rows} for rows in runs]
    common = [r["Label"] for r in runs[0] if all(r["Label"] in cases for cases in by_case)]
    out = []
    for case_id in common:
        rows = [cases[case_id] for cases in by_case]
        out.append({k: float(np.mean([r[k] for r in rows])) if isinstance(v, (int, float)) and not isinstance(v, bool)
                    else v for k, v in rows[0].items()})
    return out


def paired_tests(baseline_rows, candidate_rows, metric="Dice", regions=PAPER_REGIONS,
                 alternative="greater", use_intersection=False, names=("baseline", "candidate")):
    """Per region, paired one-tailed t-test and Wilcoxon test of candidate vs baseline.

    alternative="greater" tests whether the candidate's metric is larger (better for
    Dice). Returns one PairedTest per region, in `regions` order.
    """
    if alternative not in ALTERNATIVES:
        raise ConfigError(f"alternative: {alternative!r} is not one of {ALTERNATIVES}")
    if metric not in METRICS:
        raise ConfigError(f"metric: {metric!r} is not one of {METRICS}")
    ids, baseline, candidate = join_cases(baseline_rows, candidate_rows, use_intersection, names)
    results = []
    for region in regions:
        column = f"{metric}_{region}"
        for rows, name in ((baseline, names[0]), (candidate, names[1])):
            if column not in rows[0]:
                raise ConfigError(f"{name} has no column {column}")
        b = np.array([row[column] for row in baseline], dtype=np.float64)
        c = np.array([row[column] for row in candidate], dtype=np.float64)
        t = _ttest(c, b, alternative)
        w = _wilcoxon(c, b, alternative)
        results.append(PairedTest(region, metric, len(ids), float(b.mean()), float(c.mean()),
                                  t[0], t[1], w[0], w[1], alternative))
    return results


def _ttest(candidate, baseline, alternative):
    if candidate.size < 2 or np.all(candidate - baseline == (candidate - baseline)[0]):
        return math.nan, math.nan     # no variance in the differences: the test is undefined
    result = scipy_stats.ttest_rel(candidate, baseline, alternative=alternative)
    return float(result.statistic), float(result.pvalue)


def _wilcoxon(candidate, baseline, alternative):
    if not np.any(candidate != baseline):
        return math.nan, math.nan     # all differences zero: nothing to rank
    result = scipy_stats.wilcoxon(candidate, baseline, alternative=alternative)
    return float(result.statistic), float(result.pvalue)


def format_pvalue(p, bold_if_significant=False):
    """'0.0054', '<0.0001' or 'n/a'; significant values in **bold** when asked (Table 4)."""
    if p is None or math.isnan(p):
        return "n/a"
    text = "<0.0001" if p < 1e-4 else f"{p:.4f}"
    return f"**{text}**" if bold_if_significant and p < SIGNIFICANCE else text


def comparison_markdown(results, baseline_name="baseline", candidate_name="candidate"):
    """A markdown table of paired tests, one row per region; significant p-values in bold."""
    metric, alternative = results[0].metric, results[0].alternative
    tails = "two-sided" if alternative == "two-sided" else "one-tailed"
    lines = [
        f"{candidate_name} vs {baseline_name}: per-case {metric}, paired tests "
        f"(alternative: candidate {alternative}), n = {results[0].n} cases; "
        f"**bold**: significant at {SIGNIFICANCE:.0%}.",
        "",
        f"| Region | {baseline_name} mean | {candidate_name} mean | Mean difference | t | "
        f"p (paired t-test, {tails}) | p (Wilcoxon) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.region} | {r.baseline_mean:.4f} | {r.candidate_mean:.4f} | {r.mean_difference:+.4f} | "
                     f"{_format_float(r.t_statistic)} | {format_pvalue(r.t_pvalue, True)} | "
                     f"{format_pvalue(r.wilcoxon_pvalue, True)} |")
    return "\n".join(lines) + "\n"


def comparison_csv_text(results):
    """The same results as CSV text, full precision."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["region", "metric", "n", "baseline_mean", "candidate_mean", "mean_difference",
                     "t_statistic", "t_pvalue", "wilcoxon_statistic", "wilcoxon_pvalue", "alternative",
                     "significant"])
    for r in results:
        writer.writerow([r.region, r.metric, r.n] + [format_number(v) for v in (
            r.baseline_mean, r.candidate_mean, r.mean_difference, r.t_statistic, r.t_pvalue,
            r.wilcoxon_statistic, r.wilcoxon_pvalue)] + [r.alternative, int(r.significant)])
    return text.getvalue()


def compare_files(baseline_csv, candidate_csv, metric="Dice", alternative="greater",
                  use_intersection=False, out=None):
    """Paired tests of two evaluation CSVs; returns the markdown table.

    With `out`, also writes the table there: CSV when the name ends in .csv, else markdown.
    """
    baseline, _ = read_evaluation_csv(baseline_csv)
    candidate, _ = read_evaluation_csv(candidate_csv)
    names = (str(baseline_csv), str(candidate_csv))
    results = paired_tests(baseline, candidate, metric, PAPER_REGIONS, alternative, use_intersection, names)
    table = comparison_markdown(results, "baseline", "candidate")
    if out:
        text = comparison_csv_text(results) if str(out).endswith(".csv") else table
        write_text(out, text)
    return table


def _format_float(value):
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _some(ids, limit=3):
    shown = ", ".join(ids[:limit]) + (", ..." if len(ids) > limit else "")
    return f"{len(ids)} case(s)" + (f" ({shown})" if ids else "")
