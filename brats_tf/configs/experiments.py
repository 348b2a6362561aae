"""The experiments' scales (run_experiment.py): one preset per scale holding every setting an
experiment reads, the model configs included, already resolved for that scale.

    python run_experiment.py [--experiment=NAME] [--scale=demo|paper] \
        [--config.twod.train.iterations=30] [--config.threed.model.input_size=70] \
        [--config.num_cases=10] [--config.shen.bcn.train.iterations=50]
    python run_experiment.py --config=brats_tf/configs/experiments.py:tiny ...

Presets: `paper` (the papers' settings, meant for a GPU/TPU), `demo` (the same code on a
2-core CPU: each experiment in about 15 min), `cpu` (the demo's models on real scans given
with --data_dir, resampled to 2 mm: BUILD_NOTES "A preset that learns from real scans") and
`tiny` (the tests' twin: a few small phantoms and a few iterations per model).

[M] experiments (demo, table1, table3, table2_missing):
- `num_cases`, `shape`: phantoms synthesized when no --data_dir is given (shape None:
  240 x 240 x 155); `test_fraction`: cases held out for testing (without --test_dir);
  `num_val`: validation cases (the trainers' checks); `pretrain_iterations`: one modality
  subnetwork alone (table2_missing); `tile_size`: largest output side of a 3D inference tile;
  `sequence_dropout`: the dropout probability of missing_inference's model (a);
  `missing_iterations`: missing_inference's two models (None: twod's);
  `features.folds`: k >= 2 adds 2D-3D model A on cross-fold model-1 features (k x 3 more 2D
  models, each training case's features from the fold that left it out) and its paired
  test against A on the main models' features (demo, table1, table3; None: not run);
  `standard_iterations`, `standard_input_size`: the standard 3D model's (None: threed's);
  it learns from the images alone, without the 2D features that make the 2D-3D models
  learn in a few iterations, so at demo scale it gets more iterations and a larger label
  block (BUILD_NOTES "Why the demo's standard 3D model did not learn");
  `table2.num_cases` (None: num_cases), `table2.seeds`: table2_missing's phantoms and the
  training seeds it averages each test case's Dice over;
  `process_per_model`: train each model and extract each feature set in its own process
  (paper: TensorFlow keeps a model's peak memory for the life of its process).
- `spacing_mm`: train and infer on a copy of the data resampled to this spacing (images
  linear, labels nearest; io/resample.py), then score the label maps on the original grid
  (None: the data's own grid); `cv_folds`: k >= 2 runs the experiment k times, fold j
  testing on the j-th of k seeded folds of the cases (k = the number of cases: leave one
  out), in <workdir>/fold<j>, and writes one report over every left-out case (demo, table1,
  table3; None: one seeded split).
- `twod`, `threed`: the train2d / train3d config every 2D / 3D model starts from. The
  experiment sets per model: model.kind, data.orientation (2D), features.* (2D-3D), seed,
  data.records_dir / train_cases / val_cases, train.subnetwork / pretrained_subnetworks
  (table2_missing); train.strategy from --strategy where it is "off" here. The old
  spelling --config_2d / --config_3d KEY=VALUE still works: applied last to each 2D / 3D
  model's config, as it always was.
[S] experiments (shen_ablation, shen_transfer), `shen`:
- `site_cases`, `site_shapes`: phantoms per site (None: the site's default matrix);
  `test_fraction` (site A), `num_val` (per site), `target_train`: site B cases to re-train /
  fine-tune on ([S]: 11); `transfer_iterations`: iterations on site B;
  `fit_fifcn_volume`: the FIFCN window is the records' largest brain box rounded up to
  its pooling factor (else `fifcn.model.volume_size`).
- `bcn`, `fcn`, `fifcn`: the configs/baselines.py config each variant starts from (the
  experiment sets seed, records, split, dropout / batch norm / loss of the variant,
  train.init_from and the site-B iterations).
"""

import re

import ml_collections

from brats_tf.configs import baselines, common, train2d, train3d
from brats_tf.constants import TILE_SIZE_3D
from brats_tf.errors import ConfigError

SCALES = ("demo", "paper", "cpu")     # run_experiment.py --scale
PRESETS = SCALES + ("tiny",)


def get_config(preset="demo"):
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of {PRESETS}")
    c = ml_collections.ConfigDict()
    c.scale = preset
    c.shape = ml_collections.FieldReference(None, field_type=tuple)
    if preset == "paper":
        # [M]: 285 BraTS 2017 cases, 235 train / 50 test; the presets' paper settings (full
        # slices, 70³ patches, N=10 / 5, schedule 0.25 / 0.001 / 200 / 0.98).
        c.num_cases, c.test_fraction, c.num_val, c.pretrain_iterations = 285, 50 / 285, 5, 5000
        c.twod, c.threed = train2d.get_config("paper"), train3d.get_config("paper")
        c.twod.train.iterations, c.threed.train.iterations = 20000, 20000
    elif preset in ("demo", "cpu"):
        # 2-core CPU, the demo in <= 15 min: small phantoms, small widths, few iterations.
        # Smaller normalized-gradient steps than the paper's 0.25, which made the loss of these
        # small networks spike in short runs (measured: 2D axial validation Dice 0.15 -> 0.76
        # for edema at lr 0.1; the 3D models did not learn at all at 0.25). 3D: the small
        # widths on 54³ patches (10³ labels), one batch per update.
        c.num_cases, c.test_fraction, c.num_val, c.pretrain_iterations = 20, 0.3, 2, 200
        c.shape = (80, 80, 64)
        c.twod, c.threed = train2d.get_config("small"), train3d.get_config("small")
        c.twod.train.iterations = 90
        # Demo 2D: lr 0.05 and precise batch norm (40 batches) made its models' test WT steady
        # (68.7-72.8 over 3 seeds x 2 models, against 38-71 at lr 0.1 with moving averages;
        # BUILD_NOTES "Why the demo's 2D models were fragile"). The cpu scale keeps the lr 0.1
        # its leave-one-out figures were measured with.
        c.twod.optim.learning_rate = 0.05 if preset == "demo" else 0.1
        if preset == "demo":
            c.twod.train.precise_bn_batches = 40
        c.twod.train.val_every = c.twod.train.checkpoint_every = 30
        c.threed.train.iterations = 45
        c.threed.model.input_size = 54
        c.threed.optim.accumulation_steps = 1
        c.threed.optim.learning_rate = 0.05
        c.threed.train.val_every, c.threed.train.checkpoint_every = 0, 15
        if preset == "demo":
            # Demo 3D: the exported weights are the mean of the last 15 iterations' (tail
            # averaging): a 45-iteration run at a fixed step length stopped wherever it was, and
            # one 2D-3D model over-segmented (WT 57.9 -> 78.9 with it; BUILD_NOTES "Why one
            # 2D-3D model over-segmented"). The cpu scale keeps its measured settings.
            c.threed.train.average_last = 15
    else:   # tiny: the tests' end-to-end runs
        c.num_cases, c.test_fraction, c.num_val, c.pretrain_iterations = 8, 0.3, 1, 2
        c.shape = (48, 48, 40)
        c.twod, c.threed = train2d.get_config("small"), train3d.get_config("small")
        c.twod.train.iterations = 3
        c.twod.train.val_every, c.twod.train.checkpoint_every = 0, 2
        c.threed.train.iterations = 2
        c.threed.model.levels, c.threed.model.final, c.threed.model.input_size = (2, 2, 2), 2, 46
        c.threed.optim.accumulation_steps = 1
        c.threed.train.val_every, c.threed.train.checkpoint_every = 0, 1
    c.spacing_mm = ml_collections.FieldReference(None, field_type=float)
    c.cv_folds = ml_collections.FieldReference(None, field_type=int)
    if preset == "cpu":
        # Real 240 x 240 x 155 scans on 2 cores: the demo's models at 2 mm (slices and 3D
        # inference as cheap as the demo's phantoms), every labeled case but the test one
        # for training (no validation case to spare among BraTS 2013's four).
        c.shape = None
        c.spacing_mm = 2.0
        c.num_val, c.test_fraction = 0, 0.25
    if preset != "paper":
        # Op determinism and one inter-op thread: same seed, same table (tiny: tested; demo:
        # two full runs gave identical tables, BUILD_NOTES "The demo, reproducibly").
        c.twod.deterministic = c.threed.deterministic = True
    c.table2 = table2_config(preset)
    c.sequence_dropout = train2d.SEQUENCE_DROPOUT   # missing_inference's model (a)
    # missing_inference's two models (None: twod.train.iterations). Demo: longer than the other
    # 2D models, since the dropout model meets each of the 15 subsets in a fraction of its slices.
    c.missing_iterations = ml_collections.FieldReference(240 if preset in ("demo", "cpu") else None, field_type=int)
    demo = preset in ("demo", "cpu")
    c.features = ml_collections.ConfigDict({"folds": ml_collections.FieldReference(None, field_type=int)})
    c.standard_iterations = ml_collections.FieldReference(90 if demo else None, field_type=int)
    c.standard_input_size = ml_collections.FieldReference(62 if demo else None, field_type=int)   # 18³ labels
    c.process_per_model = preset == "paper"   # the others: no start-up cost per model
    c.tile_size = TILE_SIZE_3D                # (threed.train.tile_size: the validation's, the same)
    c.shen = shen_config(preset)
    return c


def table2_config(preset):
    """table2_missing's own data size and seeds (`pretrain_iterations` is the scale's).
    Demo: the question [M] asks (do subnetworks pretrained on every case having their sequence
    help a model trained on the few complete cases?) made answerable on a CPU (BUILD_NOTES):
    more phantoms per subset, subnetworks pretrained longer than the model trains, 3 seeds."""
    t = ml_collections.ConfigDict()
    t.num_cases = ml_collections.FieldReference(None, field_type=int)   # None: the scale's num_cases
    t.seeds = 1
    if preset in ("demo", "cpu"):
        t.num_cases, t.seeds = 36, 3
    return t


def shen_config(preset):
    """The [S] experiments' section of a preset."""
    s = ml_collections.ConfigDict()
    if preset == "paper":
        # [S]: 178 train / 44 test BraTS cases; 57 Rembrandt cases of which 11 train.
        s.site_cases = {"a": 222, "b": 57}
        s.site_shapes = {"a": ml_collections.FieldReference(None, field_type=tuple),
                         "b": ml_collections.FieldReference(None, field_type=tuple)}
        s.test_fraction, s.num_val, s.target_train, s.transfer_iterations = 44 / 222, 5, 11, 2000
    elif preset in ("demo", "cpu"):
        # CPU demo (each experiment < 15 min on 2 cores): site B keeps the paper's matrix
        # ratios to site A (2/3 in-plane, 1/3 of the slices).
        s.site_cases = {"a": 24, "b": 16}
        s.site_shapes = {"a": (80, 80, 64), "b": (54, 54, 22)}
        s.test_fraction, s.num_val, s.target_train, s.transfer_iterations = 1 / 3, 2, 4, 100
    else:
        s.site_cases = {"a": 5, "b": 4}
        s.site_shapes = {"a": (40, 40, 32), "b": (28, 28, 16)}
        s.test_fraction, s.num_val, s.target_train, s.transfer_iterations = 0.4, 1, 2, 2
    models = "paper" if preset == "paper" else "demo"
    s.fit_fifcn_volume = models == "demo"
    for kind in baselines.MODELS:
        s[kind] = baselines.get_config(f"{kind}_{models}")
        if preset == "tiny":
            s[kind].train.iterations = 2
    return s


def at_scale(scale, overrides):
    """The `scale` preset with `overrides` ({dotted key: value}, e.g. the --config.x flags)."""
    config = get_config(scale)
    config.lock()
    config.update_from_flattened_dict(dict(overrides))
    return config


def from_flags(config_flag, scale_flag):
    """run_experiment's config from its flags: the --scale preset with the --config.x
    overrides, or the preset that --config=FILE:PRESET names (--scale, if given, must agree);
    values out of range are refused (`check_ranges`)."""
    if not config_flag.present:
        return check_ranges(at_scale(scale_flag.value, config_flag.override_values))
    if scale_flag.present and scale_flag.value != config_flag.value.scale:
        raise ConfigError(f"--scale={scale_flag.value} and --config (preset {config_flag.value.scale}) disagree; "
                          f"give one")
    return check_ranges(config_flag.value)


# Lower bounds of the experiment-level fields (the model sections: common.check_ranges).
MINIMUM = {"num_cases": 1, "num_val": 0, "pretrain_iterations": 0, "tile_size": 1, "table2.seeds": 1,
           "table2.num_cases": 1, "missing_iterations": 1, "standard_iterations": 1,
           "standard_input_size": 1, "features.folds": 2, "cv_folds": 2, "spacing_mm": 0.1,
           "shen.num_val": 0, "shen.target_train": 1, "shen.transfer_iterations": 0}


def check_ranges(config):
    """`config` when every value an experiment reads is in range, else ConfigError naming
    the --config flag; checked before any work (a bad 3D value would otherwise stop the run
    after the 2D models' training). Returns the config."""
    common.check_ranges(config, "--config", MINIMUM, positive=())
    for key in ("test_fraction", "shen.test_fraction"):
        value = config.shen.test_fraction if key.startswith("shen.") else config.test_fraction
        if not (isinstance(value, (int, float)) and 0 <= value < 1):
            raise ConfigError(f"--config.{key}={value}: must be a fraction in [0, 1)")
    common.check_ranges(config.twod, "--config.twod")
    common.check_ranges(config.threed, "--config.threed")
    for kind in baselines.MODELS:
        common.check_ranges(config.shen[kind], f"--config.shen.{kind}")
    return config


def unknown_override(argv, flag="config"):
    """The first --config.KEY of `argv` whose KEY is no field of the presets, else None
    (refused in one line before the flag parser meets it with a traceback)."""
    config = get_config()
    for arg in argv:
        match = re.match(rf"--?(?:no)?{flag}\.([^=]+)", arg)
        if match:
            node = config
            for part in match.group(1).split("."):
                if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                    return match.group(1)
                node = node[part]
    return None


def changes(config, base):
    """{dotted key: value} of the fields where `config` differs from `base` (same layout)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update({f"{key}.{k}": v for k, v in changes(value, base[key]).items()})
        elif value != base[key]:
            out[key] = value
    return out
