"""Markdown tables laid out like the paper's ([M] Tables 1-4 and 6).

Dice scores are shown x100 with one decimal, as in the paper, and the regions in the
paper's column order: enhancing core, tumor core, whole tumor.
"""

import math

import numpy as np

from brats_tf.evaluation import stats
from brats_tf.evaluation.evaluate import summary_rows
from brats_tf.evaluation.stats import PAPER_REGIONS

REGION_TITLES = {"ET": "Enhancing core (ET)", "TC": "Tumor core (TC)", "WT": "Whole tumor (WT)"}


def markdown_table(header, rows):
    """A pipe table; the first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def mean_dice_table(evaluations, regions=PAPER_REGIONS):
    """Tables 1-3: one row per model, mean Dice (x100) per region, and the case count.

    evaluations: {model name: per-case rows}, in the order the rows should appear.
    """
    header = ["Model"] + [REGION_TITLES[r] for r in regions] + ["Cases"]
    body = []
    for model, rows in evaluations.items():
        means = [np.mean([row[f"Dice_{r}"] for row in rows]) for r in regions]
        body.append([model] + [_percent(m) for m in means] + [len(rows)])
    return markdown_table(header, body)


def pvalue_table(comparisons, regions=PAPER_REGIONS, test="t"):
    """Table 4: one row per comparison, p-values per region; significant (5%) in bold.

    comparisons: [(name, [PairedTest per region])]; test "t" (the paper's paired
    one-tailed t-test) or "wilcoxon".
    """
    header = ["Comparison"] + [REGION_TITLES[r] for r in regions] + ["Cases"]
    body = []
    for name, results in comparisons:
        by_region = {r.region: r for r in results}
        cells = []
        for region in regions:
            result = by_region[region]
            p = result.t_pvalue if test == "t" else result.wilcoxon_pvalue
            cells.append(stats.format_pvalue(p, bold_if_significant=True))
        body.append([name] + cells + [results[0].n])
    return markdown_table(header, body)


def mean_difference_table(comparisons, regions=PAPER_REGIONS):
    """Mean per-case Dice difference (candidate - baseline, x100) behind each comparison."""
    header = ["Comparison"] + [REGION_TITLES[r] for r in regions]
    body = []
    for name, results in comparisons:
        by_region = {r.region: r for r in results}
        body.append([name] + [f"{100 * by_region[r].mean_difference:+.1f}" for r in regions])
    return markdown_table(header, body)


def distribution_table(rows, regions=PAPER_REGIONS, metric="Dice"):
    """Table 6: Mean (std), Median, Quantile 25 %, Quantile 75 % of per-case scores (x100)."""
    columns = [f"{metric}_{r}" for r in regions]
    summary = {row["Label"]: row for row in summary_rows(rows, columns)}
    body = [["Mean"] + [f"{_percent(summary['Mean'][c])} ({_percent(summary['StdDev'][c])})" for c in columns],
            ["Median"] + [_percent(summary["Median"][c]) for c in columns],
            ["Quantile 25 %"] + [_percent(summary["25quantile"][c]) for c in columns],
            ["Quantile 75 %"] + [_percent(summary["75quantile"][c]) for c in columns]]
    return markdown_table([""] + [REGION_TITLES[r] for r in regions], body)


def _percent(value):
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.1f}"
