"""Paired tests of two evaluations (the paper's Table 4 test), per region.

    python -m brats_tf.compare --baseline A.csv --candidate B.csv [--alternative greater]
        [--metric Dice] [--use_intersection] [--out table.md|table.csv]

Joins the per-case rows of two evaluation CSVs on case id (summary rows excluded) and
runs, per region, the paired one-tailed t-test and the Wilcoxon signed-rank test.
Prints a markdown table; significant p-values (5%) are in bold.
"""

from absl import app, flags

from brats_tf.evaluation import stats
from brats_tf.errors import run_main
from brats_tf.evaluation.metrics import METRICS

FLAGS = flags.FLAGS
flags.DEFINE_string("baseline", None, "Evaluation CSV of the baseline model.", required=True)
flags.DEFINE_string("candidate", None, "Evaluation CSV of the model expected to be better.", required=True)
flags.DEFINE_enum("alternative", "greater", stats.ALTERNATIVES,
                  "greater: candidate's metric is larger (the paper's one-tailed test for Dice).")
flags.DEFINE_enum("metric", "Dice", METRICS, "Per-case metric to compare.")
flags.DEFINE_bool("use_intersection", False, "Compare the common cases when the case sets differ.")
flags.DEFINE_string("out", None, "Also write the table: CSV if the name ends in .csv, else markdown.")


def main(argv):
    del argv
    print(stats.compare_files(FLAGS.baseline, FLAGS.candidate, FLAGS.metric, FLAGS.alternative,
                              FLAGS.use_intersection, FLAGS.out), end="")


if __name__ == "__main__":
    app.run(run_main(main))
