"""Whole experiments, by name: `run_experiment.py --experiment=NAME` calls `run(NAME, args)`.

An experiment is a function taking a flags-like object and returning the path of its
report. The object's attributes: `config`, the run's experiment config (a preset of
brats_tf/configs/experiments.py with the --config.x overrides; None: the `scale` preset),
`scale` ("demo" | "paper" | "cpu" | "tiny"; used when `config` is None), `workdir`, `data_dir`,
`layout`, `layout_file`, `target_data_dir`, `test_dir`, `seed`, `strategy` (set on every
2D / 3D model config whose train.strategy is "off"), and optionally `config_2d` /
`config_3d`, the old spelling of the model overrides (lists of KEY=VALUE, applied last to
every 2D / 3D model). Flags not given are None. With `config.cv_folds`, the [M] experiments
run once per fold with a copy of the object carrying `cv_fold` = (j, k) and
`shared_workdir` (where the data copy and records are shared).

EXPERIMENTS below is the registry; add new experiments there. Its modules import
TensorFlow, so they are imported when an experiment runs, not for `--help`.
"""


def _mlynarski():
    from brats_tf.experiments import mlynarski
    return mlynarski


def _missing():
    from brats_tf.experiments import missing
    return missing


def _shen():
    from brats_tf.experiments import shen
    return shen


EXPERIMENTS = {
    "demo": lambda args: _mlynarski().demo(args),          # the default: the README's main job
    "table1": lambda args: _mlynarski().table1(args),
    "table3": lambda args: _mlynarski().table3(args),
    "table2_missing": lambda args: _mlynarski().table2_missing(args),
    "missing_inference": lambda args: _missing().missing_inference(args),
    "shen_ablation": lambda args: _shen().shen_ablation(args),
    "shen_transfer": lambda args: _shen().shen_transfer(args),
}


def names():
    return tuple(EXPERIMENTS)


def get(name):
    """The experiment function registered as `name`."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]


def run(name, args):
    return get(name)(args)
