"""[M]'s experiments: splits, config overrides, the missing-sequence data copy, and (slow)
the demo and table2_missing end to end at a tiny scale, with re-runs that skip finished
work and a resumed training."""

import json
import os
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest

from brats_tf import experiments
from brats_tf.synthetic import generator as synthetic
from brats_tf.inference import features as features_lib
from brats_tf.configs import train3d
from brats_tf.configs.experiments import get_config
from brats_tf.errors import ConfigError
from brats_tf.experiments import common
from brats_tf.experiments import mlynarski as M
from brats_tf.io.cases import discover_cases
from brats_tf.evaluation.evaluate import read_evaluation_csv

def _args(workdir, **kw):
    values = dict(scale="tiny", config=None, workdir=str(workdir), data_dir=None, layout="auto", layout_file=None,
                  test_dir=None, seed=0, strategy="off", config_2d=[], config_3d=[])
    values.update(kw)
    return SimpleNamespace(**values)


def test_split_is_seeded_over_sorted_ids_and_keeps_two_training_cases():
    ids = [f"c{i:03d}" for i in range(285)]
    paper, demo = get_config("paper"), get_config("demo")
    split = M.split_case_ids(ids[::-1], paper, seed=1)
    assert (len(split["test"]), len(split["val"]), len(split["train"])) == (50, 5, 230)
    assert sorted(sum(split.values(), [])) == ids and all(v == sorted(v) for v in split.values())
    assert split == M.split_case_ids(ids, paper, seed=1) != M.split_case_ids(ids, paper, 2)
    three = M.split_case_ids(["a", "b", "c"], demo, seed=0)
    assert (len(three["test"]), len(three["val"]), len(three["train"])) == (1, 0, 2)
    external = M.split_case_ids(ids[:20], demo, seed=0, external_test=True)
    assert external["test"] == [] and len(external["train"]) == 18
    with pytest.raises(ConfigError, match="too few"):
        M.split_case_ids(["a"], demo, seed=0)


def test_subsets_deal_the_training_cases_evenly():
    split = M.split_case_ids([f"c{i:02d}" for i in range(20)], get_config("demo"), seed=0, subsets=5)
    sizes = sorted(len(s) for s in split["subsets"])
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == len(split["train"])
    assert sorted(sum(split["subsets"], [])) == split["train"]


def test_config_overrides_are_parsed_and_unknown_keys_refused():
    # The old spelling (--config_3d KEY=VALUE, Python literals), applied last to a model's config.
    overrides = ["model.levels=(4, 6, 8)", "optim.accumulation_steps=2", "train.strategy=mirrored"]
    c = common.old_overrides(train3d.get_config("small"), _args(None, config_3d=overrides), "3d")
    assert c.model.levels == (4, 6, 8) and c.optim.accumulation_steps == 2 and c.train.strategy == "mirrored"
    with pytest.raises(ConfigError, match="no 'model.widths'"):
        common.old_overrides(c, _args(None, config_3d=["model.widths=3"]), "3d")
    with pytest.raises(ConfigError, match=r"--config.threed.model.widths=3\): the config has no 'model.widths'"):
        common.experiment_config(_args(None, config_3d=["model.widths=3"]))   # refused before any work


def test_3d_patch_sides_off_the_pooled_grid_are_refused_before_any_work():
    config = get_config("demo")
    config.threed.model.design = "pooled"
    with pytest.raises(ConfigError, match=r"--config.threed.model.input_size=54: .*use 52 or 56"):
        common.experiment_config(_args(None, config=config))
    config.threed.model.input_size = 56
    with pytest.raises(ConfigError, match=r"--config.standard_input_size=62: .*use 60 or 64"):
        common.experiment_config(_args(None, config=config))
    config.standard_input_size = 64
    assert common.experiment_config(_args(None, config=config)).threed.model.design == "pooled"


def _model_configs(args):
    """The resolved configs of 2D model 2 coronal, 2D-3D model B (model 1 features) and a
    pretrained subnetwork for a run with `args`, on a fixed split."""
    run = M.Run(args, "demo", ("x",))
    split = {"train": ["c1", "c2", "c3"], "val": ["c4"], "test": ["c0"]}
    data = M.Data("D", "auto", None, "R", {}, split, "D", "auto", None)
    dirs = {f"2d_model1_{o}": f"m/{o}" for o in M.ORIENTATIONS}
    return (run.config_2d(M.twod("model2", "coronal"), data), run.config_3d(M.twod3d("B", "model1"), data,
                                                                             {"model1": "F"}, dirs),
            run.config_2d(M.twod("model1"), data, iterations=run.scale.pretrain_iterations, subnetwork="t2"))


def test_scale_configs_and_overrides_reach_every_model_config(tmp_path):
    two, three, sub = _model_configs(_args(tmp_path, scale="demo", seed=3))
    assert (two.model.kind, two.data.orientation, two.seed, two.data.records_dir) == ("model2", "coronal", 3, "R")
    assert (two.data.train_cases, two.data.val_cases, two.train.iterations) == (["c1", "c2", "c3"], ["c4"], 90)
    assert (two.optim.learning_rate, two.train.precise_bn_batches) == (0.05, 40) and three.model.input_size == 54 and three.train.iterations == 45
    assert three.train.average_last == 15
    assert (three.model.kind, three.features.dir, three.features.kind) == ("B", "F", "model1")
    assert three.features.models == "m/axial,m/coronal,m/sagittal"
    assert (sub.train.iterations, sub.train.subnetwork, sub.model.kind) == (200, "t2", "model1")
    # --config.x overrides (the scale's config) reach every model; the run's own fields stay its own.
    config = get_config("demo")
    config.twod.train.iterations, config.twod.model.kind, config.threed.model.input_size = 30, "unet_axial", 70
    config.pretrain_iterations = 7
    two, three, sub = _model_configs(_args(tmp_path, config=config, strategy="mirrored"))
    assert (two.train.iterations, two.model.kind, three.model.input_size, sub.train.iterations) == (30, "model2", 70, 7)
    assert two.train.strategy == three.train.strategy == "mirrored"      # --strategy on every model
    config.threed.train.strategy = "tpu"                                   # ... unless the config sets one
    assert _model_configs(_args(tmp_path, config=config, strategy="mirrored"))[1].train.strategy == "tpu"
    # The old spelling keeps working, applied last to each model's config as before.
    two, three, sub = _model_configs(_args(tmp_path, scale="demo", config_2d=["train.iterations=30"],
                                           config_3d=["model.input_size=70", "model.levels=(4, 6, 8)"]))
    assert (two.train.iterations, sub.train.iterations, three.model.input_size) == (30, 30, 70)
    assert three.model.levels == (4, 6, 8)
    assert "2D settings {'deterministic': True, 'optim.learning_rate': 0.05" in M.Run(_args(tmp_path, scale="demo"), "demo", ("x",)) \
        ._settings_note(M.Data("D", "auto", None, "R", {"cases": [], "modalities": ["t1"], "normalization": "median"},
                               {"train": [], "val": [], "test": []}, "D", "auto", None))


def test_missing_sequence_copy_links_every_file_but_the_dropped_ones(tmp_path):
    data = tmp_path / "data"
    synthetic.write_dataset(data, 3, seed=0, shape=(24, 24, 20), progress=False)
    ids = sorted(c.case_id for c in discover_cases(data))
    out = tmp_path / "missing"
    M.link_dataset_without(str(data), str(out), "auto", None, {ids[1]: "t2", ids[2]: "flair"})
    cases = {c.case_id: c for c in discover_cases(out)}
    assert set(cases[ids[0]].images) == {"t1", "t1c", "t2", "flair"}
    assert "t2" not in cases[ids[1]].images and "t2" in cases[ids[1]].missing
    assert "flair" not in cases[ids[2]].images and cases[ids[2]].label is not None
    linked = cases[ids[0]].images["t1"].path
    assert os.path.islink(linked) and os.path.realpath(linked).startswith(str(data))


@pytest.mark.slow
def test_demo_end_to_end_then_a_rerun_skips_and_a_lost_export_resumes(tmp_path, capsys):
    report = experiments.run("demo", _args(tmp_path))
    text = open(report).read()
    rows = [M.twod("model1").row, M.twod("model2").row, M.STANDARD_3D.row] + [m.row for m in M.SIX_2D3D] + \
        [M.ENSEMBLE_ROW]
    for row in rows:
        assert f"| {row} |" in text
    assert "Standard 3D vs 2D-3D" in text and "2D-3D vs ensembling of 2D-3D" in text
    assert "## Time per stage" in text and (tmp_path / "demo" / "dice_boxplots.png").stat().st_size > 5_000
    assert (tmp_path / "demo" / "feature_maps.png").exists() and (tmp_path / "demo" / "segmentations.png").exists()
    split = json.loads((tmp_path / "split.json").read_text())
    evaluation, _ = read_evaluation_csv(tmp_path / "demo" / "evaluation" / "ensemble.csv")
    assert [r["Label"] for r in evaluation] == split["test"]
    # Every prediction lies on its case's original grid with BraTS labels.
    case = split["test"][0]
    pred = nib.load(tmp_path / "demo" / "predictions" / "3d_A_model1" / f"{case}_seg.nii.gz")
    ref = nib.load(tmp_path / "data" / "phantoms" / case / f"{case}_seg.nii.gz")
    assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 4}
    features = json.loads((tmp_path / "features" / "model1" / features_lib.MANIFEST).read_text())
    assert features["complete"] and features["kind"] == "model1"

    # A re-run trains and predicts nothing and reproduces the tables.
    capsys.readouterr()
    again = open(experiments.run("demo", _args(tmp_path))).read()
    out = capsys.readouterr().out
    assert out.count(": complete (") == 6 + 7 + 2 and "training" not in out and "label maps" not in out
    assert [line.split("]")[0] for line in out.splitlines() if line.startswith("[")] == [f"[{i}/7" for i in range(1, 8)]
    assert again.split("## Figures")[0] == text.split("## Figures")[0]

    # An export lost after the last checkpoint: the model resumes (no new iterations),
    # is exported again, and only then are predictions redone.
    model_dir = tmp_path / "models" / "3d_B_model2"
    log_lines = (model_dir / "train_log.csv").read_text()
    os.remove(model_dir / "model_info.json")
    experiments.run("demo", _args(tmp_path))
    out = capsys.readouterr().out
    assert "2D-3D model B, features from 2D model 2: training" in out and out.count(": complete (") == 6 + 6 + 2
    assert (model_dir / "train_log.csv").read_text() == log_lines and (model_dir / "model_info.json").exists()

    # Another config in the same work dir is refused, naming the model's work dir.
    with pytest.raises(ConfigError, match="another config"):
        experiments.run("demo", _args(tmp_path, config_3d=["optim.momentum=0.5"]))


@pytest.mark.slow
def test_table2_missing_pretrains_subnetworks_on_cases_having_their_sequence(tmp_path):
    config = get_config("tiny")
    config.num_cases, config.shape, config.test_fraction, config.num_val = 10, (40, 40, 32), 0.2, 1
    config.twod.train.iterations, config.threed.train.iterations, config.pretrain_iterations = 2, 0, 2
    report = experiments.run("table2_missing", _args(tmp_path, config=config))
    text = open(report).read()
    for row in ("2D model 1, missing data", "2D model 1, missing data + pretrained subnetworks",
                "2D model 1, full data", "2D vs 2D with pretrained subnetworks, missing data"):
        assert f"| {row} |" in text
    split = json.loads((tmp_path / "split.json").read_text())
    assert len(split["subsets"]) == 5
    # The T1 subnetwork is given every training case; the records mark T1 absent in subset 2,
    # so the trainer keeps the others.
    t1_split = json.loads((tmp_path / "models" / "subnetwork_t1" / "split.json").read_text())
    info = json.loads((tmp_path / "models" / "subnetwork_t1" / "model_info.json").read_text())
    assert info["subnetwork"] == "t1" and sorted(t1_split["train"]) == split["train"]
    records = json.loads((tmp_path / "records_missing" / "manifest.json").read_text())
    present = {c["case_id"]: c["modalities_present"] for c in records["cases"]}
    assert all("t1" not in present[i] for i in split["subsets"][1])
    assert all(len(present[i]) == 4 for i in split["subsets"][0] + split["test"])
    pretrained = json.loads((tmp_path / "models" / "2d_model1_subset1_pretrained" / "config.json").read_text())
    assert pretrained["train"]["pretrained_subnetworks"].count("subnetwork_") == 4
    assert sorted(pretrained["data"]["train_cases"]) == split["subsets"][0]


def test_every_model_row_names_a_kind_the_trainers_know():
    from brats_tf.models import unet2d, unet3d
    rows = [M.twod(k, o) for k in M.KINDS_2D for o in M.ORIENTATIONS] + [M.twod("unet_axial"), M.STANDARD_3D]
    rows += M.SIX_2D3D
    for row in rows:
        assert row.kind in (unet2d.KINDS if row.stage == "2d" else unet3d.KINDS), row
    assert len({r.slug for r in rows}) == len(rows) and len({r.row for r in rows}) == len(rows)


@pytest.mark.slow
def test_table2_missing_over_several_seeds_averages_each_case_before_the_test(tmp_path):
    config = get_config("tiny")
    config.table2.num_cases, config.table2.seeds, config.shape, config.test_fraction = 10, 2, (40, 40, 32), 0.2
    config.num_val, config.twod.train.iterations, config.pretrain_iterations = 1, 2, 2
    report = experiments.run("table2_missing", _args(tmp_path, config=config, seed=4))
    text = open(report).read()
    assert "## Each seed alone" in text and "| 4 |" in text and "| 5 |" in text
    for slug in ("2d_model1_subset1", "2d_model1_subset1_pretrained", "2d_model1_full", "subnetwork_flair"):
        seeds = [json.loads((tmp_path / "models" / f"{slug}_seed{s}" / "config.json").read_text())["seed"]
                 for s in (4, 5)]
        assert seeds == [4, 5]
    folder = tmp_path / "table2_missing" / "evaluation"
    runs = [read_evaluation_csv(folder / f"2d_model1_subset1_pretrained_seed{s}.csv")[0] for s in (4, 5)]
    mean = read_evaluation_csv(folder / "2d_model1_subset1_pretrained_mean_over_seeds.csv")[0]
    assert len(mean) == len(runs[0]) == 2
    for row in mean:
        pair = [next(r for r in rows if r["Label"] == row["Label"]) for rows in runs]
        assert row["Dice_WT"] == pytest.approx((pair[0]["Dice_WT"] + pair[1]["Dice_WT"]) / 2, abs=1e-6)


@pytest.mark.slow
def test_the_demo_with_cross_fold_features_adds_their_a_row_and_resumes(tmp_path, capsys):
    """features.folds = 2: 2 x 3 fold models of 2D model 1, each training case's features
    from the fold that did not train on it, A on them, its row and paired test; a re-run
    finds everything complete."""
    config = get_config("tiny")
    config.features.folds = 2
    text = open(experiments.run("demo", _args(tmp_path, config=config))).read()
    assert f"| {M.CROSS_FOLD_A.row} |" in text
    assert "2D-3D A: training features vs 2-fold cross-fold features" in text
    split = json.loads((tmp_path / "split.json").read_text())
    features = json.loads((tmp_path / "features" / "model1_crossfold" / features_lib.MANIFEST).read_text())
    assert features["complete"] and len(features["cross_fold"]["folds"]) == 2
    fold_train = [set(json.loads((tmp_path / "models" / f"2d_model1_axial_fold{k}of2" / "split.json").read_text())
                      ["train"]) for k in range(2)]
    assert fold_train[0] | fold_train[1] == set(split["train"]) and not fold_train[0] & fold_train[1]   # 2 folds
    for case_id, entry in features["cases"].items():
        if case_id in split["train"]:   # from the fold that left it out
            k = int(entry["source"][4:])
            assert case_id not in fold_train[k], (case_id, entry)
        else:
            assert entry["source"] == "main"
    a = json.loads((tmp_path / "models" / M.CROSS_FOLD_A.slug / "config.json").read_text())
    assert a["features"]["cross_fold"] and a["features"]["dir"].endswith("model1_crossfold")
    capsys.readouterr()
    experiments.run("demo", _args(tmp_path, config=config))
    out = capsys.readouterr().out
    assert "training" not in out and out.count(": complete (") == 6 + 6 + 8 + 3
    assert [line.split("]")[0] for line in out.splitlines() if line.startswith("[")] == [f"[{i}/8" for i in range(1, 9)]


def test_folds_partition_the_cases_and_each_fold_tests_on_its_own():
    ids = [f"c{i}" for i in range(7)]
    config = get_config("cpu")
    splits = [M.split_case_ids(ids, config, seed=0, fold=(j, 3)) for j in range(3)]
    assert sorted(sum((s["test"] for s in splits), [])) == ids
    for s in splits:
        assert s["val"] == [] and sorted(s["train"] + s["test"]) == ids
    with pytest.raises(ConfigError, match="more folds than the 7"):
        M.split_case_ids(ids, config, seed=0, fold=(0, 8))


@pytest.mark.slow
def test_cross_validation_on_a_resampled_copy_scores_every_case_on_its_own_grid(tmp_path, capsys):
    """cv_folds = 2 with spacing_mm: one resampled copy and one record set, two folds whose
    test cases partition the data, label maps put back on the original grid, and one report
    over every left-out case."""
    config = get_config("tiny")
    config.cv_folds, config.spacing_mm, config.num_cases = 2, 6.0, 6
    report = open(experiments.run("demo", _args(tmp_path, config=config))).read()
    assert "2-fold cross-validation" in report and "## Each left-out case" in report
    assert "resampled to 6 mm; label maps scored on the original grid" in report
    phantoms = discover_cases(str(tmp_path / "data" / "phantoms"))
    ids = [c.case_id for c in phantoms]
    tests = [json.loads((tmp_path / f"fold{k}" / "split.json").read_text())["test"] for k in (1, 2)]
    assert sorted(tests[0] + tests[1]) == ids and not set(tests[0]) & set(tests[1])
    coarse = discover_cases(str(tmp_path / "data_6mm"))
    assert nib.load(coarse[0].label.path).shape == (40, 40, 26)      # 48 x 48 x 40 at 5 x 5 x 3.875 mm
    evaluation, _ = read_evaluation_csv(tmp_path / "demo" / "evaluation" / "ensemble.csv")
    assert sorted(r["Label"] for r in evaluation) == ids
    for case in phantoms:
        fold = 1 if case.case_id in tests[0] else 2
        pred = nib.load(tmp_path / f"fold{fold}" / "demo" / "predictions_original" / "ensemble"
                        / f"{case.case_id}_seg.nii.gz")
        ref = nib.load(case.label.path)
        assert pred.shape == ref.shape and np.allclose(pred.affine, ref.affine)
        assert f"| {case.case_id} | {fold} | {M.ENSEMBLE_ROW} |" in report
    assert not (tmp_path / "fold1" / "records").exists()   # one record set, in the shared work dir
