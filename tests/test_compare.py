"""`python -m brats_tf.compare` on evaluation CSVs, as a user runs it."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from brats_tf.evaluation import evaluate, metrics
from brats_tf.evaluation import stats
from brats_tf.errors import ConfigError
from tests.conftest import run_module


def write_evaluation(path, dice_by_case):
    rows = []
    for case_id, dice in dice_by_case.items():
        row = {"Label": case_id, **{c: 0.5 for c in metrics.COLUMNS}}
        row.update({"Dice_ET": dice, "Dice_TC": dice * 0.9, "Dice_WT": min(dice * 1.1, 1.0)})
        rows.append(row)
    evaluate.write_evaluation_csv(path, rows)      # per-case rows, then Mean/StdDev/... rows
    return path


@pytest.fixture
def evaluations(tmp_path):
    rng = np.random.default_rng(3)
    base = rng.uniform(0.5, 0.8, 10)
    better = base + rng.uniform(-0.01, 0.05, 10)
    ids = [f"BraTS_{i:03d}" for i in range(10)]
    baseline = write_evaluation(tmp_path / "base.csv", dict(zip(ids, base)))
    # Candidate rows in another order: the join must be on case id.
    candidate = write_evaluation(tmp_path / "cand.csv", dict(zip(ids[::-1], better[::-1])))
    return baseline, candidate, base, better


def test_compare_prints_the_table_with_scipy_pvalues(evaluations, tmp_path):
    baseline, candidate, base, better = evaluations
    result = run_module("brats_tf.compare", "--baseline", baseline, "--candidate", candidate,
                        "--out", tmp_path / "table.md")
    assert result.returncode == 0, result.stderr
    p_et = scipy_stats.ttest_rel(better, base, alternative="greater").pvalue
    p_wt = scipy_stats.ttest_rel(np.minimum(better * 1.1, 1), np.minimum(base * 1.1, 1), alternative="greater").pvalue
    et_line = next(line for line in result.stdout.splitlines() if line.startswith("| ET |"))
    wt_line = next(line for line in result.stdout.splitlines() if line.startswith("| WT |"))
    assert stats.format_pvalue(p_et, True) in et_line
    assert stats.format_pvalue(p_wt, True) in wt_line
    assert "n = 10 cases" in result.stdout          # the summary rows were not taken as cases
    assert (tmp_path / "table.md").read_text() == result.stdout


def test_csv_output_and_other_metrics(evaluations, tmp_path):
    baseline, candidate, _, _ = evaluations
    out = tmp_path / "table.csv"
    stats.compare_files(baseline, candidate, metric="Hausdorff95", alternative="less", out=out)
    lines = out.read_text().splitlines()
    assert lines[0].split(",")[:3] == ["region", "metric", "n"]
    assert [line.split(",")[:3] for line in lines[1:]] == [["ET", "Hausdorff95", "10"],
                                                           ["TC", "Hausdorff95", "10"],
                                                           ["WT", "Hausdorff95", "10"]]


def test_different_case_sets_need_intersection(evaluations, tmp_path):
    baseline, _, base, better = evaluations
    fewer = write_evaluation(tmp_path / "fewer.csv", {f"BraTS_{i:03d}": better[i] for i in range(8)})
    with pytest.raises(ConfigError, match=r"2 case\(s\) \(BraTS_008, BraTS_009\) only in"):
        stats.compare_files(baseline, fewer)
    table = stats.compare_files(baseline, fewer, use_intersection=True)
    p_et = scipy_stats.ttest_rel(better[:8], base[:8], alternative="greater").pvalue
    assert stats.format_pvalue(p_et, True) in table and "n = 8 cases" in table


def test_cli_errors_are_one_line(tmp_path, evaluations):
    baseline, _, _, better = evaluations
    fewer = write_evaluation(tmp_path / "fewer.csv", {f"BraTS_{i:03d}": better[i] for i in range(8)})
    broken = tmp_path / "broken.csv"
    broken.write_text("Label,Dice_ET\ncase,abc\n")
    for candidate, message in ((fewer, "only in"), (broken, f"{broken}: line 2: Dice_ET value 'abc' is not a number")):
        result = run_module("brats_tf.compare", "--baseline", baseline, "--candidate", candidate)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr
