"""Runs a whole experiment: data, training, inference, evaluation, report.

The same main as `python run_experiment.py`, `python -m brats_tf.experiment` and the
`brats-experiment` console script:

    python run_experiment.py                      # the demo: the whole method on phantoms
    python run_experiment.py --experiment=table1 --scale=demo --data_dir=D [--layout_file=L]
    python run_experiment.py --experiment=table3 --data_dir=D --test_dir=T --scale=paper --strategy=mirrored
    python run_experiment.py --experiment=table2_missing
    python run_experiment.py --experiment=missing_inference
    python run_experiment.py --experiment=shen_ablation | shen_transfer [--target_data_dir=SITE_B]
    python run_experiment.py --experiment=table1 --config.twod.train.iterations=30 --config.threed.train.iterations=15

--scale picks a preset of brats_tf/configs/experiments.py (every setting of the experiments,
the model configs included); --config.KEY=VALUE overrides any field of it (e.g.
--config.threed.model.input_size=70, --config.shen.bcn.train.iterations=50); or
--config=brats_tf/configs/experiments.py:tiny names the preset instead of --scale.

Without --data_dir the built-in synthetic phantoms are used. The work dir (default
runs/<experiment>) keeps data, records, split, models, features, predictions and the
report; re-running the same command skips complete stages and resumes an interrupted
training. Experiments: brats_tf/experiments/__init__.py (EXPERIMENTS).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from brats_tf import experiments
from brats_tf.configs import experiments as experiment_configs
from brats_tf.errors import run_main
from brats_tf.io import locks
from brats_tf.io.cases import LAYOUT_CHOICES

FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", "demo", experiments.names(), "Which experiment.")
flags.DEFINE_enum("scale", "demo", experiment_configs.SCALES,
                  "demo: minutes on a 2-core CPU; paper: the papers' settings (a GPU/TPU); cpu: the "
                  "demo's models on real scans (--data_dir), resampled to 2 mm.")
if unknown := experiment_configs.unknown_override(sys.argv):   # else a traceback while the default loads
    sys.exit(f"error: --config.{unknown}: no such field in the experiment config (brats_tf/configs/experiments.py)")
config_flags.DEFINE_config_file("config", f"{experiment_configs.__file__}:demo",
                                "Experiment config FILE:PRESET (default: configs/experiments.py at --scale); "
                                "--config.KEY=VALUE overrides a field.", lock_config=True)
flags.DEFINE_string("workdir", None, "Work dir (default runs/<experiment>); re-runs resume.")
flags.DEFINE_string("data_dir", None, "Dataset folder; default: synthesize phantoms.")
flags.DEFINE_enum("layout", "auto", LAYOUT_CHOICES, "Layout of --data_dir / --test_dir / --target_data_dir.")
flags.DEFINE_string("layout_file", None, "Generic layout JSON for the given data dirs (overrides --layout).")
flags.DEFINE_string("test_dir", None, "External labeled test set (tables); default: a seeded split of --data_dir.")
flags.DEFINE_string("target_data_dir", None, "Second-site dataset (shen_transfer); default: synthetic site B.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data, splits and training.", lower_bound=0)
flags.DEFINE_enum("strategy", "off", ["off", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy of every training ([M] experiments).")
flags.DEFINE_multi_string("config_2d", [], "Old spelling of --config.twod.KEY=VALUE (applied last to every 2D "
                          "model's config, Python literals); repeatable.")
flags.DEFINE_multi_string("config_3d", [], "Old spelling of --config.threed.KEY=VALUE; repeatable.")


def main(argv):
    del argv
    FLAGS.config = experiment_configs.from_flags(FLAGS["config"], FLAGS["scale"])
    from brats_tf.training.loop import TrainingError, make_deterministic   # TensorFlow only once an experiment runs
    if FLAGS.config.twod.deterministic or FLAGS.config.threed.deterministic:
        make_deterministic()   # before any TensorFlow op of the process (data, records): it fixes the threads
    if FLAGS.workdir is None:
        FLAGS.workdir = os.path.join("runs", FLAGS.experiment)
    workdir = os.path.abspath(FLAGS.workdir)
    try:
        with locks.hold(os.path.join(workdir, locks.LOCK_FILE), workdir):   # one live run per work dir
            report = experiments.run(FLAGS.experiment, FLAGS)
    except TrainingError as err:
        raise SystemExit(f"error: {err}")
    print(f"report: {os.path.abspath(report)}")


if __name__ == "__main__":
    app.run(run_main(main))
