"""Whole experiments, by name: `run_experiment.py --experiment=NAME` calls `run(NAME, args)`.

An experiment is a function taking a flags-like object with the attributes `scale`
("demo" | "paper"), `workdir`, `data_dir`, `layout`, `layout_file`, `target_data_dir`
and `seed` (None where a flag was not given), and returning the path of its report.
Entries are "module:function", imported on demand so `--help` stays fast; add new
experiments here.
"""

import importlib

EXPERIMENTS = {
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
