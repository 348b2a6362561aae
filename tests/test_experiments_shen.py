"""The [S] experiments end to end at a tiny scale (few phantoms, 2 iterations per model):
tables, histograms, predictions on the original grid, and re-runs that skip finished work."""

import os
import re
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from brats_tf import experiments
from brats_tf.configs.experiments import get_config
from brats_tf.experiments.shen import ABLATION, split_case_ids
from brats_tf.evaluation.evaluate import read_evaluation_csv

def _args(workdir, **kw):
    return SimpleNamespace(scale="tiny", config=None, workdir=str(workdir), data_dir=None, layout="auto",
                           layout_file=None, target_data_dir=None, seed=0, **kw)


def _table_rows(report):
    return [line for line in report.splitlines() if line.startswith("| ") and not line.startswith("| Model")]


def test_splits_are_seeded_disjoint_and_sized_like_the_paper():
    ids = [f"c{i:02d}" for i in range(57)]
    paper = get_config("paper").shen
    b = split_case_ids(ids, "b", paper, seed=3)
    assert len(b["train"]) == 11 and len(b["val"]) == 5 and len(b["test"]) == 41
    a = split_case_ids([f"c{i:03d}" for i in range(222)], "a", paper, seed=3)
    assert len(a["test"]) == 44 and len(a["val"]) == 5 and len(a["train"]) == 173
    for split in (a, b):
        parts = [set(v) for v in split.values()]
        assert sum(map(len, parts)) == len(set().union(*parts))
        assert all(v == sorted(v) for v in split.values())
    assert split_case_ids(ids, "b", paper, seed=3) == b != split_case_ids(ids, "b", paper, seed=4)


@pytest.mark.slow
def test_ablation_then_transfer_in_one_work_dir(tmp_path, capsys):
    report = experiments.run("shen_ablation", _args(tmp_path))
    text = open(report).read()
    rows = _table_rows(text.split("## Per-case")[0])
    assert len(rows) == len(ABLATION)
    assert "| BCN | + Dropout + Batch Normalization |" in text and "84.5 |" in text   # [S] Table 1 beside ours
    histograms = tmp_path / "shen_ablation" / "dice_histograms.png"
    assert histograms.stat().st_size > 10_000
    # Predictions: label maps on each case's original grid, evaluated per test case.
    model_dir = tmp_path / "models" / "site_a" / "bcn_dropout_bn"
    rows, _ = read_evaluation_csv(model_dir / "eval_site_a" / "evaluation.csv")
    assert len(rows) == 2 and all(0.0 <= r["Dice_WT"] <= 1.0 for r in rows)
    case = rows[0]["Label"]
    pred = nib.load(model_dir / "eval_site_a" / "predictions" / f"{case}_seg.nii.gz")
    ref = nib.load(tmp_path / "data" / "site_a" / case / f"{case}_seg.nii.gz")
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 2}       # binary: tumor written as 2
    # A re-run trains nothing and reports the same numbers.
    stamp = os.path.getmtime(model_dir / "model.keras")
    capsys.readouterr()
    assert open(experiments.run("shen_ablation", _args(tmp_path))).read().split("Wall time")[1].split(
        "## Mean")[1] == text.split("Wall time")[1].split("## Mean")[1]
    assert capsys.readouterr().out.count("finished earlier") == len(ABLATION)
    assert os.path.getmtime(model_dir / "model.keras") == stamp

    # Transfer reuses site A's plain BCN and FCN and trains 4 models on site B.
    report = experiments.run("shen_transfer", _args(tmp_path))
    out = capsys.readouterr().out
    assert out.count("finished earlier") == 2 and len(re.findall(r"on site b: 2 iterations", out)) == 4
    text = open(report).read()
    rows = _table_rows(text.split("For reference")[0])
    assert [r.split("|")[2].strip() for r in rows] == ["Pre-trained", "Re-trained", "Fine-tuned"] * 2
    assert "53.5 |" in text and "38.2 |" in text                        # [S] Table 2 beside ours
    assert (tmp_path / "shen_transfer" / "dice_histograms.png").stat().st_size > 10_000
    tuned = tmp_path / "models" / "site_b" / "fcn_finetuned"
    assert "batch_norm\": true" in (tuned / "model_info.json").read_text()
    b_rows, _ = read_evaluation_csv(tuned / "eval_site_b" / "evaluation.csv")
    assert len(b_rows) == 1
