"""Writes a dataset's cases, normalized and brain-cropped, to TFRecords plus a manifest.

    python -m data_prep.build_records --data_dir D --out_dir R [--layout ...] [--normalization median|zscore|none]
        [--beam_pipeline_options="direct_running_mode=multi_processing,direct_num_workers=2"]

With --beam_pipeline_options the cases are prepared by an Apache Beam pipeline (TFDS's Beam
support; `pip install -r requirements-beam.txt`); the records equal the in-process build's.
Other runners take their own options, e.g. "runner=DataflowRunner,project=P,region=R,
temp_location=gs://B/tmp" (README "Building records with Apache Beam").
"""

from absl import app, flags

from brats_tf import preprocess
from brats_tf.constants import MODALITIES
from brats_tf.errors import run_main
from brats_tf.io.cases import LAYOUT_CHOICES
from brats_tf.records.writer import build_records

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "Dataset folder.", required=True)
flags.DEFINE_string("out_dir", None, "Record set folder to create.", required=True)
flags.DEFINE_enum("layout", "auto", LAYOUT_CHOICES, "On-disk layout.")
flags.DEFINE_string("layout_file", None, "Generic layout JSON (overrides --layout).")
flags.DEFINE_enum("normalization", None, preprocess.NORMALIZATIONS,
                  "Intensity normalization (default: the layout file's recommendation, else median).")
flags.DEFINE_float("median_scale", preprocess.DEFAULT_MEDIAN_SCALE, "Constant applied after median division.",
                   lower_bound=1e-6)
flags.DEFINE_integer("crop_margin", preprocess.DEFAULT_CROP_MARGIN, "Voxels kept around the brain box.",
                     lower_bound=0)
flags.DEFINE_list("modalities", None, f"Modalities to store, from {MODALITIES} (default: all found).")
flags.DEFINE_bool("allow_missing_modalities", False, "Store a missing modality as an absent (zero) channel.")
flags.DEFINE_bool("overwrite", False, "Replace an existing record set in --out_dir.")
flags.DEFINE_string("beam_pipeline_options", None,
                    "Build with Apache Beam: comma-separated Beam pipeline options, key=value "
                    "(e.g. direct_running_mode=multi_processing,direct_num_workers=2).")


def main(argv):
    del argv
    manifest = build_records(FLAGS.data_dir, FLAGS.out_dir, FLAGS.layout, FLAGS.layout_file,
                             FLAGS.normalization, FLAGS.modalities, FLAGS.median_scale, FLAGS.crop_margin,
                             FLAGS.allow_missing_modalities, FLAGS.overwrite,
                             beam_options=FLAGS.beam_pipeline_options)
    print(f"wrote {manifest['num_cases']} cases ({', '.join(manifest['modalities'])}, "
          f"{manifest['normalization']} normalization) to {FLAGS.out_dir}")


if __name__ == "__main__":
    app.run(run_main(main))
