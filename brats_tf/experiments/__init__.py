"""Whole experiments, by name: `run_experiment.py --experiment=NAME` calls `run(NAME, args)`.

An experiment is a function taking a flags-like object with the attributes `scale`
("demo" | "paper"), `workdir`, `data_dir`, `layout`, `layout_file`, `target_data_dir`,
`test_dir`, `seed`, `strategy`, `config_2d`, `config_3d` (None where a flag was not given), and returning the path of its report.
Entries are "module:function", imported on demand so `--help` stays fast; add new
experiments here.
"""

import importlib

EXPERIMENTS = {
    "demo": "brats_tf.experiments.mlynarski:demo",          # the default: the README's main job
    "table1": "brats_tf.experiments.mlynarski:table1",
    "table3": "brats_tf.experiments.mlynarski:table3",
    "table2_missing": "brats_tf.experiments.mlynarski:table2_missing",
    "shen_ablation": "brats_tf.experiments.shen:shen_ablation",
    "shen_transfer": "brats_tf.experiments.shen:shen_transfer",
}
SCALES = ("demo", "paper")


def names():
    return tuple(EXPERIMENTS)


def get(name):
    """The experiment function registered as `name`."""
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    module, function = EXPERIMENTS[name].split(":")
    return getattr(importlib.import_module(module), function)


def run(name, args):
    return get(name)(args)
