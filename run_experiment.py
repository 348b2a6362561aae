"""Runs a whole experiment: data, training, inference, evaluation, report.

    python run_experiment.py --experiment=shen_ablation --scale=demo --workdir=W
    python run_experiment.py --experiment=shen_transfer --scale=demo --workdir=W \
        [--data_dir=BRATS] [--target_data_dir=SITE_B] [--layout=...] [--layout_file=...]

Without --data_dir / --target_data_dir the built-in synthetic phantoms are used (site A,
and the second site B). Re-running on the same work dir skips finished models and resumes
interrupted ones. Experiments: brats_tf/experiments/__init__.py (EXPERIMENTS).
"""

from absl import app, flags

from brats_tf import experiments
from brats_tf.errors import run_main
from brats_tf.io.cases import LAYOUT_CHOICES

FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", experiments.names()[0], experiments.names(), "Which experiment.")
flags.DEFINE_enum("scale", "demo", experiments.SCALES,
                  "demo: minutes on a 2-core CPU; paper: the papers' sizes (a GPU).")
flags.DEFINE_string("workdir", None, "Work dir (data, records, models, reports); re-runs resume.", required=True)
flags.DEFINE_string("data_dir", None, "Dataset folder (site A); default: synthesize phantoms.")
flags.DEFINE_enum("layout", "auto", LAYOUT_CHOICES, "Layout of --data_dir / --target_data_dir.")
flags.DEFINE_string("layout_file", None, "Generic layout JSON for the given data dirs (overrides --layout).")
flags.DEFINE_string("target_data_dir", None, "Second-site dataset (transfer); default: synthetic site B.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic data, splits and training.", lower_bound=0)


def main(argv):
    del argv
    from brats_tf.training import TrainingError   # TensorFlow only once an experiment runs
    try:
        report = experiments.run(FLAGS.experiment, FLAGS)
    except TrainingError as err:
        raise SystemExit(f"error: {err}")
    print(f"report: {report}")


if __name__ == "__main__":
    app.run(run_main(main))
