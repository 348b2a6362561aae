r"""Writes the built-in synthetic dataset ("phantoms", METHOD §10) in the BraTS 2017 layout.

    python -m data_prep.synthesize --out_dir D --num_cases N --seed S \
        [--shape X,Y,Z] [--site a|b] [--preview out.png]

Same seed, shape and site give identical files; case i depends only on (seed, i), so a
dataset can be grown by asking for more cases in the same folder.
"""

import os
import sys

# The generator's matrix products are tiny; BLAS threads only contend for the cores.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from absl import app, flags  # noqa: E402

from brats_tf.synthetic import generator as synthetic  # noqa: E402
from brats_tf.errors import ConfigError, run_main  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", None, "Folder to write the cases into (created if needed).")
flags.DEFINE_integer("num_cases", 20, "Number of cases to write (>= 1).")
flags.DEFINE_integer("seed", 0, "Dataset seed (>= 0); case i is made from (seed, i, site).")
flags.DEFINE_string("shape", None, "Matrix size X,Y,Z (e.g. 96,96,72); default: the site's "
                    "(a: 240,240,155 at 1 mm; b: 160,160,53 at 1.5x1.5x3 mm). The anatomy keeps "
                    "its size in mm, so a smaller matrix means larger voxels.")
flags.DEFINE_string("site", "a", "Scanner site: 'a' (BraTS-like) or 'b' (another matrix, "
                    "spacing and contrast, for transfer learning).")
flags.DEFINE_string("preview", None, "Also save a montage of the first case to this .png.")
flags.mark_flag_as_required("out_dir")


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(argv[1:])}")
    folders = synthetic.write_dataset(FLAGS.out_dir, FLAGS.num_cases, FLAGS.seed, shape=FLAGS.shape,
                                      site=FLAGS.site, preview=FLAGS.preview, progress=sys.stderr.isatty())
    print(f"wrote {len(folders)} cases to {os.path.abspath(FLAGS.out_dir)}"
          + (f"; preview {FLAGS.preview}" if FLAGS.preview else ""))


def parse_flags(argv):
    """absl's parser, but a bad flag is reported in one line (no usage hint line)."""
    try:
        return FLAGS(argv)
    except flags.Error as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    app.run(run_main(main), flags_parser=parse_flags)
