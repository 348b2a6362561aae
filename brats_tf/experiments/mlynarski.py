"""[M]'s experiments (METHOD §8): the demo (the README's main job), Tables 1 and 3, and the
missing-sequence experiment (Table 2), each ending in a report with Table 4's tests.

    python run_experiment.py                                   # the demo, on phantoms
    python run_experiment.py --experiment=table1 --scale=demo --data_dir=D [--layout_file=L]
    python run_experiment.py --experiment=table3 --data_dir=D --test_dir=T   # external test set
    python run_experiment.py --experiment=table2_missing --scale=demo
    python run_experiment.py --config.twod.train.iterations=30 --config.threed.model.input_size=70

The scale's settings (phantoms, split sizes, the 2D / 3D model configs `twod`, `threed`)
are a preset of brats_tf/configs/experiments.py; --config.KEY=VALUE overrides one.

`demo`, `table1` and `table3` run the whole method: records -> 2D model 1 and 2D model 2
in three orientations (and U-Net axial for the tables) -> 2D features of each kind ->
the standard 3D model and 2D-3D models A, B, C with features from each 2D kind ->
inference on the test cases through the `segment` code (2D-3D chains recompute their
features from the 2D models) -> hierarchical vote of the six 2D-3D models -> evaluation
CSVs -> paired one-tailed t-tests -> `report.md`. `table2_missing` trains 2D model 1 on
subset 1 of five (subsets 2-5 each lack one sequence, their files left out of a linked
copy of the data), the same after pretraining each modality subnetwork on every training
case that has its sequence, and on the full data.

Every stage skips what its manifests show complete: a model whose `model_info.json` has
the iterations asked for (and whose `config.json` matches), features whose manifest names
the current 2D models by hash, predictions whose manifest names the current models by
hash. An interrupted training resumes from its checkpoint. The split over sorted case ids
is seeded and saved in the work dir.
"""

import copy
import dataclasses
import json
import os
import time

import keras
import numpy as np

from brats_tf.inference import ensemble
from brats_tf.evaluation import evaluate, stats
from brats_tf.report import markdown
from brats_tf.report import tables
from brats_tf.inference import exported, pipeline
from brats_tf.inference import features as features_lib
from brats_tf.configs import experiments as experiment_configs
from brats_tf.configs import train2d, train3d
from brats_tf.constants import LABEL_MAPS, ORIENTATIONS
from brats_tf.errors import ConfigError, DataError
from brats_tf.experiments import common
from brats_tf.io.cases import discover_cases, load_case
from brats_tf.io.labels import map_labels, write_label_map
from brats_tf.io.nifti import Geometry, load_header, load_volume
from brats_tf.io import resample
from brats_tf.io.files import read_json, write_json
from brats_tf.io import splits
from brats_tf.records import reader
from brats_tf.training.loop import record_config
from brats_tf.training.registry import trainer_class


KINDS_2D = ("model1", "model2")
KINDS_2D3D = ("A", "B", "C")


@dataclasses.dataclass(frozen=True)
class Model:
    row: str                     # table row
    slug: str                    # models/<slug>
    stage: str                   # 2d | 3d
    kind: str                    # model1 | model2 | unet | standard | A | B | C
    orientation: str = "axial"
    features: str = None         # 2D kind whose features a 2D-3D model takes
    cross_fold: bool = False     # ... its training cases' features from fold models that did not see them


def twod(kind, orientation="axial"):
    """A 2D model row: model1 | model2 in an orientation, or the unet_axial baseline."""
    names = {"model1": "2D model 1", "model2": "2D model 2", "unet_axial": "U-Net"}
    slug = "2d_unet_axial" if kind == "unet_axial" else f"2d_{kind}_{orientation}"
    return Model(f"{names[kind]} {orientation} slices", slug, "2d", kind, orientation)


STANDARD_3D = Model("Standard 3D model (without 2D features)", "3d_standard", "3d", "standard")
ENSEMBLE_ROW = "Ensemble of the six 2D-3D models"


def twod3d(kind, features):
    return Model(f"2D-3D model {kind}, features from 2D model {features[-1]}", f"3d_{kind}_{features}", "3d",
                 kind, features=features)


SIX_2D3D = [twod3d(k, f) for f in KINDS_2D for k in KINDS_2D3D]
# With features.folds = k: 2D-3D model A on model-1 features whose training cases' features
# come from k-fold 2D models that did not train on them (METHOD §3 caveat).
CROSS_FOLD_A = Model("2D-3D model A, cross-fold features from 2D model 1", "3d_A_model1_crossfold", "3d", "A",
                     features="model1", cross_fold=True)


@dataclasses.dataclass
class Data:
    data_dir: str
    layout: str
    layout_file: str
    records_dir: str
    manifest: dict
    split: dict                  # train / val / test ids (+ subsets for table2_missing)
    test_dir: str                # where the test cases are (data_dir unless --test_dir)
    test_layout: str
    test_layout_file: str
    original_test_dir: str = None   # the test cases on their own grid, when test_dir is resampled


# ------------------------------------------------------------------ the experiments

def demo(args):
    return _method_tables(args, "demo", with_unet=False,
                          title="Demo: the whole method on synthetic phantoms (Tables 1, 3, 4, 6)")


def table1(args):
    return _method_tables(args, "table1", with_unet=True, title="Table 1: local test set")


def table3(args):
    return _method_tables(args, "table3", with_unet=True,
                          title="Table 3: second dataset" + (" (--test_dir)" if args.test_dir else ""))


STAGES = ("data and records", "2D models", "cross-fold 2D models", "2D features", "3D models", "inference and vote",
          "evaluation", "report")


def _method_tables(args, experiment, with_unet, title):
    """The whole method on one seeded split, or (`cv_folds`) on each fold in turn with one
    report over every left-out case."""
    folds = common.experiment_config(args).cv_folds
    if folds:
        return _cross_validation(args, experiment, with_unet, title, folds)
    return _one_split(args, experiment, with_unet, title).report


@dataclasses.dataclass
class SplitResult:
    report: str
    evaluations: dict            # {row: per-case rows}
    comparisons: list
    run: object


def _one_split(args, experiment, with_unet, title):
    run = Run(args, experiment, STAGES)
    folds = run.scale.features.folds
    if not folds:   # before the first stage prints its "[i/n]"
        run.stages.titles.remove("cross-fold 2D models")
    with run.stage("data and records"):
        data = run.prepare_data()
    models_2d = [twod(k, o) for k in KINDS_2D for o in ORIENTATIONS] + ([twod("unet_axial")] if with_unet else [])
    with run.stage("2D models"):
        dirs = {m.slug: run.train(m, run.config_2d(m, data)) for m in models_2d}
    cross_fold = [CROSS_FOLD_A] if folds else []
    if folds:
        with run.stage("cross-fold 2D models"):
            fold_dirs = run.train_fold_models(CROSS_FOLD_A.features, dirs, data, folds)
    with run.stage("2D features"):
        feature_dirs = {k: run.extract_features(k, dirs, data) for k in KINDS_2D}
        if folds:
            feature_dirs[_feature_key(CROSS_FOLD_A)] = run.extract_features(CROSS_FOLD_A.features, dirs, data, fold_dirs)
    with run.stage("3D models"):
        for m in [STANDARD_3D] + SIX_2D3D + cross_fold:
            dirs[m.slug] = run.train(m, run.config_3d(m, data, feature_dirs, dirs))
    rows = ([twod("unet_axial")] if with_unet else []) + [twod(k) for k in KINDS_2D] + [STANDARD_3D] + SIX_2D3D \
        + cross_fold
    with run.stage("inference and vote"):
        pred_dirs = run.predict(rows, dirs, data, vote=[m.row for m in SIX_2D3D])
    with run.stage("evaluation"):
        pred_dirs, data = run.on_original_grid(pred_dirs, data)
        evaluations = run.evaluate(pred_dirs, data)
    a1 = SIX_2D3D[0].row
    comparisons = [("Standard 3D vs 2D-3D", STANDARD_3D.row, a1),
                   ("2D vs 2D-3D", twod("model1").row, a1),
                   ("2D-3D vs ensembling of 2D-3D", a1, ENSEMBLE_ROW)]
    if folds:
        comparisons.append((f"2D-3D A: training features vs {folds}-fold cross-fold features", a1, CROSS_FOLD_A.row))
    logs = {m.row: os.path.join(dirs[m.slug], "train_log.csv") for m in (twod("model1"), SIX_2D3D[0])}
    with run.stage("report"):
        path = run.report(title, evaluations, comparisons, logs, pred_dirs, data,
                          overlay_rows=[twod("model1").row, STANDARD_3D.row, a1, ENSEMBLE_ROW],
                          feature_dir=feature_dirs["model1"])
    return SplitResult(path, evaluations, comparisons, run)


def _cross_validation(args, experiment, with_unet, title, folds):
    """`folds` runs of the whole method in <workdir>/fold<j> (shared data and records), fold j
    testing on the j-th seeded fold of the labeled cases; then <workdir>/<experiment>/report.md
    over every left-out case (each case scored by the models that did not see it)."""
    if getattr(args, "test_dir", None):
        raise ConfigError("--config.cv_folds tests on folds of --data_dir; it cannot take --test_dir too")
    work = os.path.abspath(args.workdir or os.path.join("runs", experiment))
    results = []
    for fold in range(folds):
        print(f"fold {fold + 1} of {folds}", flush=True)
        fold_args = _FoldArgs(args, workdir=os.path.join(work, f"fold{fold + 1}"), cv_fold=(fold, folds),
                              shared_workdir=work)
        results.append(_one_split(fold_args, experiment, with_unet, f"{title}, fold {fold + 1} of {folds}"))
    evaluations = {row: [r for result in results for r in result.evaluations[row]] for row in results[0].evaluations}
    for row, rows in evaluations.items():
        name = os.path.basename(results[0].run.evaluation_csvs[row])
        evaluate.write_evaluation_csv(os.path.join(work, experiment, "evaluation", name), rows)
    notes = [cross_validation_note(results), results[0].run._settings_note(results[0].run.data)]
    path = markdown.write_report(os.path.join(work, experiment), evaluations, results[0].comparisons,
                                 title=f"{title}: {folds}-fold cross-validation", notes=notes)
    print("\nMean Dice x 100 over the left-out cases of every fold:\n" + tables.mean_dice_table(evaluations),
          flush=True)
    return path


class _FoldArgs:
    """The run's flags with a fold's work dir and fold number set."""

    def __init__(self, args, **override):
        self._args, self._override = args, override

    def __getattr__(self, name):
        return self._override[name] if name in self._override else getattr(self._args, name)


def cross_validation_note(results):
    """Per-case Dice of every model (each case from the fold that left it out) and each
    fold's time per stage."""
    regions = stats.PAPER_REGIONS
    rows = []
    for number, result in enumerate(results, 1):
        for row, cases in result.evaluations.items():
            for case in cases:
                rows.append([case["Label"], str(number), row] + [f"{100 * case[f'Dice_{g}']:.1f}" for g in regions])
    stage_rows = [[str(number)] + [f"{result.run.timings.data.get('stages', {}).get(t, 0):.0f}"
                                   for t in result.run.stages.titles]
                  for number, result in enumerate(results, 1)]
    return "\n".join([
        "## Each left-out case (Dice x 100)\n",
        tables.markdown_table(["Case", "Fold", "Model"] + list(regions), rows),
        "## Time per fold and stage (seconds; a stage a re-run found complete takes ~0 s)\n",
        tables.markdown_table(["Fold"] + list(results[0].run.stages.titles), stage_rows)])


MISSING_STAGES = ("data and records", "subnetwork pretraining", "2D models", "inference", "evaluation", "report")


def table2_missing(args):
    """METHOD §8 Table 2: 2D model 1 with missing sequences, with/without pretrained subnetworks.
    With `table2.seeds` > 1, the subnetworks and the three models are trained once per seed
    (seed, seed + 1, ...) on the same data and split; each test case's Dice is averaged over
    the seeds and the paired tests run over the test cases (training noise averaged out, the
    case as the unit); each seed's own test is in the report too."""
    run = Run(args, "table2_missing", MISSING_STAGES)
    with run.stage("data and records"):
        data = run.prepare_data(subsets=5, num_cases=run.scale.table2.num_cases)
        missing = run.missing_data(data)
    seeds = [args.seed + i for i in range(run.scale.table2.seeds)]
    rows = [Model("2D model 1, missing data", "2d_model1_subset1", "2d", "model1"),
            Model("2D model 1, missing data + pretrained subnetworks", "2d_model1_subset1_pretrained", "2d",
                  "model1"),
            Model("2D model 1, full data", "2d_model1_full", "2d", "model1")]
    per_seed = {}
    for seed in seeds:
        tag = "" if len(seeds) == 1 else f"_seed{seed}"
        if tag:
            print(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})", flush=True)
        seeded = [dataclasses.replace(m, slug=m.slug + tag) for m in rows]
        dirs = _train_table2_models(run, data, missing, seeded, seed, tag)
        with run.stage("inference"):
            pred_dirs = run.predict(seeded, dirs, data, folder=f"predictions{tag}")
        with run.stage("evaluation"):
            per_seed[seed] = (dirs, pred_dirs, run.evaluate(pred_dirs, data))
    comparisons = [("2D vs 2D with pretrained subnetworks, missing data", rows[0].row, rows[1].row)]
    dirs, pred_dirs, evaluations = per_seed[seeds[0]]
    notes = [subsets_note(data.split["subsets"], missing.manifest["modalities"])]
    if len(seeds) > 1:
        evaluations = {row: stats.mean_over_runs([per_seed[s][2][row] for s in seeds]) for row in evaluations}
        for m in rows:
            evaluate.write_evaluation_csv(os.path.join(run.out_dir, "evaluation", f"{m.slug}_mean_over_seeds.csv"),
                                          evaluations[m.row])
        notes.insert(0, seeds_note(seeds, {s: per_seed[s][2] for s in seeds}, comparisons))
    with run.stage("report"):
        seeded = [dataclasses.replace(m, slug=m.slug + ("" if len(seeds) == 1 else f"_seed{seeds[0]}")) for m in rows]
        return run.report("Table 2: missing MR sequences", evaluations, comparisons,
                          {m.row: os.path.join(dirs[s.slug], "train_log.csv") for m, s in zip(rows, seeded)},
                          pred_dirs, data, overlay_rows=[m.row for m in rows], extra_notes=notes)


def _train_table2_models(run, data, missing, rows, seed, tag):
    """One seed's subnetworks (each on every training case that has its sequence) and the
    three models; returns {slug: work dir}."""
    subsets, modalities = data.split["subsets"], missing.manifest["modalities"]
    subset_model, pretrained, full = rows
    with run.stage("subnetwork pretraining"):
        subnetworks = []
        for modality in modalities:
            model = Model(f"subnetwork {modality}", f"subnetwork_{modality}{tag}", "2d", "model1")
            config = run.config_2d(model, missing, iterations=run.scale.pretrain_iterations, seed=seed,
                                   subnetwork=modality)
            subnetworks.append(run.train(model, config))
    with run.stage("2D models"):
        return {subset_model.slug: run.train(subset_model, run.config_2d(subset_model, missing, train=subsets[0],
                                                                         seed=seed)),
                pretrained.slug: run.train(pretrained, run.config_2d(
                    pretrained, missing, train=subsets[0], seed=seed, pretrained_subnetworks=",".join(subnetworks))),
                full.slug: run.train(full, run.config_2d(full, data, seed=seed))}


def seeds_note(seeds, evaluations, comparisons):
    """Mean Dice and the paired test of each seed alone."""
    regions = stats.PAPER_REGIONS
    (title, baseline, treated), = comparisons
    rows = []
    for seed in seeds:
        tests = stats.paired_tests(evaluations[seed][baseline], evaluations[seed][treated], regions=regions,
                                   names=(baseline, treated))
        means = [f"{100 * np.mean([r[f'Dice_{g}'] for r in evaluations[seed][row]]):.1f}"
                 for row in (baseline, treated) for g in regions]
        rows.append([str(seed)] + means + [stats.format_pvalue(t.t_pvalue, bold_if_significant=True) for t in tests])
    header = (["Seed"] + [f"without {g}" for g in regions] + [f"pretrained {g}" for g in regions] +
              [f"p {g}" for g in regions])
    return "\n".join([f"## Each seed alone ({title}; one-tailed paired t-test, pretrained better)\n",
                      "The tables above average each test case's Dice over the seeds "
                      f"({', '.join(map(str, seeds))}) before the paired test over the cases.\n",
                      tables.markdown_table(header, rows)])


def subsets_note(subsets, modalities):
    lines = ["## Training subsets (Table 2)\n",
             "Subset 1 has every sequence; subset k+1 lacks the k-th (its file is left out of the linked "
             "copy `data_missing/`, so the records mark it absent).\n"]
    missing = ["none"] + list(modalities)
    lines += [f"- subset {i + 1} (missing {missing[i] if i < len(missing) else 'none'}): {', '.join(s)}"
              for i, s in enumerate(subsets)]
    return "\n".join(lines) + "\n"


def _feature_key(model):
    """The feature set a 2D-3D model trains on (its 2D kind, cross-fold or not)."""
    return f"{model.features}_crossfold" if model.cross_fold else model.features


# ------------------------------------------------------------------ one run of an experiment

class Run:
    def __init__(self, args, experiment, stages):
        self.args, self.experiment = args, experiment
        self.scale = common.experiment_config(args)   # the scale's preset with this run's overrides
        self.work = os.path.abspath(args.workdir or os.path.join("runs", experiment))
        self.out_dir = os.path.join(self.work, experiment)
        self.shared = os.path.abspath(getattr(args, "shared_workdir", None) or self.work)   # data, records
        self.started = time.time()
        self.timings = common.Timings(os.path.join(self.out_dir, "timings.json"))
        self.timings.data.pop("stages", None)   # this run's stage times only
        self.stages = common.Stages(stages, self.timings)
        print(f"{experiment} ({self.scale.scale} scale) in {self.work}", flush=True)

    def stage(self, title):
        return self.stages.run(title)

    # --- data -------------------------------------------------------------------------------
    def prepare_data(self, subsets=0, num_cases=None):
        """The data, its records and split; `num_cases` phantoms (default: the scale's) when
        no --data_dir is given."""
        a, scale = self.args, self.scale
        layout, layout_file = (a.layout, a.layout_file) if a.data_dir else ("auto", None)
        data_dir = common.synthesize_unless_given(a.data_dir, self.shared, "phantoms", num_cases or scale.num_cases,
                                                  a.seed, scale.shape)
        external = bool(getattr(a, "test_dir", None))
        original_test_dir = os.path.abspath(a.test_dir) if external else data_dir
        data_dir = self._resampled(data_dir, "data", layout, layout_file)
        records_dir = os.path.join(self.shared, "records")
        manifest = common.ensure_records(data_dir, records_dir, layout, layout_file)
        ids = common.labeled_ids(manifest)
        fold = getattr(a, "cv_fold", None)
        split = splits.load_or_make(os.path.join(self.work, splits.SPLIT_FILE),
                                    lambda: split_case_ids(ids, scale, a.seed, external, subsets, fold=fold),
                                    known_ids=ids)
        if external:
            test_cases = [c for c in discover_cases(a.test_dir, layout, layout_file) if c.label is not None]
            if not test_cases:
                raise DataError(a.test_dir, "no labeled cases to test on")
            split = dict(split, test=sorted(c.case_id for c in test_cases))
        test_dir = self._resampled(original_test_dir, "test", layout, layout_file) if external else data_dir
        print(f"  split: {len(split['train'])} train / {len(split['val'])} validation / {len(split['test'])} test "
              f"cases ({os.path.join(self.work, 'split.json')})", flush=True)
        self.data = Data(data_dir, layout, layout_file, records_dir, manifest, split, test_dir, layout, layout_file,
                         original_test_dir=original_test_dir if scale.spacing_mm else None)
        return self.data

    def _resampled(self, data_dir, name, layout, layout_file):
        """`data_dir`, or with the scale's `spacing_mm` its resampled copy <shared work>/<name>_<s>mm."""
        spacing = self.scale.spacing_mm
        if not spacing:
            return data_dir
        out_dir = os.path.join(self.shared, f"{name}_{spacing:g}mm")
        print(f"  {data_dir} resampled to {spacing:g} mm in {out_dir}", flush=True)
        return resample.resample_dataset(data_dir, out_dir, layout, layout_file, spacing)

    def on_original_grid(self, pred_dirs, data):
        """(pred_dirs, data) to score: when the test cases were resampled, each label map put
        back on its case's original grid (nearest voxel) under predictions_original/, and the
        data's test dir the original one."""
        if not data.original_test_dir:
            return pred_dirs, data
        originals = {c.case_id: c for c in discover_cases(data.original_test_dir, data.test_layout,
                                                          data.test_layout_file)}
        targets = {}   # each test case's own grid, read once for every row
        for case_id in data.split["test"]:
            original = load_header(next(iter(originals[case_id].images.values())).path)
            targets[case_id] = Geometry(tuple(original.shape[:3]), original.affine, original.header)
        out = {}
        for row, pred_dir in pred_dirs.items():
            out[row] = os.path.join(self.out_dir, "predictions_original", os.path.basename(pred_dir))
            for case_id, target in targets.items():
                labels, geometry = load_label_map(_pred_file(pred_dir, case_id))
                write_label_map(_pred_file(out[row], case_id), resample.labels_on_grid(labels, geometry, target),
                                target, "brats2017")
        return out, dataclasses.replace(data, test_dir=data.original_test_dir)

    def missing_data(self, data):
        """Records of a linked copy of the data where subset k+1 lacks the k-th sequence."""
        modalities = data.manifest["modalities"]
        if len(data.split["subsets"]) < len(modalities) + 1:
            raise ConfigError(f"table2_missing needs {len(modalities) + 1} subsets for {len(modalities)} sequences")
        drop = {case_id: modalities[k] for k, subset in enumerate(data.split["subsets"][1:len(modalities) + 1])
                for case_id in subset}
        out = os.path.join(self.work, "data_missing")
        link_dataset_without(data.data_dir, out, data.layout, data.layout_file, drop)
        records_dir = os.path.join(self.work, "records_missing")
        manifest = common.ensure_records(out, records_dir, data.layout, data.layout_file,
                                         normalization=data.manifest["normalization"], allow_missing_modalities=True)
        return dataclasses.replace(data, data_dir=out, records_dir=records_dir, manifest=manifest)

    # --- configs ----------------------------------------------------------------------------
    def config_2d(self, model, data, train=None, iterations=None, seed=None, **train_fields):
        """The config of a 2D model: the scale's `twod`, this model's kind and orientation,
        the data's split (or `train` cases), `iterations` (default: the scale's) and other
        `train.` fields (subnetwork, pretrained_subnetworks)."""
        c = copy.deepcopy(self.scale.twod)
        c.model.kind, c.data.orientation = model.kind, model.orientation
        c.train.iterations = iterations or c.train.iterations
        for key, value in train_fields.items():
            c.train[key] = value
        return self._finish_config(c, data, train, "2d", seed)

    def config_3d(self, model, data, feature_dirs, dirs):
        c = copy.deepcopy(self.scale.threed)
        c.features.cross_fold = model.cross_fold
        c.model.kind = model.kind
        if model.kind == "standard":   # no 2D features: it learns from the images alone
            c.train.iterations = self.scale.standard_iterations or c.train.iterations
            c.model.input_size = self.scale.standard_input_size or c.model.input_size
        if model.features:
            c.features.dir, c.features.kind = feature_dirs[_feature_key(model)], model.features
            c.features.models = ",".join(dirs[f"2d_{model.features}_{o}"] for o in ORIENTATIONS)
        return self._finish_config(c, data, None, "3d")

    def _finish_config(self, c, data, train, stage, seed=None):
        c.seed = self.args.seed if seed is None else seed
        c.data.records_dir = data.records_dir
        c.data.train_cases = list(train or data.split["train"])
        c.data.val_cases = list(data.split["val"])
        return common.old_overrides(c, self.args, stage)

    # --- training and features ----------------------------------------------------------------
    def train(self, model, config):
        """Trains one model (or finds it complete); returns its work dir."""
        model_dir = os.path.join(self.work, "models", model.slug)
        if common.finished(model_dir, config.train.iterations):
            record_config(model_dir, config)   # refuses a work dir trained with another config
            _check_features_current(model_dir, config)
            print(f"  {model.row}: complete ({model_dir})", flush=True)
            return model_dir
        print(f"  {model.row}: training {config.train.iterations} iterations in {model_dir}", flush=True)
        start = time.time()
        result = common.call(self.scale.process_per_model, model_dir, train_model, config, model_dir)
        self.timings.record(model.row, train_s=time.time() - start)
        validation = ", ".join(f"{k[9:]} {v:.2f}" for k, v in result["validation"].items())
        print(f"  {model.row}: {time.time() - start:.0f} s" + (f"; validation Dice {validation}" if validation
                                                                 else ""), flush=True)
        return model_dir

    def extract_features(self, kind, dirs, data, fold_dirs=None):
        """The features of the 2D `kind` models (with `fold_dirs`: the training cases' from
        the fold models that left them out) in work/features/<kind>[_crossfold]; resumes."""
        name = f"{kind}_crossfold" if fold_dirs else kind
        out_dir = os.path.join(self.work, "features", name)
        paths = {o: dirs[f"2d_{kind}_{o}"] for o in ORIENTATIONS}
        try:
            features_lib.check_request(features_lib.load_manifest(out_dir), out_dir, kind, bool(fold_dirs), paths,
                                       fold_paths=fold_dirs)
            print(f"  2D {name} features: complete ({out_dir})", flush=True)
            return out_dir
        except (DataError, ConfigError):
            pass
        start = time.time()
        manifest = common.call(self.scale.process_per_model, out_dir, features_lib.extract_features,
                               data.records_dir, out_dir, paths, fold_models=fold_dirs, overwrite=True, verbose=False)
        self.timings.record(f"2D {name} features", extract_s=time.time() - start)
        print(f"  2D {name} features of {len(manifest['cases'])} cases: {time.time() - start:.0f} s", flush=True)
        return out_dir

    def train_fold_models(self, kind, dirs, data, folds):
        """The `folds` x 3 orientations of 2D `kind` models for cross-fold features: fold k
        trains on the training cases less the k-th seeded fold (same validation cases and
        settings as the main models); returns [{orientation: work dir}] per fold."""
        fold_dirs = []
        for k, train in enumerate(splits.fold_train_cases(data.split["train"], folds, self.args.seed)):
            models = {o: dataclasses.replace(twod(kind, o), row=f"{twod(kind, o).row}, fold {k + 1} of {folds}",
                                             slug=f"2d_{kind}_{o}_fold{k}of{folds}") for o in ORIENTATIONS}
            fold_dirs.append({o: self.train(m, self.config_2d(m, data, train=train)) for o, m in models.items()})
        return fold_dirs

    # --- inference, evaluation, report ---------------------------------------------------------
    def predict(self, rows, dirs, data, vote=(), folder="predictions"):
        """Label maps of every row's model (and of the vote of the `vote` rows) for the test
        cases, through the segment code, under out_dir/`folder`; returns {row: prediction folder}."""
        pred_root = os.path.join(self.out_dir, folder)
        if self.scale.process_per_model:
            return self._predict_per_model(rows, dirs, data, vote, pred_root)
        loaded = exported.load_with_chains([dirs[m.slug] for m in rows])
        plan = exported.Plan([model for model, _ in loaded], [chain for _, chain in loaded])
        wanted = {m.slug: model.sha256 for m, model in zip(rows, plan.final)}
        manifest_path = os.path.join(pred_root, "manifest.json")
        done = read_json(manifest_path, {})
        if done.get("models") != wanted:
            done = {"models": wanted, "cases": []}
        slugs = {m.row: m.slug for m in rows}
        if vote:
            slugs[ENSEMBLE_ROW] = "ensemble"
        cases = {c.case_id: c for c in discover_cases(data.test_dir, data.test_layout, data.test_layout_file)}
        todo = [i for i in data.split["test"] if i not in done["cases"]]
        start = time.time()
        for number, case_id in enumerate(todo, 1):
            case_start, inputs = time.time(), pipeline.PreparedInputs(cases[case_id])
            maps = {m.row: labels for m, (_, labels, _) in
                    zip(rows, pipeline.label_maps(inputs, plan, tile_size=self.scale.tile_size))}
            if vote:
                maps[ENSEMBLE_ROW], _ = ensemble.hierarchical_vote([maps[r] for r in vote], with_proportions=False)
            for row, labels in maps.items():
                path = os.path.join(pred_root, slugs[row], f"{case_id}_seg.nii.gz")
                write_label_map(path, labels, inputs.geometry, "brats2017")
            done["cases"].append(case_id)
            write_json(manifest_path, done)
            print(f"  [{len(data.split['test']) - len(todo) + number}/{len(data.split['test'])}] {case_id}: "
                  f"{len(maps)} label maps in {time.time() - case_start:.0f} s", flush=True)
        if todo:
            self.timings.record("inference", per_case_s=(time.time() - start) / len(todo))
        return {row: os.path.join(pred_root, slug) for row, slug in slugs.items()}

    def _predict_per_model(self, rows, dirs, data, vote, pred_root):
        """`predict` with each model (and its chain) in its own process, writing its label maps
        of every test case; the vote then reads them back. Peak memory: one model's."""
        start, folders = time.time(), {}
        test = (data.test_dir, data.test_layout, data.test_layout_file, list(data.split["test"]))
        for m in rows:
            folders[m.row] = os.path.join(pred_root, m.slug)
            done = common.call(True, dirs[m.slug], predict_one_model, dirs[m.slug], *test, folders[m.row],
                               self.scale.tile_size)
            print(f"  {m.row}: {done} label maps", flush=True)
        if vote:
            folders[ENSEMBLE_ROW] = os.path.join(pred_root, "ensemble")
            for case_id in data.split["test"]:
                maps = [load_label_map(_pred_file(folders[r], case_id)) for r in vote]
                fused, _ = ensemble.hierarchical_vote([labels for labels, _ in maps], with_proportions=False)
                write_label_map(_pred_file(folders[ENSEMBLE_ROW], case_id), fused, maps[0][1], "brats2017")
        self.timings.record("inference", per_case_s=(time.time() - start) / len(data.split["test"]))
        return folders

    def evaluate(self, pred_dirs, data):
        """{row: per-case metric rows} over the test cases (BraTS metrics), each also written
        to `evaluation/<model>.csv`."""
        evaluations, self.evaluation_csvs = {}, {}
        for row, pred_dir in pred_dirs.items():
            evaluation = evaluate.evaluate_dirs(pred_dir, data.test_dir, data.test_layout, data.test_layout_file,
                                               workers=1, progress=False)
            if evaluation.predictions_without_reference:
                raise DataError(pred_dir, f"predictions without reference: {evaluation.predictions_without_reference}")
            csv_name = f"{os.path.basename(pred_dir)}.csv"
            self.evaluation_csvs[row] = os.path.join(self.out_dir, "evaluation", csv_name)
            evaluate.write_evaluation_csv(self.evaluation_csvs[row], evaluation.rows)
            evaluations[row] = evaluation.rows
        return evaluations

    def report(self, title, evaluations, comparisons, logs, pred_dirs, data, overlay_rows, feature_dir=None,
               extra_notes=()):
        case_id = data.split["test"][0]
        overlays = [self._overlay(case_id, data, {r: _pred_file(pred_dirs[r], case_id) for r in overlay_rows})]
        feature_maps = [self._feature_maps(feature_dir, data)] if feature_dir else []
        notes = list(extra_notes) + [self._settings_note(data), self._timings_note()]
        path = markdown.write_report(self.out_dir, evaluations, comparisons, logs, overlays,
                                   [f for f in feature_maps if f], title=title, notes=notes)
        print("\nMean Dice x 100 on the test cases:\n" + tables.mean_dice_table(evaluations), flush=True)
        print(f"total {time.time() - self.started:.0f} s this run", flush=True)
        return path

    def _overlay(self, case_id, data, predictions):
        case = {c.case_id: c for c in discover_cases(data.test_dir, data.test_layout, data.test_layout_file)}[case_id]
        modality = next(m for m in ("flair", "t2", "t1c", "t1") if m in case.images)
        loaded = load_case(case, [modality])
        return markdown.Overlay(case_id, loaded.image[..., 0], loaded.label, predictions)

    def _feature_maps(self, feature_dir, data):
        """Fig. 10 for a test case (a validation case when the test set is external)."""
        manifest = features_lib.load_manifest(feature_dir)
        case_id = next((i for i in data.split["test"] + data.split["val"] if i in manifest["cases"]), None)
        if case_id is None:
            return None
        case = next(reader.read_cases(data.records_dir, [case_id])).prepared
        features = features_lib.load_features(feature_dir, [case_id])[case_id]
        return markdown.FeatureMaps(case_id, features, image=case.image[..., -1], reference=case.label)

    def _settings_note(self, data):
        s = self.scale
        settings_2d = _settings(s.twod, train2d.get_config(s.twod.preset))
        settings_3d = _settings(s.threed, train3d.get_config(s.threed.preset))
        return "\n".join([
            "## Settings\n",
            f"- scale `{s.scale}` (config presets `{s.twod.preset}`), seed {self.args.seed}, work dir `{self.work}`",
            f"- data `{data.data_dir}` ({len(data.manifest['cases'])} cases, modalities "
            f"{', '.join(data.manifest['modalities'])}, {data.manifest['normalization']} normalization); "
            f"test cases from `{data.test_dir}`" + (
                f", resampled to {s.spacing_mm:g} mm; label maps scored on the original grid of "
                f"`{data.original_test_dir}`" if data.original_test_dir else ""),
            f"- split: {len(data.split['train'])} train / {len(data.split['val'])} validation / "
            f"{len(data.split['test'])} test (`split.json`)",
            f"- iterations: 2D {s.twod.train.iterations}, 3D {s.threed.train.iterations} (standard 3D "
            f"{s.standard_iterations or s.threed.train.iterations} on "
            f"{s.standard_input_size or s.threed.model.input_size}³ patches); 2D settings {settings_2d}; "
            f"3D settings {settings_3d}; overrides 2D {list(getattr(self.args, 'config_2d', None) or [])}, "
            f"3D {list(getattr(self.args, 'config_3d', None) or [])}\n"])

    def _timings_note(self):
        stages = self.timings.data.get("stages", {})
        models = {k: v for k, v in self.timings.data.items() if k != "stages"}
        lines = ["## Time per stage (this run; skipped stages take ~0 s)\n",
                 tables.markdown_table(["Stage", "Seconds"], [[k, f"{v:.0f}"] for k, v in stages.items()])]
        if models:
            lines += ["Per model / step (when it last ran):\n",
                      tables.markdown_table(["Step", "Seconds"], [
                          [k, ", ".join(f"{n} {v:.1f}" for n, v in values.items())] for k, values in models.items()])]
        return "\n".join(lines)


# ------------------------------------------------------------------ helpers

def predict_one_model(model_dir, test_dir, layout, layout_file, case_ids, out_dir, tile_size):
    """Label maps of one model (with its chain) for `case_ids` into `out_dir`, skipping the
    cases its stamp (the model's sha256) lists done; returns how many it wrote (module level:
    `common.in_child_process` runs it by name)."""
    [(model, chain)] = exported.load_with_chains([model_dir])
    plan = exported.Plan([model], [chain])
    stamp_path = os.path.join(out_dir, "done.json")
    done = read_json(stamp_path, {})
    if done.get("sha256") != model.sha256:
        done = {"sha256": model.sha256, "cases": []}
    cases = {c.case_id: c for c in discover_cases(test_dir, layout, layout_file)}
    written = 0
    for case_id in case_ids:
        if case_id in done["cases"]:
            continue
        inputs = pipeline.PreparedInputs(cases[case_id])
        [(_, labels, _)] = list(pipeline.label_maps(inputs, plan, tile_size=tile_size))
        write_label_map(_pred_file(out_dir, case_id), labels, inputs.geometry, "brats2017")
        done["cases"].append(case_id)
        write_json(stamp_path, done)
        written += 1
    return written


def load_label_map(path):
    """(internal labels, geometry) of a label map this experiment wrote (BraTS 2017 values)."""
    raw, geometry = load_volume(path, dtype=np.int16)
    return map_labels(raw, LABEL_MAPS["brats2017"], path), geometry


def train_model(config, model_dir):
    """One model's training (module level: `common.in_child_process` runs it by name)."""
    keras.backend.clear_session()
    return trainer_class(config.stage)(config, model_dir).run()


def split_case_ids(ids, scale, seed, external_test=False, subsets=0, fold=None):
    """Seeded split over sorted ids: test (a fraction; none with an external test set; with
    `fold` = (j, k): the j-th of k folds dealt from the seeded order), validation (kept small
    so at least two training cases remain), train; with `subsets`, the training ids are also
    dealt into that many seeded subsets of near-equal size."""
    order = splits.seeded_order(ids, seed)
    num_test = 0 if external_test else max(1, round(len(ids) * scale.test_fraction))
    if fold is not None:
        j, k = fold
        if k > len(ids):
            raise ConfigError(f"--config.cv_folds={k}: more folds than the {len(ids)} labeled cases")
        test = order[j::k]
        order, num_test = test + [i for i in order if i not in test], len(test)
    num_val = min(scale.num_val, max(len(ids) - num_test - 2, 0))
    split = {"test": sorted(order[:num_test]), "val": sorted(order[num_test:num_test + num_val]),
             "train": sorted(order[num_test + num_val:])}
    if not split["train"] or (not external_test and not split["test"]):
        raise ConfigError(f"{len(ids)} labeled cases are too few for a train/test split")
    if subsets:
        train = order[num_test + num_val:]
        if len(train) < subsets:
            raise ConfigError(f"{len(train)} training cases cannot fill {subsets} subsets")
        split["subsets"] = [sorted(train[k::subsets]) for k in range(subsets)]
    return split


def link_dataset_without(data_dir, out_dir, layout, layout_file, drop):
    """A copy of `data_dir` made of symbolic links, without the image of modality
    `drop[case_id]` for the listed cases (one file per modality needed)."""
    cases = {c.case_id: c for c in discover_cases(data_dir, layout, layout_file)}
    skip = set()
    for case_id, modality in drop.items():
        source = cases[case_id].images.get(modality)
        if source is None:
            continue
        if source.channel is not None:
            raise ConfigError(f"{source.path}: modalities share one 4D file; table2_missing needs a file per "
                              f"modality")
        skip.add(os.path.abspath(source.path))
    for root, _, files in os.walk(data_dir):
        for name in files:
            path = os.path.abspath(os.path.join(root, name))
            target = os.path.join(out_dir, os.path.relpath(path, data_dir))
            if path in skip:
                if os.path.lexists(target):
                    os.remove(target)
                continue
            if not os.path.lexists(target):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                os.symlink(path, target)


def _settings(model_config, preset):
    """The fields of a stage's config that the scale (or an override) sets apart from its
    train2d / train3d preset, iterations aside: {dotted key: value}."""
    return {k: v for k, v in experiment_configs.changes(model_config, preset).items() if k != "train.iterations"}


def _check_features_current(model_dir, config):
    """A finished 2D-3D model must come from the features (2D models) it is asked for."""
    if not (config.stage == "3d" and config.features.dir):
        return
    with open(os.path.join(model_dir, "model_info.json")) as f:
        trained = (json.load(f).get("features") or {}).get("models", {})
    current = features_lib.load_manifest(config.features.dir)["models"]
    if {o: trained.get(o, {}).get("sha256") for o in ORIENTATIONS} != \
            {o: current[o]["sha256"] for o in ORIENTATIONS}:
        raise ConfigError(f"{model_dir}: trained on features of other 2D models; remove it (or use a new "
                          f"--workdir) to retrain it on the current ones")


def _pred_file(pred_dir, case_id):
    return os.path.join(pred_dir, f"{case_id}_seg.nii.gz")

