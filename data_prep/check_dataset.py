"""Validates a dataset folder: one line per problem (naming the file), then a summary.

    python -m data_prep.check_dataset --data_dir D [--layout auto|brats2017|brats2023|msd] [--layout_file F]

Exit status 0 when clean, 1 when any problem was found.
"""

import sys

from absl import app, flags

from brats_tf.io.cases import LAYOUT_CHOICES
from brats_tf.io.check import check_dataset
from brats_tf.constants import MODALITIES
from brats_tf.errors import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Dataset folder (or a single case folder).", required=True)
flags.DEFINE_enum("layout", "auto", LAYOUT_CHOICES, "On-disk layout.")
flags.DEFINE_string("layout_file", None, "Generic layout JSON (overrides --layout).")
flags.DEFINE_list("modalities", None, f"Modalities every case must have (default: all any case has); "
                                      f"names from {MODALITIES}.")
flags.DEFINE_bool("allow_missing", False, "Do not report cases lacking an expected modality.")


def main(argv):
    del argv
    report = check_dataset(FLAGS.data_dir, FLAGS.layout, FLAGS.layout_file, FLAGS.modalities,
                           FLAGS.allow_missing)
    for problem in report.problems:
        print(problem)
    for line in report.summary_lines():
        print(line)
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    app.run(run_main(main))
