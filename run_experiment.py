"""Runs a whole experiment: data, training, inference, evaluation, report (`--help` lists
the flags; README "Experiments").

    python run_experiment.py [--experiment=demo|table1|table3|table2_missing|missing_inference|shen_ablation|shen_transfer]
        [--scale=demo|paper] [--config.KEY=VALUE ...] [--workdir=W]

The main is `brats_tf/experiment.py`, inside the package so that an installed package has
it too (`brats-experiment`, `python -m brats_tf.experiment`); this file runs it exactly as
`python -m` would.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("brats_tf.experiment", run_name="__main__", alter_sys=True)
