"""The main job until the end-to-end experiment exists: synthesize the built-in dataset,
check it, build its records, and print where they are.

    python -m data_prep.prepare_demo --workdir demo_work [--num_cases 24] [--shape 96,96,72]

Re-running on the same work dir keeps what is complete (phantoms are deterministic, and
the record set is rebuilt only when its manifest does not match the dataset).
"""

import os
import sys

from absl import app, flags

from brats_tf import synthetic
from brats_tf.errors import DataError, run_main
from brats_tf.io.cases import discover_cases
from brats_tf.io.check import check_dataset
from brats_tf.records import reader
from brats_tf.records.writer import build_records

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "demo_work", "Folder for the dataset (data/) and records (records/).")
flags.DEFINE_integer("num_cases", 24, "Phantoms to synthesize.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "Dataset seed.", lower_bound=0)
flags.DEFINE_string("shape", "96,96,72", "Matrix size of the phantoms (X,Y,Z).")


def prepare_demo(workdir, num_cases, seed, shape):
    data_dir, records_dir = os.path.join(workdir, "data"), os.path.join(workdir, "records")
    print(f"[1/3] synthesizing {num_cases} phantoms ({shape}) in {data_dir}", flush=True)
    synthetic.write_dataset(data_dir, num_cases, seed, shape=shape,
                            preview=os.path.join(workdir, "phantom_preview.png"))
    print("[2/3] checking the dataset", flush=True)
    report = check_dataset(data_dir)
    for line in report.problems + report.summary_lines():
        print("  " + line)
    if not report.ok:
        raise DataError(data_dir, f"{len(report.problems)} problems in the synthesized dataset")
    print(f"[3/3] building records in {records_dir}", flush=True)
    if _records_match(records_dir, data_dir):
        print("  records are complete (manifest matches); kept")
    else:
        build_records(data_dir, records_dir, overwrite=True)
    return records_dir


def _records_match(records_dir, data_dir):
    """True when the record set's manifest lists exactly the dataset's cases, from this folder."""
    try:
        manifest = reader.load_manifest(records_dir)
    except DataError:
        return False
    ids = [c.case_id for c in discover_cases(data_dir)]
    return (manifest["source_dir"] == os.path.abspath(data_dir)
            and [c["case_id"] for c in manifest["cases"]] == ids)


def main(argv):
    del argv
    records_dir = prepare_demo(FLAGS.workdir, FLAGS.num_cases, FLAGS.seed, FLAGS.shape)
    print(f"records: {os.path.abspath(records_dir)}")
    print(f"next: python -m brats_tf.train --config.data.records_dir={records_dir} "
          f"--workdir={os.path.join(FLAGS.workdir, 'train_model1_axial')}", file=sys.stderr)


if __name__ == "__main__":
    app.run(run_main(main))
