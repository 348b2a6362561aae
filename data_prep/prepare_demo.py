"""Prepares data for hand-run training (the main job is `python run_experiment.py`):
synthesize the built-in dataset, check it, build its records, and print where they are.

    python -m data_prep.prepare_demo --workdir demo_work [--num_cases 24] [--shape 96,96,72]

Re-running on the same work dir keeps what is complete (phantoms are deterministic, and
the record set is rebuilt only when its manifest does not match the dataset).
"""

import os
import sys

from absl import app, flags

from brats_tf.synthetic import generator
from brats_tf.errors import DataError, run_main
from brats_tf.experiments import common
from brats_tf.io.check import check_dataset

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "demo_work", "Folder for the dataset (data/) and records (records/).")
flags.DEFINE_integer("num_cases", 24, "Phantoms to synthesize.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Dataset seed.", lower_bound=0)
flags.DEFINE_string("shape", "96,96,72", "Matrix size of the phantoms (X,Y,Z).")


def prepare_demo(workdir, num_cases, seed, shape):
    data_dir, records_dir = os.path.join(workdir, "data"), os.path.join(workdir, "records")
    print(f"[1/3] synthesizing {num_cases} phantoms ({shape}) in {data_dir}", flush=True)
    generator.write_dataset(data_dir, num_cases, seed, shape=shape,
                            preview=os.path.join(workdir, "phantom_preview.png"))
    print("[2/3] checking the dataset", flush=True)
    report = check_dataset(data_dir)
    for line in report.problems + report.summary_lines():
        print("  " + line)
    if not report.ok:
        raise DataError(data_dir, f"{len(report.problems)} problems in the synthesized dataset")
    print(f"[3/3] records in {records_dir} (kept when their manifest matches the dataset)", flush=True)
    common.ensure_records(data_dir, records_dir)
    return records_dir


def main(argv):
    del argv
    records_dir = prepare_demo(FLAGS.workdir, FLAGS.num_cases, FLAGS.seed, FLAGS.shape)
    print(f"records: {os.path.abspath(records_dir)}")
    print(f"next: python -m brats_tf.train --config.data.records_dir={records_dir} "
          f"--workdir={os.path.join(FLAGS.workdir, 'train_model1_axial')}", file=sys.stderr)


if __name__ == "__main__":
    app.run(run_main(main))
